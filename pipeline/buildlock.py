"""One build at a time per output directory and split: an exclusive lock held for the whole build.

Two builds of one split into one DIR (a served cron rebuild meeting a manual one) would rewrite each other's
shards, staged samples and ledger rows. `build_lock` holds `DIR/.build-{split}.lock` from the first stage to
the end of publishing. A second build exits at once with a message naming the holder (pid, start time, host),
or with `wait=True` (`--wait-lock`) waits for it.

The lock is a POSIX record lock (fcntl F_SETLK, `fcntl.lockf`): the kernel drops it when the holding process
ends, SIGKILL included, and, unlike flock(2), a child the build forks does not inherit it, so no leftover
descendant can keep a dead build's lock. A lock file left behind is therefore simply taken over; its text only
names the holder. Record locks belong to the process, so threads of one process are told apart here
(`_held`), and the holder never opens the lock file a second time (closing any descriptor of the file would
drop the lock). Written by hand: the `filelock` package truncates the lock file on every attempt to take it,
which erases the holder's name that the refused build has to print.

Re-entrant within one thread (the Prefect flow holds it around `run_build`, which takes it too); another
thread of the same process (two served flow runs) is refused or waits like another process.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from shards.atomic import pid_alive

log = logging.getLogger("avcap.build")


class LockHeld(RuntimeError):
    """Another running build holds the lock (the message names it)."""


@dataclass
class _Held:
    fd: int
    thread: int
    depth: int
    holder: dict


_held: dict[str, _Held] = {}        # lock path -> the lock this process holds on it
_changed = threading.Condition()    # guards _held; notified when a lock of this process is released


def lock_path(out: Path, split: str) -> Path:
    return Path(out) / f".build-{split}.lock"


def read_holder(path: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable or empty). Never called by the holder."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


@contextmanager
def build_lock(out: Path, split: str, wait: bool = False) -> Iterator[None]:
    """Hold the build lock of (out, split) for the block; raise LockHeld when another build holds it (or wait
    for it with `wait`)."""
    path = lock_path(out, split)
    key = str(path.absolute())
    me = threading.get_ident()
    with _changed:
        while key in _held and _held[key].thread != me:
            if not wait:
                raise LockHeld(_refusal(out, split, _held[key].holder))
            _changed.wait()
        if key in _held:
            _held[key].depth += 1
            reentered = True
        else:
            _held[key] = _Held(fd=-1, thread=me, depth=1, holder={})   # reserved while the file is locked
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _changed:
                _held[key].depth -= 1
        return

    try:
        fd, holder = _acquire(path, out, split, wait)
    except BaseException:
        with _changed:
            del _held[key]
            _changed.notify_all()
        raise
    with _changed:
        _held[key].fd, _held[key].holder = fd, holder
    try:
        yield
    finally:
        with _changed:
            del _held[key]
            _changed.notify_all()
        try:
            # Marked released before unlocking: the next holder then knows this was no crash.
            _write(fd, {**holder, "released": True})
        finally:
            os.close(fd)   # releases the record lock


def _acquire(path: Path, out: Path, split: str, wait: bool) -> tuple[int, dict]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder_when_written(path)
            if not wait:
                raise LockHeld(_refusal(out, split, holder)) from None
            log.info("waiting for the build of %s (%s) by %s", split, out, describe(holder))
            fcntl.lockf(fd, fcntl.LOCK_EX)
        before = _read_fd(fd)
        if before.get("pid") not in (None, os.getpid()) and not before.get("released"):
            alive = isinstance(before.get("pid"), int) and pid_alive(before["pid"])
            log.warning("taking over the build lock %s of %s (%s)", path, describe(before),
                        "its lock was released" if alive else "no longer running")
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write(fd, holder)
        return fd, holder
    except BaseException:
        os.close(fd)
        raise


def _refusal(out: Path, split: str, holder: dict) -> str:
    return (f"{out}: split {split!r} is being built by {describe(holder)}; wait for it to finish, or pass "
            "--wait-lock to start when it is done")


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _read_fd(fd: int) -> dict:
    """The lock file's text through the holder's own descriptor (another open and close would drop the lock)."""
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _holder_when_written(path: Path, timeout_s: float = 1.0) -> dict:
    """The holder writes its name right after taking the lock: give it a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        holder = read_holder(path)
        if (holder and not holder.get("released")) or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)
