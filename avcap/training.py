"""Training of the AVCap captioner from WebDataset shards, single process or torchrun/DDP: the loop.

The loop's collaborators each live in a module of their own: avcap.train_config (TrainConfig, the flags),
avcap.distributed (process group and collectives), avcap.optim (precision, AdamW, warmup-cosine; docs/original.md
§6), avcap.train_state (seeds, RNG and the checkpoint's training state; what a resume may change),
avcap.train_data (batches and on-device augmentation), avcap.checkpointer (when and where checkpoints are saved,
the best one kept), avcap.evaluate (`Evaluator`: caption and score the eval split) and avcap.train_log
(metrics.jsonl, TensorBoard, progress). Here: `train_step`, the one step train.py and benchmarks/bench_gpu.py
run, the model a run starts from, and `train(cfg)`: the loop.

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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from avcap.checkpoint import load_checkpoint, load_pretrained
from avcap.checkpointer import Checkpointer
from avcap.distributed import DistEnv, all_reduce_sum, setup_distributed, teardown_distributed
from avcap.evaluate import Evaluator
from avcap.foreign import tokenizer_source
from avcap.generate import generation_from_flags
from avcap.model import AVCap, AVCapConfig
from avcap.optim import Precision, build_optimizer, build_scheduler, resolve_precision
from avcap.tokenizer import load_tokenizer, special_ids, tokenizer_vocab
from avcap.train_config import TrainConfig, resolve_resume_path
from avcap.train_data import TrainData, check_dataset_matches, check_same_split_on_every_rank, eval_data_of
from avcap.train_log import RunLogger, StepStats
from avcap.train_state import (Position, check_eval_split, check_resume_config, derive_seed, refuse_resume_changes,
                               restore_training_state, seed_everything)
from shards.atomic import atomic_write_text
from shards.split_info import load_split


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
# the model a run starts from

def vocab_source(cfg: TrainConfig) -> str:
    """--vocab; else the tokenizer of --pretrained-text's Hugging Face folder or hub entry (they carry BERT's
    WordPiece vocab.txt, the one the decoder was trained with); else bert-base-uncased."""
    if cfg.vocab:
        return cfg.vocab
    return (tokenizer_source(cfg.pretrained_text) if cfg.pretrained_text else None) or "bert-base-uncased"


def build_model_config(cfg: TrainConfig, tokenizer: Any) -> AVCapConfig:
    """The preset, sized to the tokenizer (vocab size and special ids come from it, docs/original.md §1 "Text")."""
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


@dataclass
class ModelStart:
    """The model a run starts from: a fresh one (with --init-from / --pretrained-* weights) or --resume's."""
    model: AVCap
    config: AVCapConfig
    tokenizer: Any
    resume_state: dict[str, Any] | None = None      # the checkpoint's training state (--resume)
    resume_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # settings the resume changed
    frames_per_clip: int | None = None               # what the resumed checkpoint's model was trained on


def start_model(cfg: TrainConfig, env: DistEnv) -> ModelStart:
    if cfg.resume:
        resume_path = resolve_resume_path(cfg.resume, cfg.out)
        loaded = load_checkpoint(resume_path)
        resume_state = (loaded.extra or {}).get("training")
        if resume_state is None:
            raise ValueError(f"--resume {resume_path}: a captioner checkpoint without training state "
                             "(use --init-from to fine-tune from it)")
        check = check_resume_config(resume_state["train_config"], cfg, resume_state["world_size"], env)
        refuse_resume_changes(check, resume_path)
        if check.changed and env.is_main:
            print("[train] resuming with changed settings (the run from here on is not the uninterrupted one): " +
                  "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in check.changed.items()),
                  flush=True)
        return ModelStart(loaded.model, loaded.config, loaded.tokenizer, resume_state, check.changed,
                          loaded.frames_per_clip)
    tokenizer = load_tokenizer(vocab_source(cfg))
    model_config = build_model_config(cfg, tokenizer)
    seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = AVCap(model_config)
    if cfg.init_from:
        model.load_state_dict(load_checkpoint(cfg.init_from).model.state_dict())
    for path in (cfg.pretrained_encoder, cfg.pretrained_text):
        if path:
            report = load_pretrained(model, path)
            if env.is_main:
                print(f"[train] pretrained weights from {path}: {report}", flush=True)
    return ModelStart(model, model_config, tokenizer)


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


def _train(cfg: TrainConfig, env: DistEnv) -> TrainResult:
    checkpoints = Checkpointer(cfg, env)  # first: it removes the temp file of a save a killed run left
    run = _build(cfg, env)
    checkpoints.track(run.model, run.model_config, run.tokenizer, run.data.split.frames_per_clip, run.optimizer,
                      run.scheduler, run.scaler)
    evaluator = Evaluator(env, eval_data_of(cfg), run.tokenizer, generation_from_flags(cfg), cfg.java,
                          cfg.spice_jars)
    total_steps = run.steps_per_epoch * cfg.epochs
    logger = RunLogger(cfg, env, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps, run.pos.step)
    pos, bpe, last_loss, stop = run.pos, run.batches_per_epoch, None, False
    ahead_at = run.data.open_ahead_at()
    try:
        for epoch in range(pos.epoch, cfg.epochs):
            pos = Position(pos.step, epoch, pos.batch_in_epoch if epoch == pos.epoch else 0)
            # The loader skips the batches a resumed epoch already consumed (same order, same draws).
            t_open = time.perf_counter()
            batches = _EpochBatches(run.data, env, epoch, pos.batch_in_epoch, bpe)
            run.ddp_model.train()
            logger.start_epoch(epoch, pos.step, time.perf_counter() - t_open)
            while pos.batch_in_epoch < bpe:
                stats, missing_total = _optimizer_step(cfg, env, run, batches, pos)
                last_loss = stats.loss
                logger.log_step(stats, pos, bpe)
                batches.check(missing_total)
                stop = bool(cfg.max_steps) and pos.step >= cfg.max_steps
                if not stop and epoch + 1 < cfg.epochs and bpe - pos.batch_in_epoch <= ahead_at:
                    run.data.prefetch(epoch + 1)   # its workers start while this epoch's last batches train
                checkpoints.save_if_due(pos, bpe, stop)
                if stop:
                    break
            del batches  # ends the epoch's worker processes
            if stop and pos.batch_in_epoch < bpe:
                break
            checkpoints.save_epoch_end(pos.step, epoch)
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                results = Path(cfg.out) / "eval" / f"{cfg.eval_split}-epoch{epoch:03d}.json"
                scores = evaluator.run(run.model, results, epoch)
                logger.log_eval(scores, epoch, pos.step)
                checkpoints.keep_best(scores, results, epoch, pos.step)
            pos = Position(pos.step, epoch + 1, 0)
            if stop:
                break
    finally:
        run.data.close()
        logger.close()
    return TrainResult(step=pos.step, epoch=pos.epoch, last_loss=last_loss, best=checkpoints.best,
                       checkpoint=str(checkpoints.latest) if checkpoints.latest else None, is_main=env.is_main)


# -----------------------------------------------------------------------------
# what the loop drives

@dataclass
class _Run:
    model: torch.nn.Module        # the bare model: saved and evaluated
    ddp_model: torch.nn.Module    # the one stepped (DDP-wrapped when distributed)
    model_config: AVCapConfig
    tokenizer: Any
    data: TrainData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: Precision
    batches_per_epoch: int
    steps_per_epoch: int
    pos: Position                 # where the run starts (a resume's position)


def _build(cfg: TrainConfig, env: DistEnv) -> _Run:
    """Everything the loop drives, checked before the first step; OUT/vocab.txt and OUT/config.json written."""
    out = Path(cfg.out)
    split = load_split(cfg.data, cfg.train_split, cfg.shard_base)   # once: every epoch reads this shard list
    check_same_split_on_every_rank(split, env, cfg.data)
    check_eval_split(cfg)
    device = env.device
    precision = resolve_precision(cfg.precision, device)
    start = start_model(cfg, env)
    check_dataset_matches(split, start.config, cfg.data, start.frames_per_clip)
    model = start.model
    _apply_freeze(model, cfg)
    model.to(device)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if env.enabled else model

    # Loader workers tokenize from a vocab file: the run's own copy, so a resume needs no --vocab.
    vocab_file = out / "vocab.txt"
    if env.is_main:
        atomic_write_text(vocab_file, "".join(t + "\n" for t in tokenizer_vocab(start.tokenizer)))
    if env.enabled:
        dist.barrier()
    data = TrainData(cfg, split, env, vocab_file=str(vocab_file))
    bpe = data.batches_per_epoch()
    steps_per_epoch = math.ceil(bpe / cfg.grad_accum)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    pos = Position()
    if start.resume_state is not None:
        pos = restore_training_state(start.resume_state, cfg, env, optimizer, scheduler, scaler, steps_per_epoch)

    if env.is_main:
        run_info = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(start.config),
                    "world_size": env.world_size, "precision": precision.name, "batches_per_epoch": bpe,
                    "steps_per_epoch": steps_per_epoch, "train_samples": split.num_samples,
                    "frames_per_clip": split.frames_per_clip, "manifest": split.manifest_url,
                    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "resumed_at_step": pos.step if start.resume_state else None,
                    "resumed_changes": {k: list(v) for k, v in start.resume_changes.items()}}
        atomic_write_text(out / "config.json", json.dumps(run_info, indent=2, default=str))
    return _Run(model, ddp_model, start.config, start.tokenizer, data, optimizer, scheduler, scaler, precision, bpe,
                steps_per_epoch, pos)


def _apply_freeze(model: torch.nn.Module, cfg: TrainConfig) -> None:
    if not (cfg.freeze_encoder or cfg.freeze_text):
        return
    model.freeze_encoder(cfg.freeze_encoder)
    model.freeze_decoder(cfg.freeze_text)


class _DataMismatch(RuntimeError):
    pass


class _EpochBatches:
    """One epoch's batches from `start` on, read one ahead so that a rank knows it ran out before the step's
    collective; opening it is a collective too (a rank with no batch at all)."""

    def __init__(self, data: TrainData, env: DistEnv, epoch: int, start: int, total: int):
        self.env, self.epoch, self.consumed, self.total = env, epoch, start, total
        self._batches = data.open(epoch, start_batch=start)
        self._next = next(self._batches, None) if start < total else None
        self.check(all_reduce_sum(env, [self.missing()])[0])

    def missing(self) -> int:
        """1 when this rank has no batch left that the epoch still needs."""
        return int(self.consumed < self.total and self._next is None)

    def take(self) -> Any:
        batch = self._next
        self.consumed += 1
        self._next = next(self._batches, None) if self.consumed < self.total else None
        return batch

    def check(self, missing_total: float) -> None:
        if missing_total:
            # Every rank sees the same sum, so every rank raises here: no rank is left waiting in a collective.
            raise _DataMismatch(f"{int(missing_total)} of {self.env.world_size} rank(s) ran out of batches in epoch "
                                f"{self.epoch} after {self.consumed} of the {self.total} batches per epoch that the "
                                "manifest's counts promise: the shards disagree with manifest.json, or the loader "
                                "does not honour batches_per_epoch")


def _optimizer_step(cfg: TrainConfig, env: DistEnv, run: _Run, batches: _EpochBatches,
                    pos: Position) -> tuple[StepStats, float]:
    """One optimizer step over up to --grad-accum micro-batches (fewer at the epoch's end); `pos` moves on.
    Returns the step's stats and how many ranks ran out of batches (the same on every rank)."""
    micro = min(cfg.grad_accum, run.batches_per_epoch - pos.batch_in_epoch)
    loss_sum = torch.zeros((), device=env.device)
    n_samples = 0
    lr = run.optimizer.param_groups[0]["lr"]
    for m in range(micro):
        # Dropout and augmentation draw from the global RNG: make them a function of the position.
        torch.manual_seed(derive_seed(cfg.seed, "micro", pos.epoch, pos.step, m, env.rank))
        out = train_step(run.ddp_model, run.data.prepare(batches.take()), run.optimizer, run.scaler, run.precision,
                         micro=m, num_micro=micro, clip_grad=cfg.clip_grad)
        loss_sum += out.loss
        n_samples += out.samples
        pos.batch_in_epoch += 1
    run.scheduler.step()
    pos.step += 1
    # One collective per step: the mean loss for the log and whether any rank ran out of data.
    loss_total, samples_total, missing_total = all_reduce_sum(env, [float(loss_sum), n_samples, batches.missing()])
    loss_scale = float(run.scaler.get_scale()) if run.precision.name == "fp16" else None
    return StepStats(loss_total / env.world_size, lr, int(samples_total), out.grad_norm, loss_scale), missing_total
