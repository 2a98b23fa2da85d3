"""Stage 6, Shards: one staged sample per clip, then deterministic, atomic WebDataset shards.

Sample members and their codecs: shards.sample_format (this module writes the bytes it encodes).

Staging: `DIR/staging/{split}/{key}.tar` holds one finished sample (written atomically), so a killed build
keeps every sample it finished and a rerun only extracts the rest.

Shards: `DIR/shards/{split}/{split}-{i:05d}.tar`, sample i goes to shard `shard_index(key, num_shards)` =
sha256(key) mod num_shards. `num_shards` is fixed at a split's first build (`num_shards_for`) and recorded in the
manifest, so adding or removing a clip changes exactly one shard. Inside a shard samples are sorted by key and
members by name; tar headers are normalized (mtime 0, uid/gid 0, empty user/group names, mode 0644), so the same
samples always give the same bytes. A shard is written to `.{name}.tmp-*` (never matching the shard name
pattern), fsynced and renamed over the old file (a later build removes the temp files of dead writers only); a shard whose bytes would not change is left untouched.

Member index: next to each shard, `{split}-{i:05d}.idx.json` (shards.index) gives every sample's member data
offsets and sizes and the shard's size and sha256, so the loader reads only the members it uses. It is derived
from the finished temp file and written (atomically, only if its bytes change) just before the shard is renamed
into place: a build killed in between leaves an index naming a sha256 that the manifest does not, which the
loader refuses, and a rerun rewrites it. Same shard bytes, same index bytes.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.features import FbankStats
from shards.atomic import HashingFile as _HashingFile
from shards.atomic import atomic_write_bytes, atomic_writer, remove_stale_temps
from shards.atomic import fsync_dir as _fsync_dir
from shards.atomic import temp_path as _tmp_path
from shards.hashing import file_sha256
from shards.index import ShardIndex, index_path, scan_tar
from shards.sample_format import (FBANK_MEMBER, JSON_MEMBER, REQUIRED_MEMBERS, SampleFormatError, decode_json,
                                  decode_npy, frame_members, split_member_name, validate_key)

SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Tar header normalization: what makes two builds byte-identical.
TAR_MTIME = 0
TAR_MODE = 0o644


def validate_split(split: str) -> str:
    if not isinstance(split, str) or not SPLIT_RE.match(split):
        raise ValueError(f"bad split name {split!r}: letters, digits, '_', '-', '.' only (it names files)")
    return split


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def shard_name_re(split: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(split)}-(\d{{5}})\.tar$")


def shard_index(key: str, num_shards: int) -> int:
    """Stable shard of a sample: sha256 of the key, as an integer, modulo num_shards."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest(), "big") % num_shards


def num_shards_for(num_samples: int, samples_per_shard: int = 256) -> int:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    return max(1, math.ceil(num_samples / samples_per_shard))


# ---------------------------------------------------------------- staged samples

@dataclass
class Sample:
    """One sample as the writer reads and writes it: its key and its members (shards.sample_format)."""
    key: str
    members: dict[str, bytes]

    @property
    def meta(self) -> dict:
        return decode_json(self.members[JSON_MEMBER], f"sample {self.key}: {JSON_MEMBER}")

    @property
    def fbank(self) -> np.ndarray:
        return decode_npy(self.members[FBANK_MEMBER], f"sample {self.key}: {FBANK_MEMBER}")

    @property
    def frames(self) -> list[bytes]:
        return [self.members[m] for m in frame_members(self.members)]


def _tar_writer(stream) -> wds.TarWriter:
    return wds.TarWriter(stream, user="", group="", mode=TAR_MODE, mtime=TAR_MTIME, encoder=False)


def _write_samples(stream, samples) -> int:
    n = 0
    with _tar_writer(stream) as tw:
        for s in samples:
            tw.write({"__key__": s.key, **s.members})
            n += 1
    return n


def write_staged_sample(path: Path, sample: Sample) -> None:
    """Write one finished sample as a small tar, atomically (a killed worker never leaves a readable half)."""
    validate_key(sample.key)
    if Path(path).name != f"{sample.key}.tar":
        raise ValueError(f"staged sample {sample.key} must be written to '{sample.key}.tar', not {path}")
    with atomic_writer(Path(path)) as f:
        _write_samples(f, [sample])


def read_staged_sample(path: Path) -> Sample:
    path = Path(path)
    key = path.name[: -len(".tar")] if path.name.endswith(".tar") else path.name
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if not ti.isfile():
                    raise ValueError(f"{path}: unexpected tar entry {ti.name!r}")
                try:
                    k, member = split_member_name(ti.name)
                except SampleFormatError as e:
                    raise ValueError(f"{path}: {e}") from e
                if k != key:
                    raise ValueError(f"{path}: member {ti.name!r} does not belong to sample {key!r}")
                members[member] = tf.extractfile(ti).read()
    except tarfile.TarError as e:
        raise ValueError(f"staged sample {path} is not a readable tar: {e}") from e
    for required in REQUIRED_MEMBERS:
        if required not in members:
            raise ValueError(f"staged sample {path} lacks member {required!r}")
    return Sample(key, members)


def staged_path(out_dir: Path, split: str, key: str) -> Path:
    return Path(out_dir) / "staging" / validate_split(split) / f"{validate_key(key)}.tar"


# ---------------------------------------------------------------- shards

@dataclass
class IndexInfo:
    """The member index sidecar of a shard (shards.index)."""
    path: str          # relative to the output directory, posix
    sha256: str
    bytes: int


@dataclass
class ShardInfo:
    path: str          # relative to the output directory, posix
    sha256: str
    bytes: int
    num_samples: int
    index: IndexInfo | None = None


@dataclass
class ShardBuildResult:
    shards: list[ShardInfo]
    written: list[str] = field(default_factory=list)    # shard files whose bytes changed (or are new)
    unchanged: list[str] = field(default_factory=list)  # left untouched: same bytes as before
    removed: list[str] = field(default_factory=list)    # shards that became empty
    stats: FbankStats = field(default_factory=FbankStats)
    num_samples: int = 0
    added_keys: list[str] = field(default_factory=list)    # samples not in the shards before this build
    removed_keys: list[str] = field(default_factory=list)  # samples the shards held before and no longer do


def write_shard(path: Path, samples: list[Sample]) -> tuple[str, int, bool]:
    """Write `samples` (sorted here by key) as one shard, and its member index; returns (sha256, bytes, written).

    When `path` already holds exactly these bytes it is left untouched (written=False).
    """
    path = Path(path)
    samples = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {path.name}: duplicate sample keys")
    path.parent.mkdir(parents=True, exist_ok=True)
    sha, size, written, _ = _write_shard_stream(path, samples)
    return sha, size, written


def write_shard_index(shard_path: Path, sha256: str | None = None, scan_path: Path | None = None
                      ) -> tuple[str, int]:
    """Write the member index sidecar of `shard_path` (atomic; untouched if its bytes would not change).

    `scan_path`: read the headers there instead (the writer's temp file, same bytes as the shard will have).
    Returns the sidecar's (sha256, bytes), as the manifest records them.
    """
    shard_path = Path(shard_path)
    index = scan_tar(scan_path or shard_path, sha256)
    index.shard = shard_path.name
    data = index.to_json()
    sidecar = index_path(shard_path)
    if not (sidecar.exists() and sidecar.stat().st_size == len(data) and sidecar.read_bytes() == data):
        atomic_write_bytes(sidecar, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def _current_index(shard_path: Path, sha256: str, size: int) -> tuple[str, int] | None:
    """(sha256, bytes) of the existing sidecar when it already describes this shard, else None."""
    sidecar = index_path(shard_path)
    try:
        data = sidecar.read_bytes()
        ShardIndex.from_json(data, str(sidecar)).check_shard(shard_path.name, size, sha256, str(sidecar))
    except (OSError, ValueError):
        return None
    return hashlib.sha256(data).hexdigest(), len(data)


class _LazySamples:
    """Iterate staged samples one at a time so a shard never has to fit in memory."""

    def __init__(self, paths: list[Path], stats: FbankStats):
        self.paths, self.stats = paths, stats

    def __iter__(self):
        for p in self.paths:
            s = read_staged_sample(p)
            self.stats.add(s.fbank, int(s.meta["fbank_frames"]))
            yield s


def build_shards(out_dir: Path, split: str, num_shards: int, keys: list[str] | None = None) -> ShardBuildResult:
    """(Re)write `DIR/shards/{split}/` from `DIR/staging/{split}/`: the staged samples of `keys` (default: all).

    Deterministic: same staged samples -> same shard bytes. Shards whose bytes do not change are not rewritten;
    shards left without samples are deleted. Also returns the fbank stats over real frames of all samples.
    """
    out_dir = Path(out_dir)
    validate_split(split)
    staging = out_dir / "staging" / split
    shards_dir = out_dir / "shards" / split
    if keys is None:
        keys = sorted(p.name[: -len(".tar")] for p in staging.glob("*.tar") if not p.name.startswith("."))
    missing = [k for k in keys if not (staging / f"{validate_key(k)}.tar").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} samples of split {split!r} have no staged file in {staging}, "
                                f"e.g. {missing[:3]}")
    groups: dict[int, list[str]] = {}
    for k in sorted(set(keys)):
        groups.setdefault(shard_index(k, num_shards), []).append(k)

    shards_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(shards_dir)
    result = ShardBuildResult(shards=[])
    # Stream each shard straight from its staged files, in key order (groups are built from sorted keys).
    for idx in sorted(groups):
        name = shard_name(split, idx)
        old_keys = _shard_keys(shards_dir / name)
        lazy = _LazySamples([staging / f"{k}.tar" for k in groups[idx]], result.stats)
        sha, size, written, (idx_sha, idx_size) = _write_shard_stream(shards_dir / name, lazy)
        rel = (shards_dir / name).relative_to(out_dir).as_posix()
        index = IndexInfo(path=index_path(shards_dir / name).relative_to(out_dir).as_posix(), sha256=idx_sha,
                          bytes=idx_size)
        result.shards.append(ShardInfo(path=rel, sha256=sha, bytes=size, num_samples=len(groups[idx]),
                                       index=index))
        (result.written if written else result.unchanged).append(rel)
        result.num_samples += len(groups[idx])
        if written:
            result.added_keys += sorted(set(groups[idx]) - old_keys)
            result.removed_keys += sorted(old_keys - set(groups[idx]))
    pattern = shard_name_re(split)
    for p in sorted(shards_dir.iterdir()):
        m = pattern.match(p.name)
        if m and int(m.group(1)) not in groups:
            result.removed_keys += sorted(_shard_keys(p))
            p.unlink()
            index_path(p).unlink(missing_ok=True)
            result.removed.append(p.relative_to(out_dir).as_posix())
    result.added_keys.sort()
    result.removed_keys.sort()
    if result.removed:
        _fsync_dir(shards_dir)
    return result


def _shard_keys(path: Path) -> set[str]:
    """Sample keys of an existing shard, from its tar headers only (tarfile seeks over the data)."""
    if not path.exists():
        return set()
    try:
        with tarfile.open(path, "r:") as tf:
            return {split_member_name(ti.name)[0] for ti in tf if ti.isfile()}
    except (tarfile.TarError, SampleFormatError):
        return set()  # a damaged old shard is simply replaced; its keys cannot be told apart


def _write_shard_stream(path: Path, samples) -> tuple[str, int, bool, tuple[str, int]]:
    """Write samples (already in key order) to a temp file; rename over `path` only if the bytes differ.

    The member index goes first (from the temp file), then the shard: see the module docstring for why.
    Returns (sha256, bytes, written, (index sha256, index bytes)).
    """
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            hf = _HashingFile(f)
            _write_samples(hf, samples)
            f.flush()
            os.fsync(f.fileno())
        sha, size = hf.sha.hexdigest(), hf.size
        if path.exists() and path.stat().st_size == size and file_sha256(path) == sha:
            index = _current_index(path, sha, size) or write_shard_index(path, sha, scan_path=tmp)
            return sha, size, False, index
        index = write_shard_index(path, sha, scan_path=tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return sha, size, True, index
    finally:
        if tmp.exists():
            tmp.unlink()
