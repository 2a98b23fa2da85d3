"""Shard readers: the samples of one shard, reading only the members a caller asks for.

Every reader has one interface: `samples(want)` yields `(key, {suffix: bytes})` per sample in tar order, or
`(key, None)` for a sample `want(key)` declined (it returns the member suffixes to read, empty to skip); the
indexed ones also have `__len__` (the index's sample count); `close()` ends the reader. `open_shard_reader`
picks the reader for a manifest's shard:
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

Why not webdataset's tar iteration: it parses every member with `tarfile` and reads every member's bytes, about
0.6 ms per 23-member sample before any decoding, which alone exceeds the decode cost of the members a training
step uses (fp16 fbank 0.17 ms, one 224² JPEG 0.4 ms). benchmarks/bench_loader.py measures both on the same
unindexed shards (BENCHMARKS.md, loader): this reader's whole loader takes well under half the CPU time of
webdataset's iteration plus the decode of the used members.
"""
from __future__ import annotations

import io
import mmap
import os
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse

from shards.index import TAR_BLOCK, ShardError, ShardIndex, ShardIndexError, check_member_header
from shards.remote import RemoteConfig, RemoteShardReader, RemoteStore, SlotCache, is_remote, storage_options
from shards.sample_format import SampleFormatError, split_member_name
from shards.split_info import ShardInfo


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL (plain path or file://), else None."""
    scheme = urlparse(url).scheme
    if scheme == "":
        return url
    return urlparse(url).path if scheme == "file" else None


STREAM_BUFFER = 1 << 20   # bytes read from a remote stream at a time


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
    f = fsspec.open(url, "rb", **extra, **storage_options(protocol, remote or RemoteConfig())).open()
    # The tar reader reads a 512-byte header, then a member, ~50 reads a sample: each read of an fsspec stream is
    # a round trip to its event loop thread (measured: 6.3 ms of CPU per sample streamed, 1.4 with this buffer)
    return io.BufferedReader(f, buffer_size=STREAM_BUFFER)


class TarSampleReader:
    """Iterates the samples of one webdataset tar, reading only the members a caller asks for.

    Members are grouped by key (shards.sample_format.split_member_name), as webdataset does. For each
    sample the caller's `want(key)` returns the set of member suffixes to read (empty: skip the sample); the
    other members' data is seeked past. Truncation, a bad header checksum or a missing end-of-archive marker is
    a ShardError naming the shard URL.
    """

    def __init__(self, url: str, remote: RemoteConfig | None = None):
        self.url = url
        self.f: Any = open_url(url, remote)
        self.mm: mmap.mmap | None = None
        # a local file (a remote stream is a BufferedReader too, over fsspec's file)
        local = isinstance(self.f, io.BufferedReader) and isinstance(self.f.raw, io.FileIO)
        if local:
            # Local file: map it, so reading a member is a slice and skipping one moves a pointer (no syscalls).
            try:
                self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:   # an empty file cannot be mapped; reading it reports the truncation
                self.mm = None
        self.src: Any = self.mm if self.mm is not None else self.f
        # Only local files seek; a remote stream (fsspec's HTTP stream cannot seek) skips by reading.
        self.seekable = local
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
            try:
                key, suffix = split_member_name(name)
            except SampleFormatError as e:
                raise ShardError(f"shard {self.url}: {e}") from e
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
        self.index = ShardIndex.from_manifest_entry(raw, where, index_sha256=shard.index_sha256,
                                                    shard_name=Path(path).name, shard_bytes=size,
                                                    shard_sha256=shard.sha256)
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
