"""Caption a split with beam search and score it: `python -m avcap.evaluate --checkpoint CKPT --data DIR --split test`.

`Evaluator` is the one evaluation: this command runs it once, training runs it after each evaluated epoch.
Every rank captions the clips its loader hands it (the eval loader reads each clip exactly once across ranks);
rank 0 gathers the predictions, drops duplicate keys, writes the COCO-format results file and scores it with
avcap.metrics (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; SPICE/SPIDEr when CoreNLP jars are given).

Works as a single process or under torchrun (`torchrun --nproc_per_node N -m avcap.evaluate ...`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from avcap import metrics
from avcap.checkpoint import load_checkpoint
from avcap.distributed import DistEnv, setup_distributed, teardown_distributed
from avcap.generate import GenerationConfig, GenerationFlags, generate, generation_from_flags
from avcap.tokenizer import decode_batch
from avcap.train_config import REMOTE_HELP, build_arg_parser, config_field, run_command
from avcap.train_data import EvalBatch, EvalData, check_dataset_matches
from pipeline.gallery import write_gallery
from shards.atomic import atomic_write_text
from shards.augment import AugmentConfig
from shards.split_info import load_split


@dataclass
class EvalConfig(GenerationFlags):
    checkpoint: str = config_field("", "captioner checkpoint: a training run's .pt, or a folder written by avcap.export")
    data: str = config_field("", "dataset directory or URL of its manifest.json")
    shard_base: str = config_field("", "read the manifest's shard paths under this local path or URL instead (any fsspec "
                             "scheme, or 'pipe:CMD' with {path} where the path goes)")
    split: str = config_field("test", "split to caption and score")
    out: str = config_field("", "results file (COCO format JSON); metrics go beside it as *.metrics.json "
                      "(default: eval-SPLIT.json beside the checkpoint)")
    batch_size: int = config_field(16, "samples per rank per batch")
    num_workers: int = config_field(2, "loader worker processes per rank")
    java: str = config_field("auto", "metrics with Java (PTB tokenizer, METEOR, SPICE): auto (when found) | yes (required) | "
                           "no (the Python PTB tokenizer; METEOR/SPICE unavailable)")
    spice_jars: str = config_field("", "directory with the Stanford CoreNLP 3.6.0 jars for SPICE/SPIDEr (optional)")
    skip_bad_shards: bool = config_field(False, "skip a damaged shard, or a sample that does not decode, with a warning "
                                      "instead of failing")
    remote: str = config_field("", REMOTE_HELP)   # the same flag as train.py's
    device: str = config_field("auto", "auto | cpu | cuda")
    dist_timeout_s: int = config_field(600, "collective timeout")
    gallery: bool = config_field(False, "also write an HTML gallery of the split with the generated captions and per-clip "
                              "CIDEr-D: reports/gallery-SPLIT.html beside the results file (pipeline.gallery)")


@torch.no_grad()
def caption_split(model: torch.nn.Module, batches: Iterable[EvalBatch], tokenizer: Any,
                  gen: GenerationConfig) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Beam-search captions for every batch this rank reads -> ({key: caption}, {key: reference captions})."""
    was_training = model.training
    model.eval()
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    try:
        for audio, visual, keys, refs in batches:
            if not keys:  # a batch of padding only
                continue
            tokens, _ = generate(model, audio, visual, gen)
            for key, text, ref in zip(keys, decode_batch(tokenizer, tokens.cpu()), refs):
                predictions[key] = text
                references[key] = list(ref)
    finally:
        model.train(was_training)
    return predictions, references


def gather_predictions(predictions: dict[str, str], references: dict[str, list[str]],
                       env: DistEnv) -> tuple[dict[str, str], dict[str, list[str]]] | None:
    """All ranks' predictions merged on rank 0 (other ranks get None); a key seen twice is kept once."""
    if not env.enabled:
        return predictions, references
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object((predictions, references), gathered, dst=0)
    if not env.is_main:
        return None
    merged_p: dict[str, str] = {}
    merged_r: dict[str, list[str]] = {}
    for preds, refs in gathered:  # type: ignore[union-attr]
        for key, text in preds.items():
            merged_p.setdefault(key, text)
            merged_r.setdefault(key, refs[key])
    return merged_p, merged_r


JAVA_CHOICES = {"auto": None, "yes": True, "no": False}


def score_and_write(predictions: dict[str, str], references: dict[str, list[str]], results_path: Path,
                    java: str = "auto", spice_jars: str = "",
                    generation: GenerationConfig | None = None) -> dict[str, Any]:
    """COCO results file at results_path, metrics beside it (`<stem>.metrics.json`); returns the metrics.

    Metrics that cannot be computed here (METEOR/SPICE without Java, SPICE without the CoreNLP jars) are None,
    with the reason under "unavailable". The generation settings (precision included) go under "generation".
    """
    if java not in JAVA_CHOICES:
        raise ValueError(f"java must be one of {sorted(JAVA_CHOICES)}, got {java!r}")
    if not predictions:
        raise ValueError(f"no predictions to score for {results_path}: the split yielded no clips")
    results_path = Path(results_path)
    metrics.write_coco_results(results_path, predictions)
    unavailable: dict[str, str] = {}
    scores: dict[str, Any] = dict(metrics.score_captions(predictions, references, use_java=JAVA_CHOICES[java],
                                                   spice_jars=spice_jars or None, unavailable=unavailable))
    scores["num_clips"] = len(predictions)
    scores["unavailable"] = unavailable
    if generation is not None:
        scores["generation"] = generation.to_dict()
    atomic_write_text(results_path.with_name(results_path.stem + ".metrics.json"), json.dumps(scores, indent=2))
    return scores


def selection_metric(scores: dict[str, Any]) -> tuple[str, float]:
    """SPIDEr when SPICE ran, otherwise CIDEr-D: what picks the best checkpoint."""
    for name in ("SPIDEr", "CIDEr"):
        value = scores.get(name)
        if value is not None:
            return name, float(value)
    raise KeyError(f"the scores have neither SPIDEr nor CIDEr: {sorted(scores)}")


@dataclass
class Evaluator:
    """One evaluation of a model on a split: every rank captions its share of `data` with beam search, rank 0
    gathers the captions, writes the COCO results file and scores it. Training runs it after each evaluated
    epoch, `evaluate_checkpoint` once."""
    env: DistEnv
    data: EvalData
    tokenizer: Any
    generation: GenerationConfig
    java: str = "auto"
    spice_jars: str = ""

    def run(self, model: torch.nn.Module, results: Path, epoch: int = 0) -> dict[str, Any] | None:
        """The metrics on rank 0 (None on other ranks); a collective: every rank calls it."""
        preds, refs = caption_split(model, self.data.open(self.env, epoch), self.tokenizer, self.generation)
        merged = gather_predictions(preds, refs, self.env)
        if merged is None:
            return None
        return score_and_write(*merged, results, self.java, self.spice_jars, self.generation)


def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any] | None:
    """Caption cfg.split with the checkpoint's model; returns the metrics on rank 0 (None on other ranks)."""
    if not cfg.checkpoint or not cfg.data:
        raise ValueError("--checkpoint and --data are required")
    env = setup_distributed(cfg.device, cfg.dist_timeout_s)
    clean = False
    try:
        loaded = load_checkpoint(cfg.checkpoint)
        model = loaded.model.to(env.device)
        split = load_split(cfg.data, cfg.split, cfg.shard_base)
        check_dataset_matches(split, loaded.config, cfg.data, loaded.frames_per_clip)
        norm = loaded.norm_stats or {}
        data = EvalData(data=cfg.data, split=cfg.split, num_frames=int(loaded.config.num_frames),
                        batch_size=cfg.batch_size, norm_mean=float(norm.get("mean", AugmentConfig.norm_mean)),
                        norm_std=float(norm.get("std", AugmentConfig.norm_std)), shard_base=cfg.shard_base,
                        num_workers=cfg.num_workers, skip_bad_shards=cfg.skip_bad_shards, remote=cfg.remote)
        out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).with_name(f"eval-{cfg.split}.json")
        evaluator = Evaluator(env, data, loaded.tokenizer, generation_from_flags(cfg), cfg.java, cfg.spice_jars)
        scores = evaluator.run(model, out)
        if scores is not None:
            report = {"split": cfg.split, "results": str(out), **scores}
            if cfg.gallery:
                report["gallery"] = str(write_gallery(cfg.data, cfg.split, out=out.parent, results=out).html)
            print(json.dumps(report, indent=2))
        clean = True
        return scores
    finally:
        # Only a rank that finished waits for its peers; a failing one must not block on a dead peer.
        teardown_distributed(clean)


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser(EvalConfig, description="Caption a split with a checkpoint and score it.")

    def command() -> int:
        evaluate_checkpoint(EvalConfig(**vars(parser.parse_args(argv))))
        return 0
    return run_command("avcap.evaluate", command)


if __name__ == "__main__":
    sys.exit(main())
