"""The one record of a file the project vouches for: its path, sha256 and size.

A dataset manifest lists its input files (`FileEntry`) and its shards (`ShardEntry`: a file entry plus its sample
count and the entry of its member index sidecar); the shard writer returns `ShardEntry`s, the manifest stores
them, publishing and the audit check local files against them. Declared here, below all of those, so every layer
takes the same record instead of declaring its own copy of the three fields.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shards.hashing import file_sha256


class FileEntryError(ValueError):
    """A local file that is not the one its entry vouches for, or an entry that is not one.

    `what`: "missing", "size", "sha256" (a file against its entry) or "entry" (a malformed record);
    `detail`: the message without the file's name (str(error) starts with it)."""

    def __init__(self, where: str, what: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.what, self.detail = where, what, detail


def _field(d: dict, name: str, kind: type, where: str) -> Any:
    value = d[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FileEntryError(where, "entry", f"{name} {value!r} is not of type {kind.__name__}")
    return value


@dataclass(frozen=True)
class FileEntry:
    path: str          # relative to the dataset directory, posix (an input file: as the build was given it)
    sha256: str
    bytes: int

    @classmethod
    def of_file(cls, local: str | Path, path: str | None = None) -> "FileEntry":
        """The entry of the file at `local` as it is now, recorded under `path` (default: `local` itself)."""
        local = Path(local)
        return cls(path=str(local) if path is None else path, sha256=file_sha256(local),
                   bytes=local.stat().st_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def _checked(cls, d: Any, where: str) -> dict:
        """The fields of `d` as this class declares them; a missing, unknown or mistyped one is an error."""
        if not isinstance(d, dict):
            raise FileEntryError(where, "entry", f"expected an object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FileEntryError(where, "entry", f"unknown fields {unknown}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise FileEntryError(where, "entry", f"lacks fields {missing}")
        _field(d, "path", str, where)
        _field(d, "sha256", str, where)
        if _field(d, "bytes", int, where) < 0:
            raise FileEntryError(where, "entry", f"bytes {d['bytes']!r} is negative")
        return {k: d[k] for k in names if k in d}

    @classmethod
    def from_dict(cls, d: Any, where: str = "file entry") -> "FileEntry":
        return cls(**cls._checked(d, where))

    def mismatch(self, local: str | Path, listed_in: str = "the manifest") -> FileEntryError | None:
        """Why the file at `local` is not this entry (missing, other size, other sha256), or None when it is.

        Size first: a truncated shard is told apart without reading it whole."""
        local = Path(local)
        if not local.is_file():
            return FileEntryError(str(local), "missing", f"listed in {listed_in} but missing")
        size = local.stat().st_size
        if size != self.bytes:
            return FileEntryError(str(local), "size", f"{size} bytes, manifest says {self.bytes}")
        got = file_sha256(local)
        if got != self.sha256:
            return FileEntryError(str(local), "sha256", f"sha256 {got} does not match manifest {self.sha256}")
        return None

    def check(self, local: str | Path, listed_in: str = "the manifest") -> None:
        """Raise `FileEntryError` (naming the file and what differs) unless `local` is this entry's file."""
        problem = self.mismatch(local, listed_in)
        if problem is not None:
            raise problem


@dataclass(frozen=True)
class ShardEntry(FileEntry):
    """A shard in the manifest: its file, its sample count and its member index sidecar (manifest format 2;
    None for a format-1 shard, read by header parsing)."""
    num_samples: int
    index: FileEntry | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "shard entry") -> "ShardEntry":
        d = cls._checked(d, where)
        if _field(d, "num_samples", int, where) < 0:
            raise FileEntryError(where, "entry", f"num_samples {d['num_samples']!r} is negative")
        index = d.get("index")
        d["index"] = FileEntry.from_dict(index, f"{where} index") if index is not None else None
        return cls(**d)

    def files(self) -> list[FileEntry]:
        """The files of this shard: the shard, then its index when it has one."""
        return [self] + ([self.index] if self.index is not None else [])
