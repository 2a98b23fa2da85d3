"""The whole system on an embedded default: synthetic clips -> the real build -> torchrun training -> evaluation.

    python -m demo.run [--clips N] [--steps N] [--out DIR] [--quick]

1. render a synthetic captioned dataset (demo.media) and serve it on 127.0.0.1 (demo.server);
2. build train/val/test with the real build flow (`flows.py build`: yt-dlp -> ffmpeg -> fbank -> shards);
3. learn a small WordPiece vocab from the train captions;
4. train a tiny captioner with torchrun on CPU processes (gloo), keeping the best checkpoint on val;
5. caption the held-out test clips with `avcap.evaluate` (which also writes their HTML gallery) and print them
   beside their references, with the metrics, how many captions name the right sound and the right picture
   (per class), and the CIDEr-D of the best constant caption (the single train caption that scores best on the
   test references): a model that learned nothing cannot beat it.

Everything lands under --out (default out/demo); a summary goes to OUT/summary.json. `--quick` is the
shortened run the test suite does (a few clips, a few steps): it checks the path, not the learning.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from avcap.metrics import ptb_tokenize
from avcap.tokenizer import build_wordpiece_vocab
from demo.media import AUDIO_CLASSES, SPLITS, VISUAL_CLASSES, DemoClip, DemoDataset, DemoMediaConfig, generate_dataset
from demo.server import MediaServer
from pipeline import orchestrate as flows

REPO_ROOT = Path(__file__).resolve().parent.parent

# A captioner small enough to train in minutes on two CPU cores: the tiny preset (64 wide) with 32x32 patches
# (128 audio + 49 picture tokens instead of 512 + 196: the prefix the decoder attends to is 4x shorter and a step
# ~4x cheaper, and the demo's classes are broad enough for coarse patches), two audio blocks, one picture block,
# one joint block and one decoder layer. Attention-probability dropout is off: with it, attention falls back from
# the fused SDPA kernel to an explicit softmax + dropout over the prefix, 4x slower on CPU.
DEMO_MODEL = {"patch_size": 32, "depth_a": 2, "depth_v": 1, "depth_u": 1, "text_layers": 1,
              "attention_dropout": 0.0}


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the stage and where its log is."""


@dataclass
class DemoConfig:
    out: Path = Path("out/demo")
    clips: int = 120
    steps: int = 1200                # optimizer steps (each: nproc x batch_size clips); 600 left tones half learned
    batch_size: int = 8              # per process
    nproc: int = 2                   # torchrun processes (gloo on CPU)
    lr: float = 2e-3
    freqm: int = 0                   # SpecAugment widths: the original's 48 mel bins / 192 frames hide a narrow tone
    timem: int = 0                   # or most of a slow beep's rhythm; noise + roll below regularize enough
    noise: bool = True               # noise + time roll: the beeps' phase varies, so the model learns rhythm and
                                     # pitch, not clips (one trial: fast beeps 3/5 held-out right without, 5/5 with)
    evals: int = 4                   # validations during training (best checkpoint by val CIDEr-D)
    seed: int = 0
    vocab_size: int = 400
    workers: int = 2                 # concurrent ffmpeg renders; the build downloads with twice as many threads
    cpu_workers: int = 2             # build processes for extraction + fbank (1: in the build's own process)
    prefect: bool = True             # the build as a Prefect flow (False: the same stages without Prefect)
    use_java: bool | None = None     # METEOR and the Java PTB tokenizer in the final evaluation (None: if present)
    device: str = "cpu"
    model: dict = field(default_factory=lambda: dict(DEMO_MODEL))

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """The test suite's run: every stage, a few clips and steps."""
        base = dict(clips=12, steps=4, batch_size=2, evals=1, vocab_size=200, use_java=False, cpu_workers=1)
        base.update(overrides)
        return cls(**base)


@dataclass
class DemoResult:
    out: Path
    checkpoint: Path
    metrics: dict
    predictions: dict[str, str]
    references: dict[str, list[str]]
    constant_caption: str
    constant_cider: float
    seconds: dict[str, float]
    notes: list[str]
    content: dict = field(default_factory=dict)  # content_accuracy(): sound / picture named right, per class
    gallery: Path | None = None                  # the test split's HTML gallery with the generated captions

    @property
    def cider(self) -> float:
        return float(self.metrics["CIDEr"])


class _Stages:
    """Numbered stage headers with elapsed times, so a user sees where the demo is."""

    def __init__(self, total: int):
        self.total, self.n, self.t0, self.seconds = total, 0, time.monotonic(), {}
        self._name, self._start = None, None

    def start(self, name: str, what: str) -> None:
        self._finish()
        self.n += 1
        self._name, self._start = name, time.monotonic()
        print(f"\n[demo {self.n}/{self.total}] {what}  (t={time.monotonic() - self.t0:.0f} s)", flush=True)

    def _finish(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.monotonic() - self._start, 1)

    def done(self) -> dict[str, float]:
        self._finish()
        self._name = None
        self.seconds["total"] = round(time.monotonic() - self.t0, 1)
        return self.seconds


# ----------------------------------------------------------------------------------------------------------
# stages

def build_splits(ds: DemoDataset, data_dir: Path, cfg: DemoConfig) -> None:
    """The real build command (`flows.py build`) once per split, downloading from the loopback server.

    It runs in this process, so the three splits share one temporary Prefect server instead of starting three."""
    # Prefect's client logs every API call at INFO through httpx: noise between the build's own progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with MediaServer(ds.media_dir) as server:
        print(f"[demo] serving {len(ds.clips)} clips at {server.url_template}", flush=True)
        for split in SPLITS:
            n = len(ds.split(split))
            argv = ["build", "--csv", str(ds.csv_paths[split]), "--split", split, "--out", str(data_dir),
                    "--url-template", server.url_template, "--download-workers", str(2 * cfg.workers),
                    "--cpu-workers", str(cfg.cpu_workers), "--samples-per-shard", str(max(4, math.ceil(n / 4))),
                    "--max-retries", "1", "--backoff", "0.5", "--max-failure-rate", "0.0"]
            if not cfg.prefect:
                argv.append("--no-prefect")
            print(f"[demo] build {split} ({n} clips): python flows.py {' '.join(_short(a) for a in argv)}",
                  flush=True)
            code = flows.main(argv)
            if code != 0:
                raise DemoError(f"build of the {split} split failed (flows.py exit {code}); see the log above and "
                                f"{data_dir / 'ledger.sqlite'}")


def train_model(data_dir: Path, vocab: Path, run_dir: Path, n_train: int, cfg: DemoConfig, log_dir: Path) -> Path:
    """torchrun --nproc_per_node cfg.nproc train.py ...; returns the best checkpoint (by val CIDEr-D)."""
    per_epoch = max(1, n_train // (cfg.nproc * cfg.batch_size))
    epochs = math.ceil(cfg.steps / per_epoch)
    eval_every = max(1, epochs // max(1, cfg.evals))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
           "train.py", "--data", str(data_dir), "--out", str(run_dir), "--model", "tiny",
           "--model-overrides", json.dumps(cfg.model), "--vocab", str(vocab),
           "--epochs", str(epochs), "--max-steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
           "--lr", str(cfg.lr), "--warmup-epochs", str(min(2.0, epochs / 10)), "--min-lr", str(cfg.lr / 20),
           "--freqm", str(cfg.freqm), "--timem", str(cfg.timem),
           "--noise" if cfg.noise else "--no-noise",
           "--weight-decay", "0.01", "--eval-every", str(eval_every), "--eval-batch-size", "16",
           "--num-workers", "0", "--shuffle-buffer", "64", "--device", cfg.device, "--precision", "fp32",
           "--seed", str(cfg.seed), "--max-gen-steps", "24", "--java", "no", "--no-tensorboard"]
    print(f"[demo] {per_epoch} steps per epoch, {epochs} epochs, validation every {eval_every} epochs", flush=True)
    print(f"[demo] {' '.join(_short(c) for c in cmd[1:])}", flush=True)
    # One thread per process: the processes already fill the cores; more would only contend. No loader worker
    # processes (--num-workers 0): decoding 8 small samples costs little next to a step, and starting workers
    # each epoch cost more than it saved here (~10 against 4-5 steps/s).
    _run(cmd, "training", log_dir / "train.log", env={"OMP_NUM_THREADS": "1"})
    best = run_dir / "checkpoints" / "best.pt"
    latest = run_dir / "checkpoints" / "latest.pt"
    if best.is_file():
        return best
    if latest.is_file():
        return latest
    raise DemoError(f"training finished without a checkpoint in {run_dir / 'checkpoints'}; see {log_dir / 'train.log'}")


def evaluate_test(checkpoint: Path, data_dir: Path, out_json: Path, cfg: DemoConfig, log_dir: Path) -> dict:
    java = {None: "auto", True: "yes", False: "no"}[cfg.use_java]
    cmd = [sys.executable, "-m", "avcap.evaluate", "--checkpoint", str(checkpoint), "--data", str(data_dir),
           "--split", "test", "--out", str(out_json), "--device", cfg.device, "--num-workers", "0",
           "--max-gen-steps", "24", "--java", java, "--gallery"]
    _run(cmd, "evaluation", log_dir / "evaluate.log")
    metrics_path = out_json.with_name(out_json.stem + ".metrics.json")
    if not metrics_path.is_file():
        raise DemoError(f"evaluation wrote no metrics at {metrics_path}; see {log_dir / 'evaluate.log'}")
    return json.loads(metrics_path.read_text())


def gallery_path(results_json: Path) -> Path:
    """Where `avcap.evaluate --gallery` put the test split's page (pipeline.gallery: beside the results)."""
    page = results_json.parent / "reports" / "gallery-test.html"
    if not page.is_file():
        raise DemoError(f"evaluation wrote no gallery at {page}")
    return page


def best_constant_caption(candidates: list[str], references: dict[str, list[str]]) -> tuple[str, float]:
    """The single caption that, given for every clip, scores the highest CIDEr-D against `references`.

    Candidates are tokenized like the evaluation (PTB rules) and scored with the same CIDEr-D implementation;
    the document frequencies come from the references alone, so every candidate is scored on equal terms."""
    from pycocoevalcap.cider.cider import Cider

    if not candidates or not references:
        raise ValueError("best_constant_caption: need candidates and references")
    keys = sorted(references)
    gts = ptb_tokenize({k: list(references[k]) for k in keys})
    unique = sorted(set(candidates))
    toks = ptb_tokenize({str(i): [c] for i, c in enumerate(unique)})
    best, best_score, seen = unique[0], -1.0, set()
    for i, cand in enumerate(unique):
        tok = toks[str(i)][0]
        if tok in seen:
            continue
        seen.add(tok)
        score, _ = Cider().compute_score(gts, {k: [tok] for k in keys})
        if score > best_score:
            best, best_score = cand, float(score)
    return best, best_score


def content_accuracy(clips: list[DemoClip], predictions: dict[str, str]) -> dict:
    """How often a generated caption names the clip's sound and its picture, overall and per class.

    A caption names a class when it contains one of the class's phrases and no phrase of another class of the
    same kind; CIDEr-D mixes wording with content, this says which of the two the model got right."""
    def named(caption: str, classes, right: str) -> bool:
        text = caption.lower()
        hits = {c.name for c in classes if any(ph in text for ph in c.phrases)}
        return hits == {right}

    out: dict = {}
    for kind, classes, attr in (("sound", AUDIO_CLASSES, "audio"), ("picture", VISUAL_CLASSES, "visual")):
        per_class: dict[str, list[int]] = {}
        for clip in clips:
            pred = predictions.get(clip.key)
            if pred is None:
                continue
            right = getattr(clip, attr)
            counts = per_class.setdefault(right, [0, 0])
            counts[0] += named(pred, classes, right)
            counts[1] += 1
        total = [sum(c[0] for c in per_class.values()), sum(c[1] for c in per_class.values())]
        out[kind] = {"right": total[0], "clips": total[1], "per_class": per_class}
    both = [c for c in clips if c.key in predictions]
    out["both"] = {"right": sum(named(predictions[c.key], AUDIO_CLASSES, c.audio)
                                and named(predictions[c.key], VISUAL_CLASSES, c.visual) for c in both),
                   "clips": len(both)}
    return out


def read_references(ds: DemoDataset, split: str) -> dict[str, list[str]]:
    """Clip key -> its captions, for the clips of `split` (keys as the shards name them)."""
    return {c.key: list(c.captions) for c in ds.split(split)}


# ----------------------------------------------------------------------------------------------------------
# the run

def run_demo(cfg: DemoConfig) -> DemoResult:
    out = Path(cfg.out).absolute()
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(6)

    stages.start("media", f"rendering {cfg.clips} synthetic clips (ffmpeg lavfi + espeak-ng) into {out / 'source'}")
    ds = generate_dataset(out / "source", DemoMediaConfig(clips=cfg.clips, seed=cfg.seed, workers=cfg.workers))
    for note in ds.notes:
        print(f"[demo] note: {note}", flush=True)
    sizes = {s: len(ds.split(s)) for s in SPLITS}
    print(f"[demo] {sizes} clips in {ds.seconds:.1f} s", flush=True)

    data_dir = out / "data"
    stages.start("build", f"building shards with the real pipeline (yt-dlp -> ffmpeg -> fbank -> shards) in {data_dir}")
    build_splits(ds, data_dir, cfg)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    print(f"[demo] manifest: {_manifest_counts(manifest)}", flush=True)

    stages.start("vocab", "learning a WordPiece vocabulary from the train captions")
    train_captions = [c for clip in ds.split("train") for c in clip.captions]
    vocab = build_wordpiece_vocab(train_captions, out / "vocab.txt", vocab_size=cfg.vocab_size)
    print(f"[demo] {len(vocab.read_text().splitlines())} tokens -> {vocab}", flush=True)

    run_dir = out / "run"
    stages.start("train", f"training a tiny captioner: torchrun, {cfg.nproc} CPU processes, {cfg.steps} steps")
    checkpoint = train_model(data_dir, vocab, run_dir, sizes["train"], cfg, log_dir)
    print(f"[demo] checkpoint: {checkpoint}", flush=True)

    stages.start("evaluate", "captioning the held-out test clips (avcap.evaluate, beam search)")
    results_json = out / "eval-test.json"
    metrics = evaluate_test(checkpoint, data_dir, results_json, cfg, log_dir)
    predictions = {r["image_id"]: r["caption"] for r in json.loads(results_json.read_text())}
    references = read_references(ds, "test")
    missing = sorted(set(references) - set(predictions))
    if missing:
        raise DemoError(f"evaluation captioned {len(predictions)} of {len(references)} test clips; missing {missing[:3]}")

    stages.start("baseline", "finding the best constant caption (one train caption for every test clip)")
    const, const_cider = best_constant_caption(train_captions, references)
    seconds = stages.done()

    result = DemoResult(out=out, checkpoint=checkpoint, metrics=metrics, predictions=predictions,
                        references=references, constant_caption=const, constant_cider=const_cider,
                        seconds=seconds, notes=list(ds.notes),
                        content=content_accuracy(ds.split("test"), predictions),
                        gallery=gallery_path(results_json))
    print_report(result)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def print_report(r: DemoResult) -> None:
    print("\n" + "=" * 100)
    print("Held-out test clips: generated caption | a reference (of five)")
    print("-" * 100)
    for key in sorted(r.predictions):
        print(f"{key}\n    generated: {r.predictions[key]}\n    reference: {r.references[key][0]}")
    print("-" * 100)
    names = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
    print("metrics: " + "  ".join(f"{n} {'n/a' if r.metrics.get(n) is None else format(r.metrics[n], '.3f')}"
                                  for n in names))
    if r.content:
        for kind in ("sound", "picture"):
            c = r.content[kind]
            per = "  ".join(f"{name} {k}/{n}" for name, (k, n) in sorted(c["per_class"].items()))
            print(f"{kind} named right: {c['right']}/{c['clips']}   ({per})")
        print(f"both named right:    {r.content['both']['right']}/{r.content['both']['clips']}")
    print(f"CIDEr-D of the model:                {r.cider:.3f}")
    print(f"CIDEr-D of the best constant caption: {r.constant_cider:.3f}   (\"{r.constant_caption}\")")
    ratio = r.cider / max(r.constant_cider, 1e-9)
    verdict = "learned" if ratio >= 1.5 else "NOT clearly above the constant caption"
    print(f"-> {ratio:.2f}x the constant caption: {verdict}; times (s): {r.seconds}")
    for note in r.notes:
        print(f"note: {note}")
    print("=" * 100, flush=True)
    if r.gallery is not None:
        print(f"gallery of the test clips (frames, sound, generated and reference captions): {r.gallery}",
              flush=True)


# ----------------------------------------------------------------------------------------------------------
# helpers

def _short(arg: str) -> str:
    return f"'{arg}'" if any(ch in arg for ch in " {}\"") else arg


def _manifest_counts(manifest: dict) -> str:
    splits = manifest.get("splits", {})
    parts = []
    for name, entry in splits.items():
        counts = entry.get("counts") if isinstance(entry, dict) else None
        parts.append(f"{name}: {counts if counts is not None else entry.get('num_samples', '?')}")
    return "; ".join(parts) or "(no splits)"


def _run(cmd: list[str], what: str, log_path: Path, env: dict[str, str] | None = None,
         timeout_s: float = 1800.0) -> None:
    """Run a stage command with its output shown live and kept in log_path; DemoError when it fails.

    The stage runs in its own process group with a time limit (generous: several times a normal run), so a hung
    stage ends the demo with a message instead of holding the terminal: torchrun's workers go with it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    timed_out = threading.Event()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        try:
            # Chunks, not lines: tqdm redraws its bar with carriage returns and no newline.
            while chunk := proc.stdout.read1(1 << 16):
                log.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            code = proc.wait(timeout=60)  # stdout closed: the process is exiting
        except BaseException:
            kill()
            raise
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        raise DemoError(f"{what} did not finish within {timeout_s:.0f} s and was stopped; its output is in {log_path}")
    if code != 0:
        raise DemoError(f"{what} failed (exit {code}); its full output is in {log_path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DemoConfig.out)
    ap.add_argument("--clips", type=int, help=f"total clips (default {DemoConfig.clips}; --quick: 12)")
    ap.add_argument("--steps", type=int, help=f"training steps (default {DemoConfig.steps}; --quick: 4)")
    ap.add_argument("--nproc", type=int, help=f"torchrun processes (default {DemoConfig.nproc})")
    ap.add_argument("--seed", type=int, default=DemoConfig.seed)
    ap.add_argument("--quick", action="store_true", help="a few clips and steps: checks the path, not the learning")
    ap.add_argument("--no-prefect", action="store_true", help="run the build stages without Prefect")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("clips", args.clips), ("steps", args.steps), ("nproc", args.nproc)) if v}
    overrides.update(out=args.out, seed=args.seed, prefect=not args.no_prefect)
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        run_demo(cfg)
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
