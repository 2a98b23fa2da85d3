"""Training of the AVCap captioner from WebDataset shards, single process or torchrun/DDP.

The pieces, top to bottom:
- `TrainConfig`: every knob of a run; `train.py`'s flags are generated from its fields one-to-one.
- `setup_distributed`: torchrun env vars -> process group (nccl on GPU, gloo on CPU).
- `build_optimizer` / `WarmupCosine`: AdamW over trainable parameters, per-step warmup-cosine (docs/original.md §6).
- checkpoint state: everything needed to continue a run exactly, as plain types so that
  `torch.load(weights_only=True)` opens it; stored in avcap.checkpoint's `extra` so the same file also captions.
- `train(cfg)`: the loop.

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

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from avcap.generate import GenerationConfig, generation_from_flags
from shards.atomic import atomic_copy, atomic_write_text


# -----------------------------------------------------------------------------
# config

def _f(default: Any, help: str) -> Any:
    """A dataclass field carrying its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = _f("", "dataset directory or URL of its manifest.json (its shard paths resolve under it)")
    shard_base: str = _f("", "read the manifest's shard paths under this local path or URL instead (any fsspec "
                             "scheme, or 'pipe:CMD' with {path} where the path goes)")
    out: str = _f("runs/avcap", "run directory: config.json, metrics.jsonl, checkpoints/, tb/, eval results")
    train_split: str = _f("train", "split to train on")
    eval_split: str = _f("val", "split evaluated after each epoch (model selection); test is for the report")
    num_workers: int = _f(2, "loader worker processes per rank (decoding only)")
    shuffle_buffer: int = _f(1000, "sample shuffle buffer per worker")
    skip_bad_shards: bool = _f(False, "skip a damaged shard, or a sample that does not decode, with a warning "
                                      "instead of failing")
    noise: bool = _f(False, "noise + time-roll audio augmentation (the original README turns it on)")
    freqm: int = _f(48, "SpecAugment: widest frequency mask in mel bins (0: off; the original: 48)")
    timem: int = _f(192, "SpecAugment: widest time mask in frames (0: off; the original: 192)")
    norm_mean: float = _f(-4.346, "fbank normalization mean (AudioCaps default; the manifest also has the train split's)")
    norm_std: float = _f(4.332, "fbank normalization std")
    # model
    model: str = _f("full", "model size preset: full | tiny")
    num_frames: int = _f(1, "video frames per sample fed to the encoder (1, or an even number for Conv3d)")
    mode: str = _f("av", "encoder mode: av (audio-visual) | audio | visual")
    model_overrides: str = _f("", "JSON object of avcap.model.AVCapConfig fields overriding the preset, e.g. '{\"depth_a\": 2}'")
    vocab: str = _f("", "tokenizer: a local vocab.txt / tokenizer dir, or a hub name (default: the one that comes "
                        "with --pretrained-text when it is a Hugging Face folder or hub name, else "
                        "bert-base-uncased)")
    max_caption_tokens: int = _f(40, "wordpieces kept per caption (plus [CLS] and [SEP])")
    pretrained_encoder: str = _f("", "CAV-MAE checkpoint (.pth) to initialize the encoder from")
    pretrained_text: str = _f("", "GiT weights to initialize the text decoder from: a Hugging Face hub name "
                                  "(e.g. microsoft/git-base, from the local hub cache), a save_pretrained folder, "
                                  "a .safetensors file, or an original GiT .pt")
    init_from: str = _f("", "a trained captioner checkpoint to start from (weights only, a fresh run)")
    freeze_encoder: bool = _f(False, "freeze the audio-visual encoder")
    freeze_text: bool = _f(False, "freeze the text decoder (the projection stays trainable)")
    # optimization (docs/original.md §6 defaults)
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(8, "samples per rank per micro-batch")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(5e-7, "AdamW weight decay")
    beta1: float = _f(0.95, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    warmup_epochs: float = _f(1.0, "linear warmup length in epochs (applied per step)")
    warmup_lr: float = _f(2e-7, "learning rate at step 0")
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine")
    decay_epochs: float = _f(0.0, "epochs over which the cosine decays to min_lr (0: --epochs; original: 50)")
    clip_grad: float = _f(0.0, "clip the gradient's global L2 norm to this (0: off)")
    precision: str = _f("auto", "auto (bf16 on GPUs that support it, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)")
    seed: int = _f(1234, "seed of all randomness (shuffles, augmentation, dropout, init)")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0: run all epochs)")
    # checkpoints
    ckpt_every: int = _f(0, "also checkpoint every N optimizer steps (0: only at each epoch's end)")
    resume: str = _f("", "continue a run: a checkpoint path, or 'latest' for OUT/checkpoints/latest.pt")
    # evaluation
    eval_every: int = _f(1, "evaluate on --eval-split every N epochs (0: never)")
    eval_batch_size: int = _f(16, "samples per rank per evaluation batch")
    beam_size: int = _f(GenerationConfig.beam_size, GenerationConfig.help("beam_size"))
    per_node_beam: int = _f(GenerationConfig.per_node_beam, GenerationConfig.help("per_node_beam"))
    length_penalty: float = _f(GenerationConfig.length_penalty, GenerationConfig.help("length_penalty"))
    max_gen_steps: int = _f(GenerationConfig.max_steps, GenerationConfig.help("max_steps"))
    gen_precision: str = _f(GenerationConfig.precision, GenerationConfig.help("precision"))
    java: str = _f("auto", "metrics with Java (PTB tokenizer, METEOR, SPICE): auto (when found) | yes (required) | "
                           "no (the Python PTB tokenizer; METEOR/SPICE unavailable)")
    spice_jars: str = _f("", "directory with the Stanford CoreNLP 3.6.0 jars for SPICE/SPIDEr (optional)")
    # system
    device: str = _f("auto", "auto | cpu | cuda")
    dist_timeout_s: int = _f(600, "collective timeout: a rank that stops answering fails the run instead of hanging it")
    log_every: int = _f(1, "write a metrics.jsonl / TensorBoard line every N optimizer steps")
    tensorboard: bool = _f(True, "write TensorBoard scalars under OUT/tb")
    progress: bool = _f(True, "rank-0 tqdm progress bar")

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto|fp32|bf16|fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.model not in ("full", "tiny"):
            problems.append(f"model must be full|tiny, got {self.model!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_lr < 0:
            problems.append(f"learning rates must be positive (lr={self.lr}, min_lr={self.min_lr}, warmup_lr={self.warmup_lr})")
        if self.clip_grad < 0:
            problems.append(f"clip_grad must be >= 0, got {self.clip_grad}")
        try:  # at start, not at the first evaluation an epoch later
            generation_from_flags(self)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


def _arg_type(annotation: Any) -> type:
    # `from __future__ import annotations` makes annotations strings
    return {"str": str, "int": int, "float": float, "bool": bool}[annotation if isinstance(annotation, str) else annotation.__name__]


def build_arg_parser(cls: type = TrainConfig, description: str = "Train the AVCap captioner.") -> argparse.ArgumentParser:
    """One flag per dataclass field: `--field-name`, its type, its default, its help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _arg_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata.get("help", ""))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=f.metadata.get("help", ""))
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The config of train.py's command line. With --resume, a flag not given takes the checkpoint's value (so
    `--resume latest` alone continues the run as it was); a given one is checked by check_resume_config."""
    parser = build_arg_parser()
    values = vars(parser.parse_args(argv))
    if values["resume"]:
        unset = object()
        probe = build_arg_parser()
        probe.set_defaults(**{k: unset for k in values})
        given = {k for k, v in vars(probe.parse_args(argv)).items() if v is not unset}
        saved = _saved_train_config(resolve_resume_path(values["resume"], values["out"]))
        values.update({k: v for k, v in saved.items() if k in values and k not in given and k != "resume"})
    return TrainConfig(**values)


def _saved_train_config(path: Path) -> dict[str, Any]:
    from avcap.checkpoint import read_checkpoint_file
    state = read_checkpoint_file(path).get("training")
    if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
        raise ValueError(f"--resume {path}: a captioner checkpoint without training state "
                         "(use --init-from to fine-tune from it)")
    return state["train_config"]


# -----------------------------------------------------------------------------
# distributed

@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Read torchrun's env vars; start a process group when there is more than one process.

    nccl needs one GPU per process; gloo runs the same collectives on CPU (tests, CPU machines).
    The timeout turns a rank that never reaches a collective into an error instead of a hang.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed(clean: bool = True) -> None:
    if dist.is_initialized():
        if clean:
            # Ranks leave together: a rank tearing gloo down while its peer still holds the connection can abort
            # the peer at exit ("terminate called without an active exception") after a successful run.
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - the peer is already gone; nothing left to wait for
                pass
        dist.destroy_process_group()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple: stable across processes and Python runs (unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -----------------------------------------------------------------------------
# precision, optimizer, schedule

@dataclass
class Precision:
    name: str                      # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (GradScaler); use fp32 or bf16 on CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU does not support bf16; use fp16")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name=name, autocast_dtype=dtype)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that train; the original also handed frozen ones to AdamW (docs/original.md §6).

    The fused kernel (CPU and CUDA): one pass over each parameter's memory instead of one per elementwise op of
    the update (2.3x faster on CPU; same losses, parameters within float32 rounding of the per-op form)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: --freeze-encoder and --freeze-text froze the whole model")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             fused=True)


@dataclass
class WarmupCosine:
    """lr multiplier per optimizer step: linear warmup_lr -> lr, then cosine lr -> min_lr, then flat.

    A dataclass (not a lambda) so LambdaLR.state_dict() stores its fields as plain numbers.
    """
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr


def build_schedule(cfg: TrainConfig, steps_per_epoch: int) -> WarmupCosine:
    decay_epochs = cfg.decay_epochs or cfg.epochs
    return WarmupCosine(lr=cfg.lr, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                        total_steps=max(1, round(decay_epochs * steps_per_epoch)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, build_schedule(cfg, steps_per_epoch))


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
# RNG state as plain types (weights_only-loadable)

def capture_rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# training checkpoint state

def resolve_resume_path(resume: str, out: str) -> Path:
    path = Path(out) / "checkpoints" / "latest.pt" if resume == "latest" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no checkpoint at {path}")
    return path


def _gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@dataclass
class Position:
    """Where a run stands: `step` optimizer steps done; in `epoch`, `batch_in_epoch` micro-batches consumed."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def training_state(cfg: TrainConfig, env: DistEnv, pos: Position, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Everything beyond the weights that a resume needs. Collective: every rank must call it."""
    rng = _gather_objects(capture_rng_state(env.device), env)
    return {
        "format": "avcap-training-state/1",
        "train_config": dataclasses.asdict(cfg),
        "world_size": env.world_size,
        "step": pos.step,
        "epoch": pos.epoch,
        "batch_in_epoch": pos.batch_in_epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,  # one entry per rank
    }


# The settings a resumed run may change: how long it runs, the learning-rate schedule and optimizer settings
# from the resumed step on, fault handling, where the shards are read from, evaluation effort, logging, the
# device. Every other TrainConfig field shapes the model or the data it sees (model preset and overrides, vocab,
# frames, augmentation, normalization, seed, batch and worker counts that fix the data order, the splits...)
# and must equal the checkpoint's: a new field is in that group unless it is added here (and to README.md's
# list, which tests/test_reliability_data.py compares with this one).
RESUME_MAY_CHANGE = ("epochs", "max_steps", "lr", "warmup_lr", "min_lr", "warmup_epochs", "decay_epochs",
                     "weight_decay", "beta1", "beta2", "clip_grad", "precision", "skip_bad_shards", "shard_base",
                     "out", "resume", "ckpt_every", "eval_every", "eval_batch_size", "beam_size", "max_gen_steps",
                     "per_node_beam", "length_penalty", "gen_precision",
                     "java", "spice_jars", "device", "dist_timeout_s", "log_every", "tensorboard", "progress")
_RESUME_QUIET = ("out", "resume")   # differ on every resume: not worth a log line


@dataclass
class ResumeCheck:
    refused: list[str]                       # "field: checkpoint X, now Y" for fields that must match
    changed: dict[str, tuple[Any, Any]]      # allowed changes: field -> (checkpoint's value, this run's)


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, saved_world: int, env: DistEnv) -> ResumeCheck:
    """Compare this run's settings with the checkpoint's (fields the checkpoint predates are not compared)."""
    check = ResumeCheck([], {})
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved or saved[f.name] == getattr(cfg, f.name):
            continue
        old, new = saved[f.name], getattr(cfg, f.name)
        if f.name not in RESUME_MAY_CHANGE:
            check.refused.append(f"{f.name}: checkpoint {old!r}, now {new!r}")
        elif f.name not in _RESUME_QUIET:
            check.changed[f.name] = (old, new)
    if saved_world != env.world_size:
        check.refused.append(f"world size (number of processes): checkpoint {saved_world}, now {env.world_size}")
    return check


def refuse_resume_changes(check: ResumeCheck, path: Path) -> None:
    if check.refused:
        raise ValueError(f"--resume {path}: these settings shape the model or the data and must equal the "
                         f"checkpoint's (a resumed run continues the same run): " + "; ".join(check.refused) +
                         f". Settings that may change: {', '.join(RESUME_MAY_CHANGE)}")


def apply_resumed_settings(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LambdaLR, steps_per_epoch: int) -> None:
    """After loading the checkpoint's optimizer and scheduler state, make this run's settings the ones that run.

    load_state_dict restores the saved hyperparameters (each param group's lr, weight decay and betas, the
    schedule's fields), so without this a changed --lr or --weight-decay would be logged in config.json but
    silently not used. The schedule stays a function of the step: from the resumed step on it is this config's."""
    schedule = build_schedule(cfg, steps_per_epoch)
    scheduler.lr_lambdas = [schedule for _ in optimizer.param_groups]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    lr = cfg.lr * schedule(scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    scheduler._last_lr = [lr for _ in optimizer.param_groups]


def check_eval_split(cfg: TrainConfig) -> None:
    """A run that evaluates needs its eval split: missing or empty is an error before the first step, not after
    the first epoch."""
    if not cfg.eval_every:
        return
    from shards.split_info import load_split
    try:
        load_split(cfg.data, cfg.eval_split, cfg.shard_base)
    except ValueError as e:
        raise ValueError(f"--eval-split {cfg.eval_split!r} cannot be evaluated: {e}") from e


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


def check_dataset_matches(split: Any, model_config: Any, data: str, frames_per_clip: int | None = None) -> None:
    """Refuse a dataset whose frames per clip or fbank parameters disagree with the model, naming both.

    `split` is shards.split_info.SplitInfo (what the manifest says); `frames_per_clip` is what a checkpoint's model
    was trained with, when known (the eval frame F//2 and the train frame spacing depend on it).
    """
    problems = []
    nf = int(model_config.num_frames)
    if nf > split.frames_per_clip:
        problems.append(f"the model config takes num_frames={nf} per sample but the dataset {data} has "
                        f"{split.frames_per_clip} frames per clip")
    if frames_per_clip is not None and int(frames_per_clip) != split.frames_per_clip:
        problems.append(f"the checkpoint was trained on {frames_per_clip} frames per clip but the dataset {data} "
                        f"has {split.frames_per_clip}")
    for name, have, want in (("target_length", split.target_length, model_config.audio_length),
                             ("num_mel_bins", split.num_mel_bins, model_config.num_mel_bins)):
        if int(have) != int(want):
            problems.append(f"fbank {name}: the dataset {data} has {have}, the model config has {want}")
    rate = split.fbank.get("sample_frequency", split.fbank.get("sample_rate"))
    if rate is not None and int(rate) != 16000:
        problems.append(f"fbank sample rate: the dataset {data} has {rate} Hz, the encoder was pretrained on 16000 Hz")
    if problems:
        raise ValueError("dataset does not fit the model: " + "; ".join(problems))


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


def _agree(env: DistEnv, values: list[float]) -> list[float]:
    """Sum `values` over ranks (one collective). Used once per optimizer step for logging and the data check."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    if env.enabled:
        dist.all_reduce(t)
    return t.tolist()


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
    loader = _LoaderFactory(cfg, split, env, vocab_file=str(vocab_file))
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
            _check_data(env, _agree(env, [int(pos.batch_in_epoch < bpe and pending is None)])[0],
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
                loss_total, samples_total, missing_total = _agree(env, [float(loss_sum), n_samples, missing])
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


def _evaluate_epoch(cfg: TrainConfig, env: DistEnv, model: torch.nn.Module, tokenizer: Any, loader: "_LoaderFactory",
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
    return _gather_objects(best, env)[0] if env.enabled else best


class _LoaderFactory:
    """The seam between the training loop and shards.loader / shards.augment."""

    def __init__(self, cfg: TrainConfig, split: Any, env: DistEnv, vocab_file: str | None = None):
        self.cfg, self.split, self.env, self.vocab_file = cfg, split, env, vocab_file

    def _loader_config(self, train: bool) -> Any:
        from shards.loader import LoaderConfig
        cfg = self.cfg
        return LoaderConfig(data=cfg.data, shard_base=cfg.shard_base,
                            split=cfg.train_split if train else cfg.eval_split, train=train,
                            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                            num_frames=cfg.num_frames, num_workers=cfg.num_workers,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, skip_bad_shards=cfg.skip_bad_shards,
                            tokenizer=self.vocab_file if train else None,
                            max_caption_tokens=cfg.max_caption_tokens,
                            pin_memory=self.env.device.type == "cuda")

    def batches_per_epoch(self) -> int:
        from shards.epoch_plan import batches_per_epoch
        return int(batches_per_epoch(self.split, self.env.world_size, self.cfg.num_workers, self.cfg.batch_size,
                                     train=True))

    def open(self, epoch: int, train: bool, start_batch: int = 0) -> Iterator[Any]:
        from shards.loader import make_loader
        # Worker seeds derive from the global RNG when the loader starts: pin it to (seed, epoch, rank).
        torch.manual_seed(derive_seed(self.cfg.seed, "loader", epoch, self.env.rank, int(train)))
        batches, _ = make_loader(self._loader_config(train), self.env.rank, self.env.world_size, epoch,
                                 start_batch=start_batch)
        return iter(batches)

    def _augment_config(self) -> Any:
        from shards.augment import AugmentConfig
        return AugmentConfig(freqm=self.cfg.freqm, timem=self.cfg.timem, noise=self.cfg.noise,
                             norm_mean=self.cfg.norm_mean, norm_std=self.cfg.norm_std)

    def prepare(self, batch: Any, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmentation draws from the global RNG, which the loop reseeds per micro-batch."""
        from shards.augment import prepare_batch
        b = prepare_batch(batch, self._augment_config(), train=train, device=self.env.device)
        if "tokens" not in b:
            raise RuntimeError("the train loader produced no tokens (LoaderConfig.tokenizer unset)")
        return b["audio"], b["visual"], b["tokens"], b["need_predict"]

    def prepare_eval(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[str]]]:
        """Eval batches carry padding rows (valid=False) so every worker yields as many batches: drop them."""
        from shards.augment import prepare_batch
        b = prepare_batch(batch, self._augment_config(), train=False, device=self.env.device)
        valid = batch["valid"].tolist()
        keep = torch.tensor(valid, dtype=torch.bool, device=b["audio"].device)
        keys = [k for k, v in zip(batch["keys"], valid) if v]
        refs = [c for c, v in zip(batch["captions"], valid) if v]
        return b["audio"][keep], b["visual"][keep], keys, refs
