"""What a run needs to continue exactly: seeds derived from (seed, epoch, step, rank), RNG states as plain types,
the position in the epoch, the checkpoint's training state, and the rules for what a resume may change."""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avcap.distributed import DistEnv, gather_objects
from avcap.optim import build_schedule
from avcap.train_config import TrainConfig
from shards.split_info import load_split


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple: stable across processes and Python runs (unlike hash()).

    Not shards.hashing.stable_hash, on purpose: that is blake2b-64 of the parts joined by ':', this the first 8
    bytes of a sha256 of them joined by '/', so the values differ, and switching would move every seed of every
    run (weight init, dropout, augmentation): resumed runs and recorded results would no longer reproduce."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


@dataclass
class Position:
    """Where a run stands: `step` optimizer steps done; in `epoch`, `batch_in_epoch` micro-batches consumed."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def training_state(cfg: TrainConfig, env: DistEnv, pos: Position, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Everything beyond the weights that a resume needs. Collective: every rank must call it."""
    rng = gather_objects(capture_rng_state(env.device), env)
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


def restore_training_state(state: dict[str, Any], cfg: TrainConfig, env: DistEnv, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler,
                           steps_per_epoch: int) -> Position:
    """The inverse of training_state: optimizer, schedule, scaler and this rank's RNG back as saved (this run's
    settings applied, see apply_resumed_settings); returns where the run stood. RNG states are restored only
    at the world size that saved them (a resume refuses another one; see check_resume_config)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    apply_resumed_settings(cfg, optimizer, scheduler, steps_per_epoch)
    rng = state["rng"]
    if len(rng) == env.world_size:
        restore_rng_state(rng[env.rank], env.device)
    return Position(state["step"], state["epoch"], state["batch_in_epoch"])


# The settings a resumed run may change: how long it runs, the learning-rate schedule and optimizer settings
# from the resumed step on, fault handling, where the shards are read from, evaluation effort, logging, the
# device. Every other TrainConfig field shapes the model or the data it sees (model preset and overrides, vocab,
# frames, augmentation, normalization, seed, batch and worker counts that fix the data order, the splits...)
# and must equal the checkpoint's: a new field is in that group unless it is added here (and to README.md's
# list, which tests/test_reliability_data.py compares with this one).
RESUME_MAY_CHANGE = ("epochs", "max_steps", "lr", "warmup_lr", "min_lr", "warmup_epochs", "decay_epochs",
                     "weight_decay", "beta1", "beta2", "clip_grad", "precision", "skip_bad_shards", "shard_base",
                     "out", "resume", "ckpt_every", "eval_every", "eval_batch_size", "beam_size", "max_gen_steps",
                     "per_node_beam", "length_penalty", "gen_precision", "remote",
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
    try:
        load_split(cfg.data, cfg.eval_split, cfg.shard_base)
    except ValueError as e:
        raise ValueError(f"--eval-split {cfg.eval_split!r} cannot be evaluated: {e}") from e
