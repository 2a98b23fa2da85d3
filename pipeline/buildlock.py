"""One build at a time per output directory and split: an exclusive lock held for the whole build.

Two builds of one split into one DIR (a served cron rebuild meeting a manual one) would rewrite each other's
shards, staged samples and ledger rows. `build_lock` holds `DIR/.build-{split}.lock` with flock(2) from the first
stage to the end of publishing. A second build exits at once with a message naming the holder (pid, start time,
host), or with `wait=True` (`--wait-lock`) waits for it.

flock is released by the kernel whenever its holder ends, SIGKILL included, so a lock file left behind by a dead
build is taken over without anyone deleting it; the file's text only names the holder. Written by hand: the
`filelock` package truncates the lock file on every attempt to take it, which erases the holder's name that the
refused build has to print.

The lock is re-entrant within one thread (the Prefect flow holds it around `run_build`, which takes it too);
another thread of the same process (two served flow runs) opens the file again and is refused or waits like
another process: flock locks belong to the open file, not to the process.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from shards.atomic import pid_alive

log = logging.getLogger("avcap.build")


class LockHeld(RuntimeError):
    """Another running build holds the lock (the message names it)."""


_held: dict[tuple[str, int], list[int]] = {}   # (lock path, thread) -> [fd, depth]: the locks held here
_held_guard = threading.Lock()


def lock_path(out: Path, split: str) -> Path:
    return Path(out) / f".build-{split}.lock"


def read_holder(path: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable or empty)."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}")


@contextmanager
def build_lock(out: Path, split: str, wait: bool = False) -> Iterator[None]:
    """Hold the build lock of (out, split) for the block; raise LockHeld when another build holds it (or wait
    for it with `wait`)."""
    path = lock_path(out, split)
    key = (str(path.absolute()), threading.get_ident())
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_when_written(path)
            if not wait:
                raise LockHeld(f"{out}: split {split!r} is being built by {describe(holder)}; wait for it to "
                               "finish, or pass --wait-lock to start when it is done") from None
            log.info("waiting for the build of %s (%s) by %s", split, out, describe(holder))
            fcntl.flock(fd, fcntl.LOCK_EX)
        before = read_holder(path)
        if before.get("pid") not in (None, os.getpid()) and not before.get("released"):
            alive = isinstance(before.get("pid"), int) and pid_alive(before["pid"])
            log.warning("taking over the build lock %s of %s (%s)", path, describe(before),
                        "its lock was released" if alive else "no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        with _held_guard:
            _held[key] = [fd, 1]
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
            # Marked released before unlocking: the next holder then knows this was no crash.
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({**me, "released": True}).encode(), 0)
    finally:
        os.close(fd)   # closing the descriptor releases the flock


def _holder_when_written(path: Path, timeout_s: float = 1.0) -> dict:
    """The holder writes its name right after taking the lock: give it a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        holder = read_holder(path)
        if (holder and not holder.get("released")) or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)
