"""Training of the AVCap captioner from WebDataset shards, single process or torchrun/DDP: the loop.

The loop's collaborators each live in a module of their own: avcap.train_config (TrainConfig, the flags),
avcap.distributed (process group and collectives), avcap.optim (precision, AdamW, warmup-cosine; docs/original.md
§6), avcap.train_state (seeds, RNG and the checkpoint's training state; what a resume may change) and
avcap.train_data (batches and on-device augmentation). Here: `train_step`, the one step train.py and
benchmarks/bench_gpu.py run, and `train(cfg)`.

Exact resume. All randomness that matters is a function of (seed, epoch, step, rank): the loader's shard and
sample shuffles are seeded by (seed, epoch), and the global torch RNG is reseeded before every micro-batch
from (seed, epoch, step, micro, rank), which drives on-device augmentation and dropout. A resumed run rebuilds
the epoch's loader from the batch it stopped at (shards.loader's start_batch: same order, same frame and caption
draws) and so sees the same data and the same random draws. RNG states are also saved (per rank) for anything
outside that scheme.

Uneven data never hangs DDP: every rank runs the manifest-derived batches_per_epoch, and the one all-reduce per
step (loss for the log) also carries "did any rank run out of batches", so every rank raises together instead of
one waiting in a collective; a rank that dies outright is bounded by --dist-timeout-s and torchrun's teardown.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from avcap.distributed import DistEnv, all_reduce_sum, gather_objects, setup_distributed, teardown_distributed
from avcap.generate import generation_from_flags
from avcap.optim import Precision, build_optimizer, build_scheduler, resolve_precision
from avcap.train_config import TrainConfig, resolve_resume_path
from avcap.train_data import TrainData, check_dataset_matches
from avcap.train_state import (Position, ResumeCheck, apply_resumed_settings, check_eval_split, check_resume_config,
                               derive_seed, refuse_resume_changes, restore_rng_state, seed_everything, training_state)
from shards.atomic import atomic_copy, atomic_write_text


# -----------------------------------------------------------------------------
# one training step (train() and benchmarks/bench_gpu.py run this same function)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # audio, visual, tokens, need_predict


@dataclass
class StepOutput:
    loss: torch.Tensor          # this micro-batch's loss / num_micro, detached, float32, on the device
    samples: int                # rows in the micro-batch
    stepped: bool               # the optimizer stepped (last micro-batch of the accumulation)
    grad_norm: float | None     # global L2 norm before clipping, when clip_grad > 0 and stepped


def train_step(model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               precision: Precision, *, micro: int = 0, num_micro: int = 1, clip_grad: float = 0.0) -> StepOutput:
    """Forward and backward of micro-batch `micro` of `num_micro` accumulated ones; after the last, the optimizer
    step (unscale, optional clipping, GradScaler step/update, zero_grad). `model` may be DDP-wrapped: gradients are
    all-reduced only on the last micro-batch. The caller seeds the RNG (dropout) before each call."""
    audio, visual, tokens, need_predict = batch
    last = micro == num_micro - 1
    sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()
    with sync:
        with precision.autocast(tokens.device):
            result = model(audio, visual, tokens, need_predict, return_logits=False)
        loss = result["loss"].float() / num_micro
        scaler.scale(loss).backward()
    out = StepOutput(loss=loss.detach(), samples=int(tokens.shape[0]), stepped=last, grad_norm=None)
    if last:
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            out.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return out


# -----------------------------------------------------------------------------
# logging

class RunLogger:
    """Rank 0 only: metrics.jsonl (one JSON object per line, appended across resumes), TensorBoard, tqdm."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, total_steps: int, start_step: int):
        self.active = env.is_main
        self.out = Path(cfg.out)
        self.tb = None
        self.bar = None
        if not self.active:
            return
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step or None)
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def progress(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


# -----------------------------------------------------------------------------
# model and data wiring

def vocab_source(cfg: TrainConfig) -> str:
    """--vocab; else the tokenizer of --pretrained-text's Hugging Face folder or hub entry (they carry BERT's
    WordPiece vocab.txt, the one the decoder was trained with); else bert-base-uncased."""
    if cfg.vocab:
        return cfg.vocab
    from avcap.foreign import tokenizer_source
    return (tokenizer_source(cfg.pretrained_text) if cfg.pretrained_text else None) or "bert-base-uncased"


def build_model_config(cfg: TrainConfig, tokenizer: Any) -> Any:
    """The preset, sized to the tokenizer (vocab size and special ids come from it, docs/original.md §1 "Text")."""
    from avcap.model import AVCapConfig
    from avcap.tokenizer import special_ids
    ids = special_ids(tokenizer)
    fields = dict(cls_id=ids.cls, sep_id=ids.sep, pad_id=ids.pad, vocab_size=len(tokenizer),
                  num_frames=cfg.num_frames, mode=cfg.mode)
    if cfg.model_overrides:
        try:
            overrides = json.loads(cfg.model_overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-overrides is not JSON: {e}") from e
        if not isinstance(overrides, dict):
            raise ValueError(f"--model-overrides must be a JSON object, got {cfg.model_overrides!r}")
        known = {f.name for f in dataclasses.fields(AVCapConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"--model-overrides: {unknown} are not AVCapConfig fields")
        fields.update(overrides)
    return AVCapConfig.tiny(**fields) if cfg.model == "tiny" else AVCapConfig.full(**fields)


# -----------------------------------------------------------------------------
# the loop

@dataclass
class TrainResult:
    step: int
    epoch: int
    last_loss: float | None
    best: dict[str, Any] | None
    checkpoint: str | None
    is_main: bool = True


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or continue, with cfg.resume) a training run. Call once per process; torchrun starts the processes."""
    env = setup_distributed(cfg.device, cfg.dist_timeout_s)
    clean = False
    try:
        result = _train(cfg, env)
        clean = True
        return result
    finally:
        teardown_distributed(clean)


class _DataMismatch(RuntimeError):
    pass



def _train(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    from avcap import checkpoint as ckpt_mod
    from avcap.model import AVCap
    from avcap.tokenizer import load_tokenizer, tokenizer_vocab
    from shards.split_info import load_split

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # A save killed mid-write left its temp file beside the intact previous checkpoint: drop it.
        for stale in ckpt_mod.remove_stale_temps(ckpt_dir):
            warnings.warn(f"removed {stale}, the partial checkpoint of a killed run")

    split = load_split(cfg.data, cfg.train_split, cfg.shard_base)
    check_eval_split(cfg)
    device = env.device
    precision = resolve_precision(cfg.precision, device)

    # Model: a fresh one from the config, or the one stored in the checkpoint we resume.
    resume_state: dict[str, Any] | None = None
    resume_check = ResumeCheck([], {})
    trained_frames: int | None = None
    if cfg.resume:
        resume_path = resolve_resume_path(cfg.resume, cfg.out)
        loaded = ckpt_mod.load_checkpoint(resume_path)
        model, model_config = loaded.model, loaded.config
        tokenizer = loaded.tokenizer
        resume_state = (loaded.extra or {}).get("training")
        trained_frames = loaded.frames_per_clip
        if resume_state is None:
            raise ValueError(f"--resume {resume_path}: a captioner checkpoint without training state "
                             "(use --init-from to fine-tune from it)")
        resume_check = check_resume_config(resume_state["train_config"], cfg, resume_state["world_size"], env)
        refuse_resume_changes(resume_check, resume_path)
        if resume_check.changed and env.is_main:
            print("[train] resuming with changed settings (the run from here on is not the uninterrupted one): " +
                  "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in resume_check.changed.items()),
                  flush=True)
    else:
        tokenizer = load_tokenizer(vocab_source(cfg))
        model_config = build_model_config(cfg, tokenizer)
        seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        model = AVCap(model_config)
        if cfg.init_from:
            loaded = ckpt_mod.load_checkpoint(cfg.init_from)
            model.load_state_dict(loaded.model.state_dict())
        for path in (cfg.pretrained_encoder, cfg.pretrained_text):
            if path:
                report = ckpt_mod.load_pretrained(model, path)
                if env.is_main:
                    print(f"[train] pretrained weights from {path}: {report}", flush=True)
    check_dataset_matches(split, model_config, cfg.data, trained_frames)
    _apply_freeze(model, cfg)
    model.to(device)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if env.enabled else model

    # Loader workers tokenize from a vocab file: the run's own copy, so a resume needs no --vocab.
    vocab_file = out / "vocab.txt"
    if env.is_main:
        atomic_write_text(vocab_file, "".join(t + "\n" for t in tokenizer_vocab(tokenizer)))
    if env.enabled:
        dist.barrier()
    loader = TrainData(cfg, split, env, vocab_file=str(vocab_file))
    bpe = loader.batches_per_epoch()
    steps_per_epoch = math.ceil(bpe / cfg.grad_accum)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")

    pos = Position()
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        apply_resumed_settings(cfg, optimizer, scheduler, steps_per_epoch)
        pos = Position(resume_state["step"], resume_state["epoch"], resume_state["batch_in_epoch"])
        rng = resume_state["rng"]
        if len(rng) == env.world_size:
            restore_rng_state(rng[env.rank], device)

    best = _read_best(ckpt_dir)
    if env.is_main:
        run_info = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_config),
                    "world_size": env.world_size, "precision": precision.name, "batches_per_epoch": bpe,
                    "steps_per_epoch": steps_per_epoch, "train_samples": split.num_samples,
                    "frames_per_clip": split.frames_per_clip, "manifest": split.manifest_url,
                    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "resumed_at_step": pos.step if resume_state else None,
                    "resumed_changes": {k: list(v) for k, v in resume_check.changed.items()}}
        atomic_write_text(out / "config.json", json.dumps(run_info, indent=2, default=str))

    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    logger = RunLogger(cfg, env, total_steps, pos.step)

    def save(name: str, p: Position) -> Path:
        state = training_state(cfg, env, p, optimizer, scheduler, scaler)  # collective
        path = ckpt_dir / name
        if env.is_main:
            ckpt_mod.save_checkpoint(path, model, model_config, tokenizer_vocab(tokenizer),
                                     norm_stats={"mean": cfg.norm_mean, "std": cfg.norm_std},
                                     frames_per_clip=split.frames_per_clip, extra={"training": state})
        return path

    last_loss: float | None = None
    last_ckpt: Path | None = None
    stop = False
    try:
        for epoch in range(pos.epoch, cfg.epochs):
            pos = Position(pos.step, epoch, pos.batch_in_epoch if epoch == pos.epoch else 0)
            # The loader skips the batches a resumed epoch already consumed (same order, same draws).
            batches = loader.open(epoch, train=True, start_batch=pos.batch_in_epoch)
            pending = next(batches, None) if pos.batch_in_epoch < bpe else None
            _check_data(env, all_reduce_sum(env, [int(pos.batch_in_epoch < bpe and pending is None)])[0],
                        epoch, pos.batch_in_epoch, bpe)

            ddp_model.train()
            t_last, samples_since = time.perf_counter(), 0
            while pos.batch_in_epoch < bpe:
                micro = min(cfg.grad_accum, bpe - pos.batch_in_epoch)
                loss_sum = torch.zeros((), device=device)
                n_samples = 0
                lr = optimizer.param_groups[0]["lr"]
                for m in range(micro):
                    # Dropout and augmentation draw from the global RNG: make them a function of the position.
                    torch.manual_seed(derive_seed(cfg.seed, "micro", epoch, pos.step, m, env.rank))
                    out = train_step(ddp_model, loader.prepare(pending, train=True), optimizer, scaler, precision,
                                     micro=m, num_micro=micro, clip_grad=cfg.clip_grad)
                    loss_sum += out.loss
                    n_samples += out.samples
                    pos.batch_in_epoch += 1
                    pending = next(batches, None) if pos.batch_in_epoch < bpe else None
                grad_norm = out.grad_norm
                scheduler.step()
                pos.step += 1

                # One collective per step: the mean loss for the log and whether any rank ran out of data.
                missing = int(pos.batch_in_epoch < bpe and pending is None)
                loss_total, samples_total, missing_total = all_reduce_sum(env, [float(loss_sum), n_samples, missing])
                last_loss = loss_total / env.world_size
                samples_since += int(samples_total)
                if pos.step % cfg.log_every == 0 or pos.batch_in_epoch >= bpe:
                    now = time.perf_counter()
                    rate = samples_since / max(now - t_last, 1e-9)
                    t_last, samples_since = now, 0
                    record = {"kind": "train", "step": pos.step, "epoch": epoch, "batch_in_epoch": pos.batch_in_epoch,
                              "loss": last_loss, "lr": lr, "samples_per_s": rate}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    if precision.name == "fp16":
                        record["loss_scale"] = float(scaler.get_scale())
                    logger.log(record, pos.step)
                logger.progress(1, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
                _check_data(env, missing_total, epoch, pos.batch_in_epoch, bpe)

                stop = bool(cfg.max_steps) and pos.step >= cfg.max_steps
                if pos.batch_in_epoch < bpe and (stop or (cfg.ckpt_every and pos.step % cfg.ckpt_every == 0)):
                    last_ckpt = save("latest.pt", Position(pos.step, epoch, pos.batch_in_epoch))
                if stop:
                    break
            del batches  # ends the epoch's worker processes
            if stop and pos.batch_in_epoch < bpe:
                break

            # Epoch end: checkpoint first (so a crash in evaluation does not cost the epoch), then evaluate.
            last_ckpt = save("latest.pt", Position(pos.step, epoch + 1, 0))
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                best = _evaluate_epoch(cfg, env, model, tokenizer, loader, precision, epoch, pos.step, best,
                                       last_ckpt, logger)
            pos = Position(pos.step, epoch + 1, 0)
            if stop:
                break
    finally:
        logger.close()
    return TrainResult(step=pos.step, epoch=pos.epoch, last_loss=last_loss, best=best,
                       checkpoint=str(last_ckpt) if last_ckpt else None, is_main=env.is_main)


def _check_data(env: DistEnv, missing_total: float, epoch: int, batch: int, bpe: int) -> None:
    if missing_total:
        # Every rank sees the same sum, so every rank raises here: no rank is left waiting in a collective.
        raise _DataMismatch(f"{int(missing_total)} of {env.world_size} rank(s) ran out of batches in epoch {epoch} "
                            f"after {batch} of the {bpe} batches per epoch that the manifest's counts promise: the "
                            "shards disagree with manifest.json, or the loader does not honour batches_per_epoch")


def _apply_freeze(model: torch.nn.Module, cfg: TrainConfig) -> None:
    if not (cfg.freeze_encoder or cfg.freeze_text):
        return
    model.freeze_encoder(cfg.freeze_encoder)
    model.freeze_decoder(cfg.freeze_text)


def _read_best(ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluate_epoch(cfg: TrainConfig, env: DistEnv, model: torch.nn.Module, tokenizer: Any, loader: "TrainData",
                    precision: Precision, epoch: int, step: int, best: dict[str, Any] | None, latest: Path,
                    logger: RunLogger) -> dict[str, Any] | None:
    """Caption the eval split, score on rank 0, keep the best checkpoint by CIDEr-D (SPIDEr when available)."""
    from avcap.evaluate import caption_split, gather_predictions, score_and_write, selection_metric

    # Generation has its own precision (--gen-precision), not the training one: see avcap.generate.
    gen = generation_from_flags(cfg)
    preds, refs = caption_split(model, loader.open(epoch, train=False), loader.prepare_eval, tokenizer, gen)
    merged = gather_predictions(preds, refs, env)
    if env.is_main:
        assert merged is not None
        results = Path(cfg.out) / "eval" / f"{cfg.eval_split}-epoch{epoch:03d}.json"
        scores = score_and_write(*merged, results, cfg.java, cfg.spice_jars, gen)
        name, value = selection_metric(scores)
        logger.log({"kind": "eval", "step": step, "epoch": epoch, "split": cfg.eval_split, "selection": name,
                    **{k: v for k, v in scores.items() if k != "unavailable"}}, step)
        if env.is_main and cfg.progress:
            from avcap.metrics import format_scores
            print(f"[eval] epoch {epoch} {cfg.eval_split}: {format_scores(scores)}", flush=True)
        if best is None or best.get("metric") != name or value > best["value"]:
            # A metric switch (jars added mid-run) restarts the comparison: values of different metrics don't compare.
            best = {"metric": name, "value": value, "epoch": epoch, "step": step, "results": str(results)}
            atomic_copy(latest, latest.with_name("best.pt"))
            atomic_write_text(latest.with_name("best.json"), json.dumps(best, indent=2))
    # Every rank keeps the same notion of "best" (only rank 0 uses it, but keep state uniform).
    return gather_objects(best, env)[0] if env.enabled else best
