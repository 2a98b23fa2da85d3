"""Atomic, durable file writes: the one way this project finalizes a file.

A reader (a loader, a rerun after SIGKILL, an audit) must never see a half-written file under a finished name. So
every writer goes through a temp file in the same directory, named `.{name}.tmp-{pid}-{random}` (a leading dot
and a suffix: no glob or regex for finished files can match it), fsyncs it, renames it over the final name and
fsyncs the directory so the rename itself survives a crash.

The same scheme names every temporary file or directory of the project (shard and manifest writes, checkpoint
saves, download attempts, local publishing): `.{name}.tmp-{pid}-{random}`. `remove_stale_temps` is the one
cleaner: it removes only the temps whose pid is no longer running, so a build never deletes the live work of
another process (another build, a publish, a trainer) in the same directory.

`crash_point(name)` marks the moments between two durable writes that a rerun must recover from; the
crash-safety tests set AVCAP_CRASH_AT=name to have the process SIGKILL itself exactly there.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


CRASH_ENV = "AVCAP_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process here when the environment variable AVCAP_CRASH_AT equals `name`.

    A real kill (no cleanup, no finally blocks) at a named point is the only honest test of what a rerun
    recovers; a timing-based kill from outside cannot aim between two writes that are milliseconds apart.
    Points: `shard-renamed` (shards.writer: a shard renamed into place, the manifest not yet written) and
    `manifest-written` (pipeline.build: the manifest written, staged samples not yet deleted)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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


_TEMP_NAME = re.compile(r"\..+\.tmp-(\d+)(?:-[A-Za-z0-9_]+)?")


def temp_path(path: Path) -> Path:
    """A temp name next to `path` that carries this process's pid."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def temp_dir(directory: Path, name: str) -> Path:
    """A new temp directory `directory/.{name}.tmp-{pid}-{random}` (created now)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=directory))


def temp_owner(name: str) -> int | None:
    """The pid in a temp name of this scheme, or None for any other name."""
    m = _TEMP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files and directories in `directory` whose writer is dead (killed mid-write); those of
    running processes, and every name outside the scheme, are left alone. Returns what was removed."""
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir()):
        pid = temp_owner(p.name)
        if pid is None or pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


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
