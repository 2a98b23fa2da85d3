"""Export a training checkpoint as a safetensors folder: `python -m avcap.export CKPT --out DIR`.

DIR gets `model.safetensors` (tensors bit-identical to the checkpoint's; the tied output weight stored once),
`config.json` (the model config, normalization stats and frames per clip, with our format marker), `vocab.txt` and a
`README.md` model card: the dataset manifest's fingerprints, the training config and the run's metrics, read from
the checkpoint and the run directory around it (OUT/checkpoints/CKPT). `load_checkpoint`, `avcap.caption
--checkpoint DIR` and `avcap.evaluate --checkpoint DIR` take the folder like the .pt; no training state (optimizer,
RNG) is exported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from avcap.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_export
from shards.manifest import ManifestError, load_dataset_manifest


def _run_dir(ckpt: Path) -> Path | None:
    """OUT of a training run's OUT/checkpoints/NAME.pt."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def manifest_fingerprints(manifest: str) -> dict[str, str]:
    """{split: fingerprint} of a dataset manifest (a directory holding manifest.json, the file, or a URL), read
    through the one checked manifest reader: a damaged manifest is an error naming it, not an empty record."""
    return {name: entry.fingerprint for name, entry in sorted(load_dataset_manifest(manifest).splits.items())}


def run_metrics(run: Path | None) -> dict[str, Any]:
    """The best checkpoint's record and the last evaluation line of a run's metrics.jsonl (what exists)."""
    if run is None:
        return {}
    out: dict[str, Any] = {}
    best = _read_json(run / "checkpoints" / "best.json")
    if best:
        out["best"] = best
    log = run / "metrics.jsonl"
    if log.is_file():
        evals = [r for r in map(_loads, log.read_text(encoding="utf-8").splitlines()) if r and r.get("kind") == "eval"]
        if evals:
            out["last_eval"] = evals[-1]
    return out


def _loads(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def model_card(ckpt: Path, loaded: LoadedCheckpoint, manifest: str | None = None) -> str:
    training = (loaded.extra or {}).get("training") or {}
    train_config = training.get("train_config") or {}
    run = _run_dir(ckpt)
    run_info = _read_json(run / "config.json") if run else None
    fingerprints: dict[str, str] = {}
    if manifest:   # the one asked for: a manifest that cannot be read is the user's error
        fingerprints = manifest_fingerprints(manifest)
    else:          # the one the run recorded may live on the machine that trained
        manifest = (run_info or {}).get("manifest") or train_config.get("data")
        try:
            fingerprints = manifest_fingerprints(manifest) if manifest else {}
        except (ManifestError, OSError):
            fingerprints = {}
    metrics = run_metrics(run)
    cfg = loaded.config
    lines = [
        "# AVCap captioner",
        "",
        f"An audio-visual captioner (CAV-MAE encoder, {cfg.embed_dim} wide; GiT text decoder, {cfg.text_layers} "
        f"layers), mode `{cfg.mode}`, {cfg.num_frames} frame(s) per sample, trained on clips of "
        f"{loaded.frames_per_clip} stored frames. Exported from `{ckpt.name}`"
        + (f" at step {training['step']}" if "step" in training else "") + ".",
        "",
        "    python -m avcap.caption VIDEO --checkpoint THIS_FOLDER",
        "    python -m avcap.evaluate --checkpoint THIS_FOLDER --data DATASET --split test",
        "",
        "## Dataset",
        "",
        f"Manifest: `{manifest}`" if manifest else "Manifest: not recorded in the checkpoint.",
        "",
    ]
    if fingerprints:
        lines += ["| split | fingerprint |", "|---|---|"] + [f"| {s} | `{f}` |" for s, f in fingerprints.items()]
    else:
        lines.append("Fingerprints: unavailable (the manifest is not readable here or has none).")
    lines += ["", "## Metrics", ""]
    lines += (["```json", json.dumps(metrics, indent=2, default=str), "```"] if metrics
              else ["No evaluation recorded beside this checkpoint."])
    lines += ["", "## Training config", ""]
    lines += (["```json", json.dumps(train_config, indent=2, default=str), "```"] if train_config
              else ["Not recorded (a checkpoint without training state)."])
    lines += ["", "## Preprocessing", "", f"fbank normalization: `{json.dumps(loaded.norm_stats)}`", ""]
    return "\n".join(lines)


def export(ckpt: str | Path, out: str | Path, manifest: str | None = None) -> Path:
    ckpt = Path(ckpt)
    loaded = load_checkpoint(ckpt)
    return save_export(out, loaded.model, loaded.config, loaded.tokenizer, loaded.norm_stats,
                       loaded.frames_per_clip, card=model_card(ckpt, loaded, manifest))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export a training checkpoint as a safetensors folder with a model card.")
    ap.add_argument("checkpoint", help="one of our .pt checkpoints (e.g. OUT/checkpoints/best.pt)")
    ap.add_argument("--out", required=True, help="folder to create (refused when it exists and is not empty)")
    ap.add_argument("--manifest", default=None,
                    help="dataset manifest for the model card (default: the one the run recorded)")
    args = ap.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.manifest)
    except (CheckpointError, ManifestError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
