"""What a training run reports, on rank 0 only: OUT/metrics.jsonl (one JSON object per line, appended across
resumes: an "epoch" record as each epoch's first batch comes, a "train" record every --log-every steps and at
each epoch's end, an "eval" record per evaluation), TensorBoard scalars under OUT/tb, the tqdm bar and the
evaluation's one-line summary."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avcap.distributed import DistEnv
from avcap.evaluate import selection_metric
from avcap.metrics import format_scores
from avcap.train_config import TrainConfig
from avcap.train_state import Position


@dataclass
class StepStats:
    """One optimizer step as every rank sees it after the step's all-reduce."""
    loss: float                  # mean over ranks
    lr: float                    # the learning rate the step ran with
    samples: int                 # rows over all ranks
    grad_norm: float | None      # before clipping, when --clip-grad is on
    loss_scale: float | None     # the GradScaler's, under fp16


class RunLogger:
    """The run's records and progress; on ranks other than 0 every method is a no-op."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, total_steps: int, start_step: int):
        self.cfg = cfg
        self.active = env.is_main
        self.out = Path(cfg.out)
        self.tb = None
        self.bar = None
        self._t_last, self._samples_since = time.perf_counter(), 0
        if not self.active:
            return
        self.jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step or None)
        if cfg.progress:
            from tqdm import tqdm  # the bar only when asked for
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def start_epoch(self, epoch: int, step: int, loader_wait_s: float) -> None:
        """An "epoch" record: how long the epoch's first batch took to come once asked for (the loader's start
        when it was not opened ahead, the ranks' check of it included). samples_per_s counts from here."""
        self.log({"kind": "epoch", "step": step, "epoch": epoch, "loader_wait_s": loader_wait_s}, step)
        self._t_last, self._samples_since = time.perf_counter(), 0

    def log_step(self, stats: StepStats, pos: Position, batches_per_epoch: int) -> None:
        """Every rank calls it (the throughput window is kept everywhere); rank 0 writes."""
        self._samples_since += stats.samples
        if pos.step % self.cfg.log_every == 0 or pos.batch_in_epoch >= batches_per_epoch:
            now = time.perf_counter()
            rate = self._samples_since / max(now - self._t_last, 1e-9)
            self._t_last, self._samples_since = now, 0
            record = {"kind": "train", "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
                      "loss": stats.loss, "lr": stats.lr, "samples_per_s": rate}
            if stats.grad_norm is not None:
                record["grad_norm"] = stats.grad_norm
            if stats.loss_scale is not None:
                record["loss_scale"] = stats.loss_scale
            self.log(record, pos.step)
        self.progress(1, loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", epoch=pos.epoch)

    def log_eval(self, scores: dict[str, Any] | None, epoch: int, step: int) -> None:
        """`scores`: Evaluator.run's (None on ranks other than 0)."""
        if scores is None:
            return
        name, _ = selection_metric(scores)
        self.log({"kind": "eval", "step": step, "epoch": epoch, "split": self.cfg.eval_split, "selection": name,
                  **{k: v for k, v in scores.items() if k != "unavailable"}}, step)
        if self.active and self.cfg.progress:
            print(f"[eval] epoch {epoch} {self.cfg.eval_split}: {format_scores(scores)}", flush=True)

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
