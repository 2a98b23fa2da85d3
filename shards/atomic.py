"""Atomic, durable file writes: the one way this project finalizes a file.

A reader (a loader, a rerun after SIGKILL, an audit) must never see a half-written file under a finished name. So
every writer goes through a temp file in the same directory, named `.{name}.tmp-{pid}-{random}` (a leading dot
and a suffix: no glob or regex for finished files can match it), fsyncs it, renames it over the final name and
fsyncs the directory so the rename itself survives a crash.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


class HashingFile:
    """File wrapper that hashes and counts what is written (tarfile's stream mode only calls write)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_writer(path: Path) -> Iterator[HashingFile]:
    """Write `path` via a temp file in the same directory: fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            hf = HashingFile(f)
            yield hf
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: Path, dst: Path) -> None:
    with atomic_writer(dst) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)


def finalize(produced: Path, final: Path) -> None:
    """Make a file another program wrote (e.g. yt-dlp's output) durable, then rename it into place."""
    with open(produced, "rb") as f:
        os.fsync(f.fileno())
    os.replace(produced, final)
    fsync_dir(Path(final).parent)
