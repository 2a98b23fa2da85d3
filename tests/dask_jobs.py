"""Clip functions for the Dask tests and benchmark; they run on Dask workers, so they live in an importable
module of their own (a test module's functions would drag pytest's collection state along)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.build import OK, ProcessJob, ProcessOutcome, process_clip


def logged_slow_clip(log_path: str, delay_s: float, job: ProcessJob) -> ProcessOutcome:
    """process_clip after `delay_s`, with "start"/"done" lines (key, worker pid) appended to `log_path`, so a
    test can see which clips a worker had finished when it was killed."""
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"start {job.key} {os.getpid()}\n")
    time.sleep(delay_s)
    outcome = process_clip(job)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"done {job.key} {os.getpid()}\n")
    return outcome


def noop_clip(job: ProcessJob) -> ProcessOutcome:
    """No media work at all: what is left is the cost of dispatching and recording a clip."""
    return ProcessOutcome(job.key, OK, media_sha256=job.media_sha256, duration=10.0)


def log_lines(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    return [(w[0], w[1], int(w[2])) for w in (line.split() for line in path.read_text().splitlines()) if len(w) == 3]
