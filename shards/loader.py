"""Streaming loader over the dataset's shards: workers only read and decode, augmentation runs on the device.

Pipeline per (rank, worker) "slot", rebuilt every epoch:

    manifest shard list ─► epoch plan (deterministic shard shuffle by (seed, epoch), split by rank and worker)
        ─► shard reader (reads only the members a sample uses)
        ─► sample shuffle buffer (train) ─► decode fbank.npy / the chosen JPEG frame(s) / json ─► batches

Why not webdataset's tar iteration: it parses every member with `tarfile` and reads every member's bytes, about
0.6 ms per 23-member sample before any decoding, which alone exceeds the decode cost of the members a training
step uses (fp16 fbank 0.17 ms, one 224² JPEG 0.4 ms). Two readers here:
- IndexedShardReader (local shards whose manifest entry lists a member index, shards.index): one mmap per shard,
  each used member is a zero-copy slice at the offset the index gives; no tar header is parsed except the one
  in front of each member read, which is checked against the index (name and size), so a stale index fails on
  its first sample. The index itself is checked against the manifest (its sha256, the shard's size and sha256).
- RemoteShardReader (shards.remote: http(s)://, s3://, gs://, ... shards with an index): ranged reads of the used
  members only, coalesced, several requests in flight, retried on transient errors; same header check.
- TarSampleReader (any other shard: manifest format 1, hand-made datasets, `pipe:` URLs): parses the 512-byte
  ustar headers itself and skips unused members (a seek on local files, a discarding read on streams). Shards
  are opened as local files, with webdataset's `gopen` (`pipe:`) or as fsspec streams (any other URL). A
  manifest only ever names relative paths (shards.manifest.check_manifest); `pipe:` and other locations come
  from the user's `shard_base` alone.

Batch counts are a function of the manifest alone, so every rank knows them without communication:
- train: every rank yields exactly `batches_per_epoch = max(1, total // (world_size * batch_size))` batches; a
  slot whose shards hold fewer samples than its quota wraps around (re-reads its shards, reshuffled), so uneven
  shards never leave a DDP rank waiting on another;
- a sample that does not decode (skip_bad_shards) is skipped and the next one takes its row, so the counts
  above hold; a resumed epoch then decodes the batches it skips, since the skipped samples decide where it is;
- eval: every clip is read exactly once across all ranks and workers; when a split has fewer shards than
  slots, the slots that share a shard take every k-th sample of it. Every worker yields the same number of
  batches, padded with repeated samples whose `valid` flag is False, which the caller drops after gathering.

Randomness in the workers is a pure function of (seed, epoch, slot, clip key), never of timing or worker
scheduling: the train frame (window) and the train caption per sample are picked by a hash of
(seed, epoch, pass, key), so workers decode only the frames used. Resuming mid-epoch with `start_batch=k`
yields exactly the batches k.. of the uninterrupted epoch (skipped samples are read but not decoded).

Batches are dicts of CPU tensors / lists:
    fbank        float16 [B, T, M]        unnormalized (T=1024, M=128), as stored
    frames       uint8   [B, nf, 3, H, W] the chosen consecutive frames (H=W=224), a channels-last view: memory is
                                          [B, nf, H, W, 3], the JPEG decoder's layout, because transposing on
                                          the loader's core costs ~40 µs per frame; shards.augment makes it
                                          contiguous on the training device
    frame_index  int64   [B]              index of the first chosen frame
    keys         list[str]
    captions     list[list[str]]          every caption of the clip (the references in eval)
    caption      list[str]                train: one caption picked per sample; eval: the first
    valid        bool    [B]              False for eval padding (duplicates to drop)
    tokens, need_predict  int64 [B, L]    only when LoaderConfig.tokenizer is set (avcap.tokenizer)
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _decode

from shards.index import ShardError, ShardIndex, ShardIndexError, check_member_header
from shards.remote import (RemoteConfig, RemoteReadError, RemoteShardReader, RemoteStore, SlotCache, is_remote,
                           storage_options)

log = logging.getLogger(__name__)

TAR_BLOCK = 512


@dataclass
class LoaderConfig:
    data: str                        # dataset directory, or the URL / path of its manifest.json
    shard_base: str = ""             # read the manifest's shard paths under this path / URL (pipe: too)
    split: str = "train"
    batch_size: int = 8
    num_workers: int = 2             # decode workers per rank; 0 decodes in the calling process
    shuffle_buffer: int = 200        # samples per worker (each holds ~0.3 MB of undecoded bytes)
    seed: int = 0
    num_frames: int = 1              # consecutive frames per sample
    train: bool = True               # train: shuffles, wrap-around, random frame; eval: exactly once, middle frame
    skip_bad_shards: bool = False    # warn and skip a damaged shard instead of raising ShardError
    tokenizer: str | None = None     # vocab path / hub name: workers also emit tokens + need_predict
    max_caption_tokens: int = 40
    prefetch_factor: int = 4
    pin_memory: bool = False
    remote: RemoteConfig = field(default_factory=RemoteConfig)   # timeouts, retries, requests in flight


@dataclass
class ShardInfo:
    url: str
    num_samples: int
    bytes: int | None = None          # size and sha256 from the manifest, when it records them
    sha256: str | None = None
    index_url: str | None = None      # member index sidecar (manifest format 2), else header parsing
    index_sha256: str | None = None


@dataclass
class SplitInfo:
    """What the loader needs from the dataset manifest for one split."""
    split: str
    shards: list[ShardInfo]
    frames_per_clip: int
    manifest_url: str
    fbank: dict[str, Any] = field(default_factory=dict)
    target_length: int = 1024
    num_mel_bins: int = 128

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


# -----------------------------------------------------------------------------
# manifest

def load_split(data: str, split: str, shard_base: str = "") -> SplitInfo:
    """Read the shard list of `split` from the dataset manifest (a directory or a manifest URL).

    The manifest is read and checked by shards.manifest (relative paths only, each shard once, counts that add
    up); every shard and index path resolves under the manifest's location, or under `shard_base` when the user
    gives one (shards.manifest.resolve_path)."""
    from shards.manifest import ManifestError, read_manifest, resolve_path
    url, raw = read_manifest(data)
    splits = raw["splits"]
    if split not in splits:
        raise ManifestError(f"dataset manifest {url} has no split {split!r} (splits: {sorted(splits)})")
    entry = splits[split]
    if not entry["shards"]:
        raise ManifestError(f"dataset manifest {url}: split {split!r} lists no shards")
    shards = []
    for s in entry["shards"]:
        index = s.get("index")
        shards.append(ShardInfo(resolve_path(url, s["path"], shard_base), s["num_samples"],
                                bytes=int(s["bytes"]) if s.get("bytes") is not None else None,
                                sha256=s.get("sha256"),
                                index_url=resolve_path(url, index["path"], shard_base) if index else None,
                                index_sha256=index["sha256"] if index else None))
    if not sum(s.num_samples for s in shards):
        raise ManifestError(f"dataset manifest {url}: split {split!r} holds no samples")
    # Two manifest shapes: the pipeline's (shards.manifest: per split, fingerprint_parts.extract/fbank) and a
    # flat one (top-level frames_per_clip / fbank) that hand-made test datasets use.
    parts = entry.get("fingerprint_parts") or {}
    frames = (parts.get("extract") or {}).get("frames", raw.get("frames_per_clip"))
    if frames is None:
        raise ManifestError(f"dataset manifest {url}: split {split!r} does not say its frames per clip")
    fbank = parts.get("fbank") or raw.get("fbank") or {}
    return SplitInfo(split=split, shards=shards, frames_per_clip=int(frames), manifest_url=url, fbank=dict(fbank),
                     target_length=int(fbank.get("target_length", 1024)),
                     num_mel_bins=int(fbank.get("num_mel_bins", 128)))


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL (plain path or file://), else None."""
    scheme = urlparse(url).scheme
    if scheme == "":
        return url
    return urlparse(url).path if scheme == "file" else None


def open_url(url: str, remote: RemoteConfig | None = None) -> IO[bytes]:
    """Open a local path, a `pipe:` command (webdataset's gopen) or any fsspec URL (http(s), s3, gs, ...) as a
    stream. Remote URLs go through fsspec, not webdataset's gopen, which would run a `curl` binary."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return open(urlparse(url).path if scheme == "file" else url, "rb")
    if scheme == "pipe":
        import importlib
        wds_gopen = importlib.import_module("webdataset.gopen")   # the package re-exports a function of that name
        return wds_gopen.gopen(url, "rb")
    import fsspec
    protocol = fsspec.utils.get_protocol(url)
    # block_size=0: one streaming GET over HTTP instead of a request per 5 MB block
    extra = {"block_size": 0} if protocol in ("http", "https") else {}
    return fsspec.open(url, "rb", **extra, **storage_options(protocol, remote or RemoteConfig())).open()


# -----------------------------------------------------------------------------
# lean tar reading

class TarSampleReader:
    """Iterates the samples of one webdataset tar, reading only the members a caller asks for.

    Members are grouped by key (the name up to the first dot of its basename), as webdataset does. For each
    sample the caller's `want(key)` returns the set of member suffixes to read (empty: skip the sample); the
    other members' data is seeked past. Truncation, a bad header checksum or a missing end-of-archive marker is
    a ShardError naming the shard URL.
    """

    def __init__(self, url: str, remote: RemoteConfig | None = None):
        self.url = url
        self.f: Any = open_url(url, remote)
        self.mm: mmap.mmap | None = None
        if isinstance(self.f, io.BufferedReader):
            # Local file: map it, so reading a member is a slice and skipping one moves a pointer (no syscalls).
            try:
                self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:   # an empty file cannot be mapped; reading it reports the truncation
                self.mm = None
        self.src: Any = self.mm if self.mm is not None else self.f
        # Only local files seek; a remote stream (fsspec's HTTP stream cannot seek) skips by reading.
        self.seekable = self.mm is not None or isinstance(self.f, io.BufferedReader)
        self.pending: tuple[str, str, int] | None = None   # a header read ahead: (key, suffix, size)
        self.offset = 0

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        self.f.close()

    def _read_upto(self, n: int) -> bytes:
        """Up to n bytes, fewer only at the end: a stream's read may return less than asked for."""
        b = self.src.read(n)
        if len(b) == n or self.seekable or not b:
            return b
        parts = [b]
        got = len(b)
        while got < n and (more := self.src.read(n - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _read(self, n: int) -> bytes:
        b = self._read_upto(n)
        if len(b) != n:
            raise ShardError(f"shard {self.url}: truncated tar (wanted {n} bytes at offset {self.offset}, got {len(b)})")
        self.offset += n
        return b

    def _skip(self, n: int) -> None:
        if self.seekable:
            self.src.seek(n, os.SEEK_CUR)
            self.offset += n
            return
        while n > 0:
            k = min(n, 1 << 20)
            self._read(k)
            n -= k

    def _next_header(self) -> tuple[str, str, int] | None:
        """Next regular member as (key, suffix, size), data not yet consumed; None at the end of the archive."""
        longname = None
        while True:
            hdr = self._read_upto(TAR_BLOCK)
            if len(hdr) == 0:
                raise ShardError(f"shard {self.url}: truncated tar (no end-of-archive marker at offset {self.offset})")
            if len(hdr) != TAR_BLOCK:
                raise ShardError(f"shard {self.url}: truncated tar (partial header at offset {self.offset})")
            self.offset += TAR_BLOCK
            if hdr[0] == 0 and hdr.count(0) == TAR_BLOCK:   # a member name never starts with NUL
                return None
            # A misaligned or corrupt read shows as a missing ustar magic; only headers without it (old v7 tars)
            # pay for the checksum (the header's byte sum with the checksum field read as spaces).
            if hdr[257:262] != b"ustar":
                try:
                    stored = int(hdr[148:156].rstrip(b"\0 ").decode() or "0", 8)
                except ValueError:
                    stored = -1
                if stored != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
                    raise ShardError(f"shard {self.url}: corrupt tar header at offset {self.offset - TAR_BLOCK}")
            size_field = hdr[124:136]
            size = (int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80
                    else int(size_field.rstrip(b"\0 ").decode() or "0", 8))
            padded = (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
            typeflag = hdr[156:157]
            if typeflag == b"L":         # GNU long name: the data is the next member's name
                longname = self._read(padded)[:size].rstrip(b"\0").decode()
                continue
            if typeflag == b"x":         # pax header: only 'path' matters here
                for rec in self._read(padded)[:size].decode().splitlines():
                    _, _, kv = rec.partition(" ")
                    k, _, v = kv.partition("=")
                    if k == "path":
                        longname = v
                continue
            if typeflag not in (b"0", b"\0", b"7"):
                self._skip(padded)
                longname = None
                continue
            if longname is not None:
                name, longname = longname, None
            else:
                name = hdr[:100].split(b"\0", 1)[0].decode()
                if hdr[257:262] == b"ustar" and hdr[345] != 0:
                    name = hdr[345:500].split(b"\0", 1)[0].decode() + "/" + name
            base = name.rsplit("/", 1)[-1]
            if "." not in base:
                raise ShardError(f"shard {self.url}: member {name!r} has no suffix (not a webdataset layout)")
            stem, suffix = base.split(".", 1)
            key = name[: len(name) - len(base)] + stem
            return key, suffix, size

    def samples(self, want) -> Iterator[tuple[str, dict[str, bytes] | None]]:
        """Yields (key, {suffix: bytes}) per sample, or (key, None) for a sample `want(key)` declined."""
        hdr = self._next_header()
        while hdr is not None:
            key = hdr[0]
            wanted = want(key)
            members: dict[str, bytes] = {}
            while hdr is not None and hdr[0] == key:
                _, suffix, size = hdr
                padded = (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
                if wanted and suffix in wanted:
                    members[suffix] = self._read(padded)[:size]
                else:
                    self._skip(padded)
                hdr = self._next_header()
            yield key, (members if wanted else None)


class IndexedShardReader:
    """Reads a local shard through its member index: used members are zero-copy slices of one mmap.

    Same interface as TarSampleReader. The slices keep the mapping alive after close() (the file descriptor is
    closed at once; the mapping goes when the last slice does), so rows can wait in the shuffle buffer.
    """

    def __init__(self, shard: ShardInfo):
        self.url = shard.url
        path = local_path(shard.url)
        if path is None or shard.index_url is None:
            raise ValueError(f"IndexedShardReader needs a local shard with an index, got {shard}")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if shard.bytes is not None and size != shard.bytes:
                raise ShardError(f"shard {self.url}: {size} bytes, the manifest says {shard.bytes} "
                                 f"(truncated or replaced)")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        where = f"index {shard.index_url} of shard {self.url}"
        try:
            with open_url(shard.index_url) as f:
                raw = f.read()
        except OSError as e:
            raise ShardIndexError(f"{where}: listed in the manifest but cannot be read ({e})") from e
        if shard.index_sha256 is not None and hashlib.sha256(raw).hexdigest() != shard.index_sha256:
            raise ShardIndexError(f"{where}: sha256 differs from the manifest's (stale or replaced index)")
        try:
            self.index = ShardIndex.from_json(raw, where)
            self.index.check_shard(Path(path).name, size, shard.sha256, where)
        except ValueError as e:
            raise ShardIndexError(str(e)) from e
        self.member_pos = {m: j for j, m in enumerate(self.index.members)}

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        self.mm = None   # see the class docstring: slices handed out may still use the mapping

    def samples(self, want) -> Iterator[tuple[str, dict[str, memoryview] | None]]:
        """Yields (key, {suffix: bytes view}) per sample in tar order, or (key, None) for one `want` declined."""
        index, mm = self.index, self.mm
        view = memoryview(mm) if mm is not None else memoryview(b"")
        end = len(view)
        for i, key in enumerate(index.keys):
            wanted = want(key)
            if not wanted:
                yield key, None
                continue
            offsets, sizes = index.offsets[i], index.sizes[i]
            members: dict[str, memoryview] = {}
            for suffix in wanted:
                j = self.member_pos.get(suffix)
                if j is None or offsets[j] is None:
                    continue   # the batcher names missing members
                off, size = offsets[j], sizes[j]
                if off < TAR_BLOCK or off + size > end:
                    raise ShardIndexError(f"shard {self.url}: its index places {key}.{suffix} ({size} bytes) at "
                                          f"offset {off}, outside the shard's {end} bytes (stale index)")
                check_member_header(view[off - TAR_BLOCK:off], f"{key}.{suffix}", size, off, f"shard {self.url}")
                members[suffix] = view[off:off + size]
            yield key, members


def is_remote_indexed(shard: ShardInfo) -> bool:
    return shard.index_url is not None and is_remote(shard.url)


def open_shard_reader(shard: ShardInfo, store: RemoteStore | None = None, cache: SlotCache | None = None
                      ) -> IndexedShardReader | RemoteShardReader | TarSampleReader:
    """The reader for a shard: through its member index when it has one (a local mmap, or ranged reads of a
    remote URL through `store`), else header parsing of the whole stream (`pipe:`, shards without an index)."""
    if shard.index_url is not None and local_path(shard.url) is not None:
        return IndexedShardReader(shard)
    if is_remote_indexed(shard):
        return RemoteShardReader(shard, store or RemoteStore(), cache)
    return TarSampleReader(shard.url, store.cfg if store is not None else None)


# -----------------------------------------------------------------------------
# epoch plan

@dataclass
class SlotPart:
    """Samples of one shard read by one slot: those with index % stride == offset."""
    shard: int       # index into SplitInfo.shards
    stride: int = 1
    offset: int = 0

    def count(self, num_samples: int) -> int:
        return len(range(self.offset, num_samples, self.stride))


def _hash_int(*parts: Any) -> int:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def plan_epoch(info: SplitInfo, num_slots: int, seed: int, epoch: int, train: bool) -> list[list[SlotPart]]:
    """Which samples each of `num_slots` (= world_size x workers, slot = rank*workers + worker) reads this epoch.

    Shards are shuffled by (seed, epoch) in train and kept in manifest order in eval. With at least as many
    shards as slots, slot s takes whole shards s, s+S, ...; otherwise slots share shards sample by sample, so
    eval still reads every clip exactly once.
    """
    order = list(range(len(info.shards)))
    if train:
        random.Random(_hash_int("shards", seed, epoch)).shuffle(order)
    n = len(order)
    if n >= num_slots:
        return [[SlotPart(order[i]) for i in range(s, n, num_slots)] for s in range(num_slots)]
    plan = []
    for s in range(num_slots):
        pos = s % n
        sharing = len(range(pos, num_slots, n))
        plan.append([SlotPart(order[pos], stride=sharing, offset=s // n)])
    return plan


def batches_per_epoch(info: SplitInfo, world_size: int, num_workers: int, batch_size: int, train: bool) -> int:
    """Batches every rank yields per epoch, from the manifest's counts alone."""
    if info.num_samples == 0:
        raise ValueError(f"split {info.split!r} of {info.manifest_url} holds no samples")
    if train:
        return max(1, info.num_samples // (world_size * batch_size))
    workers = max(1, num_workers)
    plan = plan_epoch(info, world_size * workers, 0, 0, train=False)
    per_slot = [sum(p.count(info.shards[p.shard].num_samples) for p in parts) for parts in plan]
    return workers * max(1, max(-(-c // batch_size) for c in per_slot))


# -----------------------------------------------------------------------------
# decoding

def decode_npy(buf: bytes, what: str, header_cache: dict[bytes, tuple] | None = None) -> np.ndarray:
    """A .npy member to an array without copying the data (np.load on a BytesIO copies).

    numpy parses the header with ast.literal_eval (~0.1 ms); every sample of a dataset has the same header, so a
    cache keyed by the header bytes skips that.
    """
    head = bytes(buf[:128])
    if header_cache is not None and head in header_cache:
        shape, dtype, offset, count = header_cache[head]
        if len(buf) - offset == count * dtype.itemsize:
            return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
    f = io.BytesIO(buf)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise ShardError(f"{what}: fbank.npy is not a valid .npy file ({e})") from e
    count = int(np.prod(shape))
    if fortran or dtype.hasobject or len(buf) - f.tell() != count * dtype.itemsize:
        raise ShardError(f"{what}: fbank.npy holds {len(buf) - f.tell()} data bytes for shape {shape} {dtype}")
    if header_cache is not None and f.tell() <= 128:
        header_cache[head] = (shape, dtype, f.tell(), count)
    return np.frombuffer(buf, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


def decode_jpeg(buf: bytes, what: str) -> torch.Tensor:
    try:
        return _decode(torch.frombuffer(bytearray(buf), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ShardError(f"{what}: undecodable JPEG ({e})") from e


class _BatchMemory:
    """Where batch tensors live: reused buffers in this process, shared memory in a DataLoader worker.

    Fresh memory costs a page fault per 4 KiB on first write (measured ~2-3 µs each here: ~130 µs per fbank and
    ~100 µs per frame, as much as decoding). In-process, a buffer is reused once nothing but the pool refers to
    it (the consumer dropped every tensor and view of that batch); in a worker, tensors are allocated in shared
    memory, so handing the batch to the main process does not copy it again (as torch's default_collate does).
    """

    def __init__(self, keep: int = 4):
        self.in_worker = get_worker_info() is not None
        self.keep = keep
        self.pool: list[np.ndarray] = []
        self.free_refs: int | None = None   # refcount of an unused pooled buffer, measured as it is checked

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self.pool[i])

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.in_worker:
            nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        for i in range(len(self.pool)):   # indices only: an iterator's cached tuple would hold a reference
            if self.pool[i].shape == shape and self.pool[i].dtype == np_dtype and self._refs(i) == self.free_refs:
                return torch.from_numpy(self.pool[i])
        buf = np.empty(shape, dtype=np_dtype)
        if len(self.pool) >= self.keep:
            return torch.from_numpy(buf)
        self.pool.append(buf)
        del buf
        if self.free_refs is None:
            self.free_refs = self._refs(len(self.pool) - 1)
        return torch.from_numpy(self.pool[-1])


class _Batcher:
    """Decodes each sample as it is added straight into the batch tensors (one copy per member).

    Decoding at `add` (not when the batch is full) is what lets a caller skip one sample that does not decode:
    `add` raises ShardError and the row it was filling is simply filled by the next sample."""

    def __init__(self, info: SplitInfo, cfg: LoaderConfig, tokenizer):
        self.info, self.cfg, self.tok = info, cfg, tokenizer
        self.nf = cfg.num_frames
        self.B = cfg.batch_size
        self.npy_headers: dict[bytes, tuple] = {}
        self.memory = _BatchMemory()
        self._start()

    def _start(self) -> None:
        self.n = 0
        self.fbank: torch.Tensor | None = None
        self.frames: torch.Tensor | None = None   # [B, nf, H, W, 3]: the JPEG decoder's layout (module docstring)
        self.keys: list[str] = []
        self.captions: list[list[str]] = []
        self.caption: list[str] = []
        self.frame_index: list[int] = []
        self.valid: list[bool] = []

    def __len__(self) -> int:
        return self.n

    def add(self, url: str, key: str, members: dict[str, bytes], frame0: int, caption_pick: int, valid: bool) -> None:
        """Decode one sample into row len(self); ShardError (naming shard and key) leaves the batch as it was."""
        T, M, i = self.info.target_length, self.info.num_mel_bins, self.n
        what = f"shard {url} sample {key}"
        missing = [m for m in self._members(frame0) if m not in members]
        if missing:
            raise ShardError(f"{what}: missing member(s) {missing}")
        try:
            meta = json.loads(bytes(members["json"]))
            caps = list(meta["captions"])
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{what}: json member lacks a 'captions' list ({e})") from e
        if not caps or not all(isinstance(c, str) for c in caps):
            raise ShardError(f"{what}: json 'captions' must be a non-empty list of strings, got {caps!r}")
        fb = decode_npy(members["fbank.npy"], what, self.npy_headers)
        if fb.shape != (T, M) or fb.dtype != np.float16:
            raise ShardError(f"{what}: fbank.npy is {fb.dtype}{list(fb.shape)}, expected float16[{T}, {M}]")
        hwcs = [decode_jpeg(members[f"frame{frame0 + j:02d}.jpg"], what).permute(1, 2, 0).numpy()
                for j in range(self.nf)]
        if self.frames is None:
            self.frames = self.memory.empty((self.B, self.nf, *hwcs[0].shape), torch.uint8)
        for j, hwc in enumerate(hwcs):
            if hwc.shape != tuple(self.frames.shape[2:]):
                raise ShardError(f"{what}: frame {frame0 + j} is {list(hwc.shape)} (HWC), "
                                 f"other frames {list(self.frames.shape[2:])}")
        if self.fbank is None:
            self.fbank = self.memory.empty((self.B, T, M), torch.float16)
        # Copy through numpy: the decoded arrays are read-only views of the tar bytes.
        self.fbank.numpy()[i] = fb
        frames_np = self.frames.numpy()
        for j, hwc in enumerate(hwcs):
            frames_np[i, j] = hwc
        self.n += 1
        self.keys.append(key)
        self.captions.append(caps)
        self.caption.append(caps[caption_pick % len(caps)])
        self.frame_index.append(frame0)
        self.valid.append(valid)

    def emit(self) -> dict[str, Any]:
        assert self.n == self.B and self.fbank is not None and self.frames is not None
        batch: dict[str, Any] = dict(fbank=self.fbank, frames=self.frames.permute(0, 1, 4, 2, 3),
                                     frame_index=torch.tensor(self.frame_index), keys=self.keys,
                                     captions=self.captions, caption=self.caption,
                                     valid=torch.tensor(self.valid, dtype=torch.bool))
        if self.tok is not None:
            from avcap.tokenizer import encode_captions
            tokens, need_predict = encode_captions(self.tok, self.caption,
                                                   max_wordpieces=self.cfg.max_caption_tokens)
            batch["tokens"], batch["need_predict"] = torch.as_tensor(tokens), torch.as_tensor(need_predict)
        self._start()
        return batch

    def _members(self, frame0: int) -> list[str]:
        return ["fbank.npy", "json"] + [f"frame{frame0 + j:02d}.jpg" for j in range(self.nf)]


# -----------------------------------------------------------------------------
# the per-rank dataset

class ShardStream(IterableDataset):
    """One rank's batches for one epoch; each DataLoader worker plays one slot of the epoch plan."""

    def __init__(self, info: SplitInfo, cfg: LoaderConfig, rank: int, world_size: int, epoch: int,
                 start_batch: int = 0):
        if not 1 <= cfg.num_frames <= info.frames_per_clip:
            raise ValueError(f"num_frames={cfg.num_frames} but the dataset has {info.frames_per_clip} frames per clip")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.info, self.cfg, self.rank, self.world_size, self.epoch = info, cfg, rank, world_size, epoch
        self.workers = max(1, cfg.num_workers)
        self.total = batches_per_epoch(info, world_size, cfg.num_workers, cfg.batch_size, cfg.train)
        if not 0 <= start_batch <= self.total:
            raise ValueError(f"start_batch {start_batch} outside the epoch's {self.total} batches")
        self.start_batch = start_batch
        self._store: RemoteStore | None = None   # made in the worker on first use (fsspec sessions stay there)
        self.bad_samples = 0   # samples skipped because a member did not decode (skip_bad_shards)
        self.plan = plan_epoch(info, world_size * self.workers, cfg.seed, epoch, cfg.train)

    def __len__(self) -> int:
        return self.total - self.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wi = get_worker_info()
        proc = wi.id if wi is not None else 0
        if wi is not None and wi.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, DataLoader has {wi.num_workers}")
        # Batch i of the epoch comes from role i % workers. DataLoader asks its processes round-robin from
        # process 0, so after skipping start_batch batches process 0 must play role start_batch % workers.
        role = (proc + self.start_batch) % self.workers
        slot = self.rank * self.workers + role
        tok = None
        if self.cfg.tokenizer:
            from avcap.tokenizer import load_tokenizer
            tok = load_tokenizer(self.cfg.tokenizer)
        batcher = _Batcher(self.info, self.cfg, tok)
        B = self.cfg.batch_size
        quota = len(range(role, self.total, self.workers))
        skip = len(range(role, self.start_batch, self.workers))
        rows = self._train_rows(slot, role, quota * B) if self.cfg.train else self._eval_rows(slot)
        done = 0        # batches of this role made (or, when resuming, passed over)
        passed = 0      # rows passed over without decoding, when resuming
        pad = None      # eval: a row that decoded, to pad the last batches with (valid=False)
        bad_in_a_row = 0
        while done < quota:
            row = next(rows, None)
            if row is None:   # eval: the slot's samples are done; pad up to the quota every worker yields
                pad = pad or self._pad_row()
                row = (*pad, 0, False)
            if done < skip and not self.cfg.skip_bad_shards:
                # Read (to keep the shuffle identical) but not decoded. With skip_bad_shards the skipped batches
                # are decoded like the others: which samples do not decode decides where the epoch stands.
                passed += 1
                if passed == B:
                    done, passed = done + 1, 0
                continue
            try:
                batcher.add(*row)
            except ShardError as e:
                if not self.cfg.skip_bad_shards or not row[5]:
                    raise
                self.bad_samples += 1
                bad_in_a_row += 1
                warnings.warn(f"skipped sample {row[1]} of shard {row[0]} ({self.bad_samples} skipped so far by "
                              f"rank {self.rank} loader role {role}): {e}")
                if bad_in_a_row > self.info.num_samples:
                    raise ShardError(f"rank {self.rank} loader role {role}: no sample of its shards decodes "
                                     f"(last: {e})") from e
                continue
            bad_in_a_row = 0
            if pad is None and row[5]:
                pad = row[:4]
            if len(batcher) == B:
                batch = batcher.emit()
                done += 1
                if done > skip:
                    yield batch

    # -- reading ---------------------------------------------------------------

    def _frame0(self, key: str, pass_idx: int) -> int:
        F, nf = self.info.frames_per_clip, self.cfg.num_frames
        if not self.cfg.train:
            return F // 2 if nf == 1 else (F - nf) // 2
        return _hash_int("frame", self.cfg.seed, self.epoch, pass_idx, key) % (F - nf + 1)

    def _remote_store(self) -> RemoteStore:
        if self._store is None:
            self._store = RemoteStore(self.cfg.remote)
        return self._store

    def _read_parts(self, parts: list[SlotPart], pass_idx: int, limit: int | None = None,
                    cache: SlotCache | None = None) -> Iterator[tuple[str, str, dict[str, bytes], int]]:
        """Raw samples (url, key, members, frame0) of a slot's parts, checking counts against the manifest.

        Stops after `limit` samples: what the slot still needs this epoch, so nothing past it is read (or, for a
        remote shard, fetched). `cache` (the slot's, for the epoch) keeps what remote shards already gave."""
        if cache is None:   # one of its own, ended with this generator
            own = SlotCache()
            try:
                yield from self._read_parts(parts, pass_idx, limit, own)
            finally:
                own.close()
            return
        taken = 0
        for k, part in enumerate(parts):
            if limit is not None and taken >= limit:
                return
            shard = self.info.shards[part.shard]
            if k + 1 < len(parts) and is_remote_indexed(self.info.shards[parts[k + 1].shard]):
                cache.open_ahead(self.info.shards[parts[k + 1].shard], self._remote_store())
            reader = None
            idx = 0
            try:
                reader = open_shard_reader(shard, self._remote_store() if is_remote(shard.url) else None, cache)
                indexed = not isinstance(reader, TarSampleReader)
                if indexed and len(reader) != shard.num_samples:
                    raise ShardError(f"shard {shard.url}: holds {len(reader)} samples, the manifest says "
                                     f"{shard.num_samples}")
                chosen: dict[str, int] = {}

                def want(key: str) -> set[str] | None:
                    nonlocal idx
                    i, idx = idx, idx + 1
                    if i % part.stride != part.offset or (limit is not None and len(chosen) + taken >= limit):
                        return None
                    chosen[key] = f0 = self._frame0(key, pass_idx)
                    return {"fbank.npy", "json"} | {f"frame{f0 + j:02d}.jpg" for j in range(self.cfg.num_frames)}

                for key, members in reader.samples(want):
                    if members is not None:
                        taken += 1
                        yield shard.url, key, members, chosen.pop(key)
                    if not indexed and limit is not None and taken >= limit:
                        break   # a stream: the rest of the shard is not needed (the count was checked up front
                                # for indexed readers only; a streamed shard is counted when read to its end)
                else:
                    if idx != shard.num_samples:
                        raise ShardError(f"shard {shard.url}: holds {idx} samples, the manifest says "
                                         f"{shard.num_samples}")
            except (ShardError, OSError) as e:
                if not self.cfg.skip_bad_shards:
                    if isinstance(e, ShardError):
                        raise
                    if isinstance(e, RemoteReadError):   # names the URL and what failed already
                        raise ShardError(f"shard {e}") from e
                    raise ShardError(f"shard {shard.url}: cannot be read ({e})") from e
                warnings.warn(f"skipping the rest of bad shard {shard.url} after {idx} samples: {e}")
            finally:
                if reader is not None:
                    reader.close()

    def _train_rows(self, slot: int, role: int, rows: int) -> Iterator[tuple]:
        """The `rows` shuffled rows of a slot this epoch: its shards in plan order, again from the start
        (wrap-around, new frame and caption picks) while it needs more, through a shuffle buffer; then, only if the
        caller asks for more (samples skipped as undecodable), further passes.

        Exactly `rows` samples are read for the epoch's batches: a buffer filled past them would read samples no
        batch uses (and, before this was bounded, wrapped tiny slots around dozens of times per epoch: one epoch
        of 11 samples over HTTP fetched each shard ~92 times). A wrap-around pass rereads the slot's first
        `rows - slot_samples` samples in the same order, so the SlotCache keeps those members and a remote slot
        fetches no byte twice in an epoch."""
        parts = self.plan[slot]
        rng = random.Random(_hash_int("samples", self.cfg.seed, self.epoch, slot))
        have = sum(p.count(self.info.shards[p.shard].num_samples) for p in parts)
        cache = SlotCache(room=min(max(0, rows - have), have))

        def passes(limit: int | None, pass_idx: int) -> Iterator[tuple]:
            n = 0
            while limit is None or n < limit:
                got = 0
                for url, key, members, f0 in self._read_parts(parts, pass_idx, None if limit is None else limit - n,
                                                              cache):
                    got += 1
                    pick = _hash_int("caption", self.cfg.seed, self.epoch, pass_idx, key)
                    yield url, key, members, f0, pick, True
                if got == 0:   # never spin forever on shards that yield nothing
                    urls = [self.info.shards[p.shard].url for p in parts]
                    raise ShardError(f"rank {self.rank} loader role {role}: no readable samples in shards {urls}")
                n += got
                pass_idx += 1

        buf: list[tuple] = []
        size = max(1, self.cfg.shuffle_buffer)
        try:
            for row in passes(rows, 0):
                buf.append(row)
                if len(buf) >= size:
                    j = rng.randrange(len(buf))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
            while buf:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
            yield from passes(None, -(-rows // max(1, have)))
        finally:
            cache.close()

    def _eval_rows(self, slot: int) -> Iterator[tuple]:
        """The slot's samples once, in shard order (the caller pads the last batches)."""
        cache = SlotCache()
        try:
            for url, key, members, f0 in self._read_parts(self.plan[slot], 0, cache=cache):
                yield url, key, members, f0, 0, True
        finally:
            cache.close()

    def _pad_row(self) -> tuple[str, str, dict[str, bytes], int]:
        """A sample that decodes, for a slot without one of its own to pad eval batches with: the split's first."""
        probe = _Batcher(self.info, LoaderConfig(**{**self.cfg.__dict__, "batch_size": 1}), None)
        for row in self._read_parts([SlotPart(i) for i in range(len(self.info.shards))], 0):
            try:
                probe.add(*row, 0, False)
            except ShardError:
                if self.cfg.skip_bad_shards:
                    continue
                raise
            return row
        raise ShardError(f"split {self.info.split!r}: no readable sample to pad eval batches with")


def _worker_context():
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    # The server imports this module (torch, torchvision, numpy) once and every worker forks from it already
    # loaded: otherwise each worker of each epoch imports them anew (measured 0.7 s instead of ~25 s for a
    # 2-worker loader on a loaded 2-core machine). No effect once the server runs.
    ctx.set_forkserver_preload([__name__])
    return ctx


def make_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, epoch: int = 0,
                start_batch: int = 0) -> tuple[DataLoader | ShardStream, int]:
    """The rank's batches of one epoch and the epoch's batch count (identical on every rank).

    The iterable yields `batches_per_epoch - start_batch` batches: those of the uninterrupted epoch from
    `start_batch` on (for exact resume). With num_workers=0 the ShardStream itself is returned (no subprocesses).
    """
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    info = load_split(cfg.data, cfg.split, cfg.shard_base)
    ds = ShardStream(info, cfg, rank, world_size, epoch, start_batch)
    if cfg.num_workers == 0:
        return ds, ds.total
    # Workers start from a forkserver, not a fork of this process: the trainer already runs threads (gloo,
    # OpenMP, the previous epoch's pin thread), and a fork taken while one of them holds a lock can leave the new
    # worker waiting forever on it (seen: a fresh epoch's worker stuck at 0 s CPU, its peer rank waiting on it).
    dl = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                    pin_memory=cfg.pin_memory, persistent_workers=False, in_order=True,
                    multiprocessing_context=_worker_context())
    return dl, ds.total
