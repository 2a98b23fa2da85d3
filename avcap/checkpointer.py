"""When and where a training run saves: OUT/checkpoints/latest.pt (every --ckpt-every steps, where --max-steps
stops the run mid-epoch, and at each epoch's end), best.pt and best.json (the best evaluation so far).

The format is avcap.checkpoint's (written atomically: a save killed mid-write leaves the previous file intact);
what the training state holds and how a resume reads it back is avcap.train_state's."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avcap.checkpoint import save_checkpoint
from avcap.distributed import DistEnv, gather_objects
from avcap.evaluate import selection_metric
from avcap.tokenizer import tokenizer_vocab
from shards.atomic import remove_stale_temps
from avcap.train_config import TrainConfig
from avcap.train_state import Position, training_state
from shards.atomic import atomic_copy, atomic_write_text


@dataclass
class _Saved:
    """What each save writes besides the position."""
    model: torch.nn.Module
    model_config: Any
    vocab: list[str]
    frames_per_clip: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


class Checkpointer:
    """Made before anything else of the run, so a killed save's temp file goes first; `track` then names what
    is saved. Every rank calls every method (saving gathers the RNG states); rank 0 writes the files."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.dir = Path(cfg.out) / "checkpoints"
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A save killed mid-write left its temp file beside the intact previous checkpoint: drop it.
            for stale in remove_stale_temps(self.dir):
                warnings.warn(f"removed {stale}, the partial checkpoint of a killed run")
        best = self.dir / "best.json"
        self.best: dict[str, Any] | None = json.loads(best.read_text()) if best.is_file() else None
        self.latest: Path | None = None   # the checkpoint this run last saved
        self._saved: _Saved | None = None

    def track(self, model: torch.nn.Module, model_config: Any, tokenizer: Any, frames_per_clip: int,
              optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
              scaler: torch.amp.GradScaler) -> None:
        self._saved = _Saved(model, model_config, tokenizer_vocab(tokenizer), frames_per_clip, optimizer, scheduler,
                             scaler)

    def save_if_due(self, pos: Position, batches_per_epoch: int, stop: bool) -> None:
        """Mid-epoch: every --ckpt-every steps, and where --max-steps stops the run (the epoch's end saves anyway)."""
        every = self.cfg.ckpt_every
        if pos.batch_in_epoch < batches_per_epoch and (stop or (every and pos.step % every == 0)):
            self.save(pos)

    def save_epoch_end(self, step: int, epoch: int) -> None:
        """Before evaluating, so a crash in evaluation does not cost the epoch; a resume starts the next one."""
        self.save(Position(step, epoch + 1, 0))

    def save(self, pos: Position) -> Path:
        assert self._saved is not None, "Checkpointer.track names what is saved"
        s = self._saved
        state = training_state(self.cfg, self.env, pos, s.optimizer, s.scheduler, s.scaler)  # collective
        path = self.dir / "latest.pt"
        if self.env.is_main:
            save_checkpoint(path, s.model, s.model_config, s.vocab,
                            norm_stats={"mean": self.cfg.norm_mean, "std": self.cfg.norm_std},
                            frames_per_clip=s.frames_per_clip, extra={"training": state})
        self.latest = path
        return path

    def keep_best(self, scores: dict[str, Any] | None, results: Path, epoch: int, step: int) -> None:
        """After an evaluation of the latest checkpoint (`scores`: Evaluator.run's, None off rank 0): keep it as
        best.pt when it beats best.json by CIDEr-D (SPIDEr when available)."""
        best = self.best
        if scores is not None:
            name, value = selection_metric(scores)
            if best is None or best.get("metric") != name or value > best["value"]:
                # A metric switch (jars added mid-run) restarts the comparison: values of different metrics
                # don't compare.
                best = {"metric": name, "value": value, "epoch": epoch, "step": step, "results": str(results)}
                assert self.latest is not None, "the epoch's checkpoint is saved before it is evaluated"
                atomic_copy(self.latest, self.dir / "best.pt")
                atomic_write_text(self.dir / "best.json", json.dumps(best, indent=2))
        # Every rank keeps the same notion of "best" (only rank 0 uses it, but keep state uniform).
        self.best = gather_objects(best, self.env)[0] if self.env.enabled else best
