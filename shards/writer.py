"""Stage 6, Shards: one staged sample per new clip, then deterministic, atomic WebDataset shards.

Sample members and their codecs: shards.sample_format (this module writes the bytes it encodes).

One copy of each sample on disk. A finished sample lives in exactly one of two places (`split_samples` finds it):
- `DIR/staging/{split}/{key}.tar`: a sample made since the last shard build (written atomically, so a killed
  build keeps every sample it finished and a rerun only extracts the rest);
- a shard, read through its member index once the shard is proven intact (`verify_shard`: its sha256 is the one
  its index sidecar records). A staged tar wins over a shard copy of the same key.
A caption change of a sample in a shard is `DIR/staging/{split}/{key}.json`, the new json member alone, until
the shard is rewritten with it. After a split's shards and its manifest are written, the build deletes the
staged tars and json updates of the samples now in a shard (`discard_staged`), so only the shards remain.

An incremental build rewrites a shard from its old samples (read from the old shard itself) plus the staged
ones. A shard that fails verification is never read: its clips have no copy, and the build makes them again
from their media (pipeline.build.prepare_ledger says which shard and why). A sample whose only copy is a shard
that this build replaces without it (a clip left out by --limit, or one that moves to another shard when the
shard count changed) is staged again from that shard first.

Crash safety: staged copies are deleted only after the manifest is durable, and a shard renamed into place
just before a kill verifies against its own sidecar (written before the rename), so a rerun after a kill
between a shard's rename and the manifest's write, or between the manifest and the deletion, finds every
sample and writes the same bytes (`shards.atomic.crash_point` names both moments for the tests).

Shards: `DIR/shards/{split}/{split}-{i:05d}.tar`, sample i goes to shard `shard_index(key, num_shards)` =
sha256(key) mod num_shards. `num_shards` is fixed at a split's first build (`num_shards_for`) and recorded in the
manifest, so adding or removing a clip changes exactly one shard. Inside a shard samples are sorted by key and
members by name; tar headers are normalized (mtime 0, uid/gid 0, empty user/group names, mode 0644), so the same
samples always give the same bytes, whether they came from staging or from an old shard. A shard is written to
`.{name}.tmp-*` (never matching the shard name pattern), fsynced and renamed over the old file (a later build
removes the temp files of dead writers only); a shard whose bytes would not change is left untouched.

Member index: next to each shard, `{split}-{i:05d}.idx.json` (shards.index) gives every sample's member data
offsets and sizes and the shard's size and sha256, so the loader reads only the members it uses. It is derived
from the finished temp file and written (atomically, only if its bytes change) just before the shard is renamed
into place: a build killed in between leaves an index naming a sha256 that the manifest does not, which the
loader refuses, and a rerun rewrites it. Same shard bytes, same index bytes.
"""
from __future__ import annotations

import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline.features import FbankStats
from shards.atomic import (HashingFile, atomic_write_bytes, atomic_writer, crash_point, fsync_dir, remove_stale_temps,
                           temp_path)
from shards.file_entry import FileEntry, ShardEntry
from shards.hashing import bytes_sha256, file_sha256
from shards.index import TAR_BLOCK, ShardError, ShardIndex, check_member_header, index_path, scan_tar
from shards.sample_format import (FBANK_MEMBER, JSON_MEMBER, KEY_RE, REQUIRED_MEMBERS, SampleFormatError, decode_json,
                                  decode_npy, encode_json, frame_members, split_member_name, validate_key)

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
    """Stable shard of a sample: sha256 of the key, as an integer, modulo num_shards. A format rule, not the
    loader's stable_hash: changing it would move every sample to another shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return int(bytes_sha256(key.encode("utf-8")), 16) % num_shards


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


def staged_json_path(out_dir: Path, split: str, key: str) -> Path:
    """The json update of a sample that lives in a shard (new captions), until the shard is rewritten."""
    return Path(out_dir) / "staging" / validate_split(split) / f"{validate_key(key)}.json"


def read_staged_meta(path: Path) -> dict:
    """The json member of a staged sample, read alone (tarfile seeks over the audio and frames)."""
    try:
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                if ti.isfile() and split_member_name(ti.name)[1] == JSON_MEMBER:
                    return decode_json(tf.extractfile(ti).read(), f"staged sample {path}: {JSON_MEMBER}")
    except tarfile.TarError as e:
        raise ValueError(f"staged sample {path} is not a readable tar: {e}") from e
    raise ValueError(f"staged sample {path} has no json member")


# ---------------------------------------------------------------- shards

@dataclass
class ShardBuildResult:
    shards: list[ShardEntry]   # the manifest's records of the shards written or kept
    written: list[str] = field(default_factory=list)    # shard files whose bytes changed (or are new)
    unchanged: list[str] = field(default_factory=list)  # left untouched: same bytes as before
    removed: list[str] = field(default_factory=list)    # shards that became empty
    stats: FbankStats = field(default_factory=FbankStats)
    num_samples: int = 0
    keys: list[str] = field(default_factory=list)          # the samples now in the shards, sorted
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
    return bytes_sha256(data), len(data)


def _current_index(shard_path: Path, sha256: str, size: int) -> tuple[str, int] | None:
    """(sha256, bytes) of the existing sidecar when it already describes this shard, else None."""
    sidecar = index_path(shard_path)
    try:
        data = sidecar.read_bytes()
        ShardIndex.from_json(data, str(sidecar)).check_shard(shard_path.name, size, sha256, str(sidecar))
    except (OSError, ValueError):
        return None
    return bytes_sha256(data), len(data)


def build_shards(out_dir: Path, split: str, num_shards: int, keys: list[str] | None = None,
                 keep: Iterable[str] = ()) -> ShardBuildResult:
    """(Re)write `DIR/shards/{split}/` with the samples of `keys` (default: every sample the split has), each
    read from wherever it lives now (`split_samples`: staged, else an intact old shard, plus json updates).

    Deterministic: same samples -> same shard bytes, wherever they were read from. Shards whose bytes do not
    change are not rewritten; shards left without samples are deleted. `keep`: keys not in this build whose
    sample must survive it (a --limit run); a kept or moving sample whose only copy is a shard about to be
    replaced is staged again first. Staged copies are not deleted here (`discard_staged`, after the manifest).
    Also returns the fbank stats over real frames of all samples.
    """
    out_dir = Path(out_dir)
    validate_split(split)
    shards_dir = out_dir / "shards" / split
    samples = split_samples(out_dir, split)
    if keys is None:
        keys = samples.keys()
    missing = [k for k in keys if validate_key(k) not in samples]
    if missing:
        damaged = "".join(f"; {p.name} is not used: {why}" for p, why in sorted(samples.damaged.items()))
        raise FileNotFoundError(f"{len(missing)} samples of split {split!r} have no staged file in "
                                f"{out_dir / 'staging' / split} and are in no intact shard of {shards_dir}, "
                                f"e.g. {missing[:3]}{damaged}")
    groups: dict[int, list[str]] = {}
    for k in sorted(set(keys)):
        groups.setdefault(shard_index(k, num_shards), []).append(k)

    shards_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(shards_dir)
    _stage_samples_at_risk(samples, groups, num_shards, set(keep) - set(keys))
    result = ShardBuildResult(shards=[])
    # Stream each shard sample by sample, in key order (groups are built from sorted keys): a shard never has
    # to fit in memory, and an old shard is read while its replacement is written to a temp file.
    for idx in sorted(groups):
        name = shard_name(split, idx)
        path = shards_dir / name
        old = samples.indexes.get(path)
        old_keys = set(old.keys) if old is not None else _shard_keys(path)
        sha, size, written, (idx_sha, idx_size) = _write_shard_stream(
            path, samples.stream(groups[idx], result.stats))
        rel = path.relative_to(out_dir).as_posix()
        index = FileEntry(path=index_path(path).relative_to(out_dir).as_posix(), sha256=idx_sha, bytes=idx_size)
        result.shards.append(ShardEntry(path=rel, sha256=sha, bytes=size, num_samples=len(groups[idx]),
                                        index=index))
        (result.written if written else result.unchanged).append(rel)
        result.num_samples += len(groups[idx])
        result.keys += groups[idx]
        if written:
            result.added_keys += sorted(set(groups[idx]) - old_keys)
            result.removed_keys += sorted(old_keys - set(groups[idx]))
    pattern = shard_name_re(split)
    for p in sorted(shards_dir.iterdir()):
        m = pattern.match(p.name)
        if m and int(m.group(1)) not in groups:
            old = samples.indexes.get(p)
            result.removed_keys += sorted(set(old.keys) if old is not None else _shard_keys(p))
            p.unlink()
            index_path(p).unlink(missing_ok=True)
            result.removed.append(p.relative_to(out_dir).as_posix())
    result.keys.sort()
    result.added_keys.sort()
    result.removed_keys.sort()
    if result.removed:
        fsync_dir(shards_dir)
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
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            hf = HashingFile(f)
            _write_samples(hf, samples)
            f.flush()
            os.fsync(f.fileno())
        sha, size = hf.sha.hexdigest(), hf.size
        if path.exists() and path.stat().st_size == size and file_sha256(path) == sha:
            index = _current_index(path, sha, size) or write_shard_index(path, sha, scan_path=tmp)
            return sha, size, False, index
        index = write_shard_index(path, sha, scan_path=tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        crash_point("shard-renamed")
        return sha, size, True, index
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------- where each sample lives (one copy on disk)

_VERIFIED: dict[str, tuple[tuple, ShardIndex]] = {}   # shard path -> (file stamps, its index), per process


def verify_shard(path: Path) -> ShardIndex:
    """The member index of a shard on disk, once the shard is proven to be what its index describes (the sidecar
    parses, names it, and gives its size and its sha256, hashed here in full). ValueError saying why otherwise.

    The sidecar is the reference, not the manifest: it is written before the shard is renamed into place, so a
    shard renamed just before a kill, whose manifest entry was never written, is still known to be intact.
    Remembered per process while neither file changes (the stages of one build ask several times)."""
    path = Path(path)
    sidecar = index_path(path)
    try:
        st, sst = path.stat(), sidecar.stat()
    except FileNotFoundError as e:
        raise ValueError(f"{path.name}: no member index ({sidecar.name} missing)") from e
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, sst.st_ino, sst.st_size, sst.st_mtime_ns)
    hit = _VERIFIED.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    index = ShardIndex.from_json(sidecar.read_bytes(), str(sidecar))
    if index.shard != path.name or index.shard_bytes != st.st_size:
        raise ValueError(f"{path.name}: {st.st_size} bytes, its index {sidecar.name} describes "
                         f"{index.shard!r} of {index.shard_bytes} bytes (truncated or replaced)")
    sha = file_sha256(path)
    if sha != index.shard_sha256:
        raise ValueError(f"{path.name}: sha256 {sha[:16]}... differs from the {index.shard_sha256[:16]}... its "
                         f"index {sidecar.name} records (damaged)")
    _VERIFIED[str(path)] = (stamp, index)
    return index


def _read_shard_members(path: Path, index: ShardIndex, i: int, want: set[str] | None) -> dict[str, bytes]:
    """Members of sample i of a verified shard, at the offsets its index gives (each tar header checked)."""
    key = index.keys[i]
    members: dict[str, bytes] = {}
    with open(path, "rb") as f:
        for suffix, off, size in zip(index.members, index.offsets[i], index.sizes[i]):
            if off is None or (want is not None and suffix not in want):
                continue
            f.seek(off - TAR_BLOCK)
            check_member_header(f.read(TAR_BLOCK), f"{key}.{suffix}", size, off, f"shard {path}")
            data = f.read(size)
            if len(data) != size:
                raise ShardError(f"shard {path}: truncated in {key}.{suffix}")
            members[suffix] = data
    return members


@dataclass
class SplitSamples:
    """Where each finished sample of a split lies now (see the module docstring): `split_samples` makes one."""
    out_dir: Path
    split: str
    staged: set[str]                          # keys with a staged tar (the newest copy)
    updates: set[str]                         # keys with a staged json update (for their shard copy)
    in_shard: dict[str, tuple[Path, int]]     # key -> (intact shard holding it, its position there)
    indexes: dict[Path, ShardIndex]           # intact shards
    damaged: dict[Path, str]                  # shards that failed verification -> why (never read)

    def keys(self) -> list[str]:
        return sorted(self.staged | set(self.in_shard))

    def __contains__(self, key: str) -> bool:
        return key in self.staged or key in self.in_shard

    def members(self, key: str, want: set[str] | None = None) -> dict[str, bytes]:
        """The sample's members (`want`: only these suffixes); KeyError when the split has no copy of it."""
        if key in self.staged:
            sample = read_staged_sample(staged_path(self.out_dir, self.split, key))
            return {k: v for k, v in sample.members.items() if want is None or k in want}
        if key not in self.in_shard:
            raise KeyError(f"split {self.split!r} of {self.out_dir} has no sample {key!r} (not staged, in no "
                           "intact shard)")
        shard, i = self.in_shard[key]
        update = key in self.updates and (want is None or JSON_MEMBER in want)
        members = _read_shard_members(shard, self.indexes[shard], i,
                                      None if want is None else want - ({JSON_MEMBER} if update else set()))
        if update:
            members[JSON_MEMBER] = staged_json_path(self.out_dir, self.split, key).read_bytes()
        return members

    def sample(self, key: str) -> Sample:
        return Sample(key, self.members(key))

    def meta(self, key: str) -> dict:
        if key in self.staged:
            return read_staged_meta(staged_path(self.out_dir, self.split, key))
        return decode_json(self.members(key, {JSON_MEMBER})[JSON_MEMBER], f"sample {key}: {JSON_MEMBER}")

    def stream(self, keys: list[str], stats: FbankStats) -> Iterator[Sample]:
        """The samples of `keys` one at a time, adding each one's fbank to `stats`."""
        for k in keys:
            s = self.sample(k)
            stats.add(s.fbank, int(s.meta["fbank_frames"]))
            yield s

    def update_json(self, key: str, meta: dict) -> None:
        """Give a finished sample a new json member (new captions), audio and frames unchanged: a staged sample
        is rewritten; a sample in a shard gets a staged json update, which its shard's next rewrite takes in."""
        if key in self.staged:
            path = staged_path(self.out_dir, self.split, key)
            sample = read_staged_sample(path)
            write_staged_sample(path, Sample(key, {**sample.members, JSON_MEMBER: encode_json(meta)}))
            staged_json_path(self.out_dir, self.split, key).unlink(missing_ok=True)
            self.updates.discard(key)
            return
        if key not in self.in_shard:
            raise KeyError(f"split {self.split!r} of {self.out_dir} has no sample {key!r} to update")
        atomic_write_bytes(staged_json_path(self.out_dir, self.split, key), encode_json(meta))
        self.updates.add(key)

    def restage(self, key: str) -> None:
        """Copy a sample from its shard (json update applied) to a staged tar: the shard is about to go."""
        write_staged_sample(staged_path(self.out_dir, self.split, key), self.sample(key))
        staged_json_path(self.out_dir, self.split, key).unlink(missing_ok=True)
        self.staged.add(key)
        self.updates.discard(key)


def split_samples(out_dir: Path, split: str) -> SplitSamples:
    """Find every finished sample of `split`: staged tars and json updates, and the keys of each intact shard."""
    out_dir = Path(out_dir)
    staging = out_dir / "staging" / validate_split(split)
    shards_dir = out_dir / "shards" / split
    staged: set[str] = set()
    updates: set[str] = set()
    if staging.is_dir():
        for p in staging.iterdir():
            stem, dot, ext = p.name.rpartition(".")
            if dot and KEY_RE.match(stem):     # temp files (leading dot) never match a key
                (staged if ext == "tar" else updates if ext == "json" else set()).add(stem)
    found = SplitSamples(out_dir, split, staged, updates, {}, {}, {})
    if shards_dir.is_dir():
        pattern = shard_name_re(split)
        for p in sorted(shards_dir.iterdir()):
            if not pattern.match(p.name):
                continue
            try:
                index = verify_shard(p)
            except (OSError, ValueError) as e:
                found.damaged[p] = str(e)
                continue
            found.indexes[p] = index
            for i, k in enumerate(index.keys):
                found.in_shard.setdefault(k, (p, i))
    return found


def _stage_samples_at_risk(samples: SplitSamples, groups: dict[int, list[str]], num_shards: int,
                           kept: set[str]) -> None:
    """Stage again the samples whose only copy is a shard this build replaces without them: kept ones (not in
    this build) and ones whose shard number changed (a split rebuilt with another shard count)."""
    wanted = {k for ks in groups.values() for k in ks}
    pattern = shard_name_re(samples.split)
    for key, (shard, _) in sorted(samples.in_shard.items()):
        if key in samples.staged:
            continue
        moves = key in wanted and int(pattern.match(shard.name).group(1)) != shard_index(key, num_shards)
        if moves or key in kept:
            samples.restage(key)


def discard_staged(out_dir: Path, split: str, keys: Iterable[str]) -> int:
    """Delete the staged tars and json updates of `keys`, samples now in a shard; returns how many files went.

    Call only once the manifest listing those shards is durable: until then a rerun may need the staged copy.
    """
    removed = 0
    staging = Path(out_dir) / "staging" / validate_split(split)
    for key in keys:
        for p in (staged_path(out_dir, split, key), staged_json_path(out_dir, split, key)):
            try:
                p.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    if removed:
        fsync_dir(staging)
    return removed
