"""Remote shards (http(s)://, s3://, gs://, any fsspec URL) read through their member index with ranged reads.

A sample uses fbank.npy, one to four frames and the json: about 0.3 MB of its ~0.7 MB. Streaming the whole
shard would move every byte; here the loader fetches the shard's member index once (checked against the
manifest's sha256, the shard's size against the manifest's), then asks only for the byte ranges of the used
members, each with the 512-byte tar header in front of it, which is checked against the index (name and size):
a shard replaced by another of the same name fails on its first sample, naming the URL and what the header says.

Requests: ranges closer than `max_gap` are coalesced into one (fsspec.utils.merge_offset_ranges: the json of one
sample and the fbank.npy of the next are adjacent in the tar), a window of `window_samples` samples is one
`cat_ranges` call (its requests run concurrently on fsspec's event loop) and `windows_ahead` windows are in flight
while the loader decodes the current one, so a request's latency is hidden behind the decoding of earlier samples.
fsspec has no retry of its own for HTTP: `RemoteStore` retries what failed (5xx, 408/429, resets, timeouts) with
exponential backoff and turns permanent failures (403, 404, a range the server does not honour) into a ShardError
naming the URL. `s3://` goes through s3fs (the `[s3]` extra) on the same code path; credentials and endpoints come
from the environment as s3fs and fsspec read them (AWS_*, FSSPEC_S3_*).

Each byte at most once per epoch and slot: the loader hands every reader of a slot one `SlotCache`, which keeps
the parsed indexes and the member bytes of the samples a wrap-around pass will read again (see ShardStream).

Kept free of torch imports; fsspec and aiohttp are imported when a remote shard is first read.
"""
from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from shards.index import TAR_BLOCK, ShardError, ShardIndex, ShardIndexError, check_member_header

class RemoteReadError(OSError):
    """A remote read failed for good (a permanent error, or transient ones past the retries); names the URL."""


class RemoteNotFound(RemoteReadError, FileNotFoundError):
    """The URL names nothing (HTTP 404, no such object)."""


# Statuses worth another try: the server or a proxy in front of it is overloaded or restarting.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteConfig:
    timeout_s: float = 30.0        # connect, and each read of a response (not the whole transfer)
    attempts: int = 5              # tries per request on transient errors
    backoff_s: float = 0.1         # wait before the 2nd try; doubles for each further one
    window_samples: int = 16       # samples whose ranges go out as one batch of concurrent requests
    windows_ahead: int = 6         # batches in flight while the current one is decoded (~27 MB of members)
    max_gap: int = 4096            # ranges at most this far apart are fetched as one request


def is_remote(url: str) -> bool:
    """A URL read through fsspec: neither a local path, file:// nor a webdataset `pipe:` command."""
    scheme = urlparse(url).scheme
    return scheme not in ("", "file", "pipe") and len(scheme) > 1   # one letter: a Windows drive


def storage_options(protocol: str, cfg: RemoteConfig) -> dict[str, Any]:
    """Timeouts in each filesystem's own terms (fsspec passes these to aiohttp / botocore)."""
    if protocol in ("http", "https"):
        import aiohttp
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout_s,
                                                                   sock_read=cfg.timeout_s)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": cfg.timeout_s, "read_timeout": cfg.timeout_s}}
    return {}


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(e, "status", None)   # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status in TRANSIENT_STATUSES
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    # ClientPayloadError (connection cut mid-body), ServerDisconnectedError, ClientConnectorError, ...
    return isinstance(e, aiohttp.ClientError)


def describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(e, 'message', '') or ''}".rstrip()
    if isinstance(e, FileNotFoundError):
        return "not found (HTTP 404 or no such object)"
    if isinstance(e, PermissionError):
        return f"access denied ({e})"
    return f"{type(e).__name__}: {e}"


def _permanent(url: str, what: str, e: BaseException) -> RemoteReadError:
    cls = RemoteNotFound if isinstance(e, FileNotFoundError) or getattr(e, "status", None) == 404 else RemoteReadError
    return cls(f"{url}: {what} failed: {describe(e)}")


class RemoteStore:
    """fsspec filesystems per protocol, and requests that retry transient failures."""

    def __init__(self, cfg: RemoteConfig | None = None, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg or RemoteConfig()
        self.sleep = sleep
        self._fs: dict[str, tuple[Any, str]] = {}

    def _fs_path(self, url: str) -> tuple[Any, str]:
        got = self._fs.get(url)
        if got is None:
            import fsspec
            protocol = fsspec.utils.get_protocol(url)
            try:
                got = self._fs[url] = fsspec.core.url_to_fs(url, **storage_options(protocol, self.cfg))
            except ImportError as e:   # fsspec names the package; s3fs comes with this project's [s3] extra
                raise RemoteReadError(f"{url}: no filesystem for {protocol}:// ({e}; for s3:// install the "
                                      f"project's [s3] extra)") from e
        return got

    def _retry(self, url: str, what: str, call: Callable[[], Any]) -> Any:
        last: BaseException | None = None
        for attempt in range(self.cfg.attempts):
            if attempt:
                self.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                return call()
            except Exception as e:   # classified below: only transient ones are tried again
                if not is_transient(e):
                    raise _permanent(url, what, e) from e
                last = e
        raise RemoteReadError(f"{url}: {what} still failing after {self.cfg.attempts} attempts: "
                              f"{describe(last)}") from last

    def cat(self, url: str) -> bytes:
        fs, path = self._fs_path(url)
        return self._retry(url, "reading", lambda: fs.cat_file(path))

    def cat_ranges(self, url: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Bytes [start, end) of each range, all requested at once; only the failed ones are retried."""
        fs, path = self._fs_path(url)
        out: list[bytes | None] = [None] * len(starts)
        todo = list(range(len(starts)))
        last: BaseException | None = None
        for attempt in range(self.cfg.attempts):
            if attempt:
                self.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                got = fs.cat_ranges([path] * len(todo), [starts[i] for i in todo], [ends[i] for i in todo],
                                    on_error="return")
            except Exception as e:   # the whole call failed (e.g. the session could not start)
                got = [e] * len(todo)
            failed = []
            for i, r in zip(todo, got):
                s, e = starts[i], ends[i]
                if isinstance(r, BaseException):
                    if not is_transient(r):
                        raise _permanent(url, f"reading bytes {s}-{e - 1}", r) from r
                    failed.append(i)
                    last = r
                elif len(r) != e - s:
                    why = ("the server ignores Range requests" if len(r) > e - s else
                           "the file ends before the offsets its index gives (replaced or truncated?)")
                    raise ShardError(f"{url}: asked for bytes {s}-{e - 1} ({e - s} bytes), got {len(r)}: {why}")
                else:
                    out[i] = r
            if not failed:
                return out   # type: ignore[return-value]
            todo = failed
        raise RemoteReadError(f"{url}: {len(todo)} range request(s) still failing after {self.cfg.attempts} "
                              f"attempts: {describe(last)}") from last


@dataclass
class SlotCache:
    """What one loader slot already fetched this epoch, so that no byte is fetched twice.

    `indexes`: parsed member index per shard URL (a wrap-around pass reopens the shard). `members`: bytes of the
    members of the first `room` samples the slot chose; a wrap-around pass rereads exactly the first samples of
    the slot in the same order (ShardStream), so only those need keeping, whatever the slot's size.
    """
    room: int = 0
    indexes: dict[str, ShardIndex] = field(default_factory=dict)
    members: dict[tuple[str, int], Any] = field(default_factory=dict)
    kept: set[tuple[str, str]] = field(default_factory=set)
    opening: dict[str, Future] = field(default_factory=dict)   # indexes being fetched ahead (`open_ahead`)
    _pool: ThreadPoolExecutor | None = None

    def open_ahead(self, shard: Any, store: "RemoteStore") -> None:
        """Start fetching the index of the shard the slot reads next, so that opening it costs no round trip
        after the current shard's last sample; a failure surfaces when that shard is opened."""
        if shard.url in self.indexes or shard.url in self.opening:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1)
        self.opening[shard.url] = self._pool.submit(_open_index, shard, store)

    def close(self) -> None:
        """End the slot's epoch: drop what was opened ahead and not used, and wait for a fetch under way (bounded
        by the timeouts), so no request of this epoch outlives it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.opening.clear()

    def get(self, url: str, offset: int) -> Any:
        return self.members.get((url, offset))

    def keep(self, url: str, key: str, members: dict[int, Any]) -> None:
        if (url, key) not in self.kept:
            if self.room <= 0:
                return
            self.room -= 1
            self.kept.add((url, key))
        for off, data in members.items():
            self.members[(url, off)] = data


def _open_index(shard: Any, store: RemoteStore) -> ShardIndex:
    """Fetch, check and parse a remote shard's member index (and check the shard's size), in one round trip."""
    where = f"index {shard.index_url} of shard {shard.url}"
    with ThreadPoolExecutor(1) as pool:   # the index and the end probe in one round trip
        end = pool.submit(_check_end, shard, store) if shard.bytes is not None else None
        try:
            raw = store.cat(shard.index_url)
        except RemoteReadError as e:
            raise ShardIndexError(f"{where}: listed in the manifest but cannot be read ({e})") from e
        if end is not None:
            end.result()
    return ShardIndex.from_manifest_entry(raw, where, index_sha256=shard.index_sha256,
                                          shard_name=unquote(urlparse(shard.url).path.rsplit("/", 1)[-1]),
                                          shard_bytes=shard.bytes, shard_sha256=shard.sha256)


def _check_end(shard: Any, store: RemoteStore) -> None:
    """The shard's size against the manifest, without a HEAD (fsspec's HTTP `info` turns a 503 into
    FileNotFoundError and falls back to a GET of the whole file): its last two blocks, which in a tar are the
    zero end-of-archive marker, are read where the manifest's size puts them. A shorter shard answers 416 or
    a short read, a longer or different one (almost always) other bytes there; a replacement that passes
    still fails the header check of its first member."""
    size, n = shard.bytes, 2 * TAR_BLOCK
    what = f"shard {shard.url}: the manifest says {size} bytes"
    if size < n:
        raise ShardError(f"{what}, too few for a tar")
    try:
        (tail,) = store.cat_ranges(shard.url, [size - n], [size])
    except RemoteNotFound:
        raise
    except (RemoteReadError, ShardError) as e:
        if not isinstance(e, ShardError) and getattr(e.__cause__, "status", None) != 416:
            raise
        raise ShardError(f"{what}, but it is shorter (its last {n} bytes cannot be read: {e}): truncated or "
                         f"replaced") from e
    if tail.count(0) != n:
        raise ShardError(f"{what}, but its last {n} bytes are not the end of a tar (another size): "
                         f"truncated or replaced")


class RemoteShardReader:
    """Reads a remote shard through its member index; same interface as shards.readers.TarSampleReader.

    `shard` is a shards.split_info.ShardInfo (url, bytes, sha256, index_url, index_sha256 from the manifest).
    """

    def __init__(self, shard: Any, store: RemoteStore, cache: SlotCache | None = None):
        self.url = shard.url
        self.store = store
        self.cache = cache if cache is not None else SlotCache()
        index = self.cache.indexes.get(shard.url)
        if index is None:
            ahead = self.cache.opening.pop(shard.url, None)
            index = ahead.result() if ahead is not None else _open_index(shard, store)
            self.cache.indexes[shard.url] = index
        self.index = index
        self.member_pos = {m: j for j, m in enumerate(index.members)}

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> None:
        pass   # nothing held: requests end with their window; members handed out own their bytes

    def _plan(self, want, start: int) -> tuple[list[tuple[str, dict[str, tuple[int, int]] | None]], int]:
        """Rows of the next window from sample `start`: (key, {suffix: (offset, size)}) or (key, None)."""
        index, rows, chosen, i = self.index, [], 0, start
        while i < len(index) and chosen < self.store.cfg.window_samples:
            key = index.keys[i]
            wanted = want(key)
            if wanted:
                chosen += 1
                offs, sizes = index.offsets[i], index.sizes[i]
                members = {}
                for suffix in wanted:
                    j = self.member_pos.get(suffix)
                    if j is not None and offs[j] is not None:   # else the batcher names the missing member
                        members[suffix] = (offs[j], sizes[j])
                rows.append((key, members))
            else:
                rows.append((key, None))
            i += 1
        return rows, i

    def _fetch(self, rows) -> tuple[list[int], list[bytes]]:
        starts, ends = [], []
        for _, members in rows:
            for off, size in (members or {}).values():
                if self.cache.get(self.url, off) is None:
                    starts.append(off - TAR_BLOCK)
                    ends.append(off + size)
        if not starts:
            return [], []
        from fsspec.utils import merge_offset_ranges
        _, starts, ends = merge_offset_ranges([self.url] * len(starts), starts, ends,
                                              max_gap=self.store.cfg.max_gap, sort=True)
        return starts, self.store.cat_ranges(self.url, starts, ends)

    def _member(self, blocks: tuple[list[int], list[bytes]], key: str, suffix: str, off: int, size: int):
        starts, data = blocks
        b = bisect.bisect_right(starts, off - TAR_BLOCK) - 1
        view = memoryview(data[b])
        lo = off - starts[b]
        check_member_header(view[lo - TAR_BLOCK:lo], f"{key}.{suffix}", size, off, f"shard {self.url}")
        return view[lo:lo + size]

    def samples(self, want) -> Iterator[tuple[str, dict[str, memoryview] | None]]:
        """Yields (key, {suffix: bytes view}) per sample in tar order, or (key, None) for one `want` declined."""
        pool = ThreadPoolExecutor(self.store.cfg.windows_ahead)
        pending: deque[tuple[list, Future]] = deque()
        nxt = 0
        try:
            while True:
                while len(pending) < self.store.cfg.windows_ahead and nxt < len(self.index):
                    rows, nxt = self._plan(want, nxt)
                    pending.append((rows, pool.submit(self._fetch, rows)))
                if not pending:
                    return
                rows, fut = pending.popleft()
                blocks = fut.result()
                if nxt < len(self.index):   # keep `windows_ahead` in flight while this window is decoded
                    more, nxt = self._plan(want, nxt)
                    pending.append((more, pool.submit(self._fetch, more)))
                for key, members in rows:
                    if members is None:
                        yield key, None
                        continue
                    out, fetched = {}, {}
                    for suffix, (off, size) in members.items():
                        got = self.cache.get(self.url, off)
                        if got is None:
                            got = fetched[off] = self._member(blocks, key, suffix, off, size)
                        out[suffix] = got
                    self.cache.keep(self.url, key, fetched)
                    yield key, out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)   # after an error or an early stop: no stray request
