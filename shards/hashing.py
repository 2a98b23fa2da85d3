"""The project's two hashes, each defined once: a file's sha256 (what manifests and member indexes record) and
the stable hash behind every seeded pick of the loader (shard order, sample order, frame, caption).

The sha256 of a file is taken here whether it is a local path (`file_sha256`), any open binary file such as an
fsspec one (`stream_sha256`) or bytes in memory (`bytes_sha256`).

Python's hash() of a str changes from process to process (PYTHONHASHSEED), so a DataLoader worker could not
reproduce another's picks with it; the stable hash is a pure function of its parts in every process and run.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

_CHUNK = 1 << 20


def stream_sha256(f: BinaryIO, chunk: int = _CHUNK) -> str:
    """Hex sha256 of what is left to read in an open binary file, read in `chunk`-sized blocks (shards are too
    large to read at once)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = _CHUNK) -> str:
    """Hex sha256 of a local file's bytes."""
    with open(path, "rb") as f:
        return stream_sha256(f, chunk)


def bytes_sha256(data: bytes | memoryview) -> str:
    """Hex sha256 of bytes already in memory (a member index as fetched)."""
    return hashlib.sha256(data).hexdigest()


def stable_hash(*parts: Any) -> int:
    """A 64-bit integer of `parts` (joined by their str with ':'), the same in every process and Python run."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")
