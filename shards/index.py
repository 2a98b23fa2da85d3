"""Member offset index of a shard: where each sample's member data lies in the tar, so a reader can jump to the
members it uses (fbank.npy, one frame, json) without parsing the other members' headers.

One sidecar per shard, next to it: `{split}-{i:05d}.tar` -> `{split}-{i:05d}.idx.json`, written by shards.writer
with the shard and listed in the manifest (path, sha256, bytes) under the shard's entry. The shard itself stays a
plain WebDataset tar; readers that ignore the index are unaffected.

Sidecar (canonical JSON: sorted keys, no spaces, so the same shard always gives the same index bytes):

    {
      "format_version": 1,
      "shard": "train-00000.tar",          # file name of the shard this index describes
      "shard_bytes": 123456,               # its size and sha256: a reader compares them with the manifest
      "shard_sha256": "<hex>",             # (and the size with the file), so a stale index is caught
      "members": ["fbank.npy", "flac", "frame00.jpg", ..., "json"],   # union of member suffixes, sorted
      "samples": [["<key>", [offset, ...], [size, ...]], ...]         # tar order; offset = first data byte,
    }                                                                 # aligned with "members", null if absent

Kept free of torch/webdataset imports: both the writer and the loader use it.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.hashing import bytes_sha256, file_sha256
from shards.sample_format import split_member_name

INDEX_FORMAT_VERSION = 1
INDEX_SUFFIX = ".idx.json"
TAR_BLOCK = 512


class ShardError(RuntimeError):
    """A shard cannot be read (truncated, corrupt, or disagreeing with the manifest); the message names it."""


class ShardIndexError(ShardError):
    """A shard's member index does not describe the shard (stale, swapped, or damaged); the message names both."""


def index_name(shard_name: str) -> str:
    """`train-00003.tar` -> `train-00003.idx.json` (never matches the shard name pattern)."""
    if not shard_name.endswith(".tar"):
        raise ValueError(f"shard name {shard_name!r} does not end with .tar")
    return shard_name[: -len(".tar")] + INDEX_SUFFIX


def index_path(shard_path: Path) -> Path:
    shard_path = Path(shard_path)
    return shard_path.with_name(index_name(shard_path.name))


@dataclass
class ShardIndex:
    shard: str
    shard_bytes: int
    shard_sha256: str
    members: list[str]
    keys: list[str]
    offsets: list[list[int | None]]
    sizes: list[list[int | None]]

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> bytes:
        obj = {"format_version": INDEX_FORMAT_VERSION, "shard": self.shard, "shard_bytes": self.shard_bytes,
               "shard_sha256": self.shard_sha256, "members": self.members,
               "samples": [[k, o, s] for k, o, s in zip(self.keys, self.offsets, self.sizes)]}
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "ShardIndex":
        """Parse and check the structure (not yet against the shard: see `check_shard`)."""
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or obj.get("format_version") != INDEX_FORMAT_VERSION:
            got = obj.get("format_version") if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{where}: index format_version {got!r} is not supported (this code reads "
                             f"{INDEX_FORMAT_VERSION})")
        try:
            members = [str(m) for m in obj["members"]]
            keys, offsets, sizes = [], [], []
            for row in obj["samples"]:
                key, off, size = row
                if len(off) != len(members) or len(size) != len(members):
                    raise ValueError(f"sample {key!r} lists {len(off)} offsets for {len(members)} members")
                keys.append(str(key))
                offsets.append(off)
                sizes.append(size)
            index = cls(shard=str(obj["shard"]), shard_bytes=int(obj["shard_bytes"]),
                        shard_sha256=str(obj["shard_sha256"]), members=members, keys=keys, offsets=offsets,
                        sizes=sizes)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed shard index ({e})") from e
        return index

    @classmethod
    def from_manifest_entry(cls, data: bytes, where: str, *, index_sha256: str | None, shard_name: str,
                            shard_bytes: int | None, shard_sha256: str | None) -> "ShardIndex":
        """Parse an index a reader fetched for a manifest entry and check it against that entry: the index's
        sha256, the shard's name, size (None: take the index's word) and sha256. ShardIndexError otherwise.

        The one check for the local and the remote indexed reader."""
        if index_sha256 is not None and bytes_sha256(data) != index_sha256:
            raise ShardIndexError(f"{where}: sha256 differs from the manifest's (stale or replaced index)")
        try:
            index = cls.from_json(data, where)
            index.check_shard(shard_name, index.shard_bytes if shard_bytes is None else shard_bytes, shard_sha256,
                              where)
        except ValueError as e:
            raise ShardIndexError(str(e)) from e
        return index

    def check_shard(self, name: str, size: int, sha256: str | None, where: str) -> None:
        """Raise ValueError unless this index describes the shard `name` of `size` bytes (and `sha256`, if known)."""
        problems = []
        if self.shard != name:
            problems.append(f"it indexes {self.shard!r}, not {name!r}")
        if self.shard_bytes != size:
            problems.append(f"it is for a shard of {self.shard_bytes} bytes, the shard has {size}")
        if sha256 is not None and self.shard_sha256 != sha256:
            problems.append(f"it is for shard sha256 {self.shard_sha256[:16]}..., the manifest says {sha256[:16]}...")
        if problems:
            raise ValueError(f"{where}: stale or mismatched index: {'; '.join(problems)}")


def scan_tar(path: Path, sha256: str | None = None) -> ShardIndex:
    """The index of a finished tar, read from its headers (tarfile seeks over the data).

    `sha256` of the file when the caller already has it (the writer hashes while writing); else computed here.
    A key that reappears after another key's members would be two webdataset samples of one key: refused.
    """
    path = Path(path)
    rows: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                key, suffix = split_member_name(ti.name)
                if not rows or rows[-1][0] != key:
                    rows.append((key, {}))
                if suffix in rows[-1][1]:
                    raise ValueError(f"sample {key!r} has member {suffix!r} twice")
                rows[-1][1][suffix] = (ti.offset_data, ti.size)
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar ({e})") from e
    keys = [k for k, _ in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: a sample key appears in two places (members not grouped by key)")
    members = sorted({m for _, ms in rows for m in ms})
    offsets = [[ms[m][0] if m in ms else None for m in members] for _, ms in rows]
    sizes = [[ms[m][1] if m in ms else None for m in members] for _, ms in rows]
    if sha256 is None:
        sha256 = file_sha256(path)
    return ShardIndex(shard=path.name, shard_bytes=path.stat().st_size, shard_sha256=sha256, members=members,
                      keys=keys, offsets=offsets, sizes=sizes)


def _header_size(header: bytes) -> int | None:
    field = bytes(header[124:136])
    try:
        return int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return None


def header_summary(header: bytes) -> str:
    """What a 512-byte tar header says, for an error message: "'name' (size bytes)"."""
    name = bytes(header[:100]).split(b"\0", 1)[0].decode("utf-8", "replace")
    size = _header_size(header)
    return f"{name!r} ({size if size is not None else 'unreadable size'} bytes)"


def header_matches(header: bytes, name: str, size: int) -> bool:
    """Whether a 512-byte tar header names `name` (first 100 bytes: long names are truncated there) with `size`.

    The reader checks the header just before every member it reads, so an index applied to the wrong bytes
    fails on the first sample instead of returning someone else's data.
    """
    raw = name.encode("utf-8")[:100]
    if header[: len(raw)] != raw or (len(raw) < 100 and header[len(raw)] != 0):
        return False
    return _header_size(header) == size


def check_member_header(header: bytes, name: str, size: int, offset: int, where: str) -> None:
    """Raise ShardIndexError unless the tar header in front of a member's data is the one its index promises.

    One check for the local and the remote indexed reader: it is what catches a shard replaced by another of the
    same name (whose index, still the old one, places members where the new shard has other data)."""
    if len(header) != TAR_BLOCK or not header_matches(header, name, size):
        raise ShardIndexError(f"{where}: its index places {name} ({size} bytes) at offset {offset}, but the tar "
                              f"header there disagrees: it names {header_summary(header)} (stale index or "
                              f"replaced shard)")
