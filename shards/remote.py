"""Remote shards (http(s)://, s3://, gs://, any fsspec URL) read through their member index with ranged reads.

A sample uses fbank.npy, one to four frames and the json: about 0.3 MB of its ~0.7 MB. Streaming the whole
shard would move every byte; here the loader fetches the shard's member index once (checked against the
manifest's sha256, the shard's size against the manifest's), then asks only for the byte ranges of the used
members, each with the 512-byte tar header in front of it, which is checked against the index (name and size):
a shard replaced by another of the same name fails on its first sample, naming the URL and what the header says.

Requests: ranges closer than `max_gap` are coalesced into one (fsspec.utils.merge_offset_ranges: the json of one
sample and the fbank.npy of the next are adjacent in the tar), a window of `window_samples` samples is one
`cat_ranges` call (its requests run concurrently) and `windows_ahead` windows are in flight while the loader decodes
the current one, so a request's latency is hidden behind the decoding of earlier samples. The loader starts the
slot's next shard (`RemoteShardReader.start`: its index was requested as the shard before the current one started,
its first windows are requested) while the current shard's last windows are decoded, so a new shard costs no round
trip either. `RemoteStore` retries what failed (5xx, 408/429, resets, timeouts) with exponential backoff and turns
permanent failures (403, 404, a range the server does not honour) into a ShardError naming the URL.

Clients: http(s):// goes through libcurl (pycurl) by default, `RemoteConfig.http_client="fsspec"` selects fsspec's
aiohttp filesystem instead; s3:// (s3fs, the `[s3]` extra; credentials and endpoints from the environment as
botocore and fsspec read them: AWS_* when s3fs makes its client, e.g. AWS_ENDPOINT_URL_S3 for MinIO, FSSPEC_S3_*
when fsspec is imported; tests/test_remote_s3.py against moto's S3 server), gs:// and any other protocol go through
fsspec. On s3:// botocore's retries are off (`storage_options`) and S3's errors, raised by s3fs as Python ones with
botocore's ClientError as cause, are classified and named by their HTTP status and S3 code as HTTP errors are. Why
libcurl for HTTP: a loader worker's CPU goes to decoding and to the HTTP client. Fetching a sample's two ranges
(~280 kB) from nginx on loopback, alone, cost 0.27 ms of CPU through fsspec/aiohttp (cat_ranges, 32 at a time),
0.08-0.11 ms through libcurl, 0.20 through http.client and 0.39 through urllib3 (readinto into a preallocated
buffer); in the loader a sample cost 0.71-0.99 ms of CPU through aiohttp, 0.59-0.63 through libcurl, 0.36 read
locally (BENCHMARKS.md "remote"). libcurl also moves the bytes with the GIL released, beside the decoding; all of a
store's libcurl requests go through one loop thread (`_CurlLoop`). obstore (Rust's object_store, tried in the loader
at 20 ms) cost as much CPU per sample as libcurl and ran no faster. Both clients keep the same semantics: requests
of a window run concurrently, connections are reused (at most `max_connections` per worker), a connect or a stalled
read times out after `timeout_s`, redirects are followed, errors are classified and named alike
(tests/test_remote.py runs the fault tests through both).

Each byte at most once per epoch and slot: the loader hands every reader of a slot one `SlotCache`, which keeps
the parsed indexes and the member bytes of the samples a wrap-around pass will read again (see ShardStream).

Kept free of torch imports; pycurl, fsspec and aiohttp are imported when a remote shard is first read.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import io
import json
import math
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from shards.index import TAR_BLOCK, ShardError, ShardIndex, ShardIndexError, check_member_header
from shards.tls import certificate_failure, fsspec_tls_options, not_verified, verify_paths

class RemoteReadError(OSError):
    """A remote read failed for good (a permanent error, or transient ones past the retries); names the URL."""


class RemoteNotFound(RemoteReadError, FileNotFoundError):
    """The URL names nothing (HTTP 404, no such object)."""


class HTTPStatusError(OSError):
    """An HTTP error status from the libcurl client (the fsspec one raises aiohttp's ClientResponseError, which
    carries `status` and `message` alike)."""

    def __init__(self, status: int, url: str):
        self.status = status
        self.message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        super().__init__(f"{url}: HTTP {status} {self.message}".rstrip())


class CurlError(OSError):
    """A transfer libcurl gave up on (connection refused or reset, timeout, ...): its error code and message."""

    def __init__(self, code: int, message: str):
        self.code = code
        super().__init__(f"libcurl error {code}: {message}")


class RangeNotHonoured(OSError):
    """A ranged GET answered with the whole file (HTTP 200) or with more bytes than asked."""


# libcurl's codes for a failed connect, a connection reset or closed mid-response, a timeout, an HTTP/2 stream
# reset: the server or the network may do better on another try. (Not: DNS failures, bad URLs, TLS verification.)
CURL_TRANSIENT = frozenset({7, 16, 18, 28, 52, 55, 56, 92})
CURL_PEER_FAILED_VERIFICATION = 60   # the server's certificate: untrusted issuer, another host name, expired


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
    # HTTP connections one loader worker keeps open at most (libcurl): the requests in flight are about 2 per
    # sample of the windows ahead; past this many they queue. It also keeps a worker's sockets under the 1024
    # that select(2), which the libcurl loop waits with, can see.
    max_connections: int = 256
    http_client: str = "curl"      # http(s):// through libcurl ("curl") or fsspec's aiohttp filesystem ("fsspec")

    def __post_init__(self):
        if self.http_client not in ("curl", "fsspec"):
            raise ValueError(f"RemoteConfig.http_client must be 'curl' or 'fsspec', got {self.http_client!r}")
        if self.timeout_s <= 0 or self.backoff_s < 0 or self.attempts < 1 or self.max_gap < 0:
            raise ValueError(f"RemoteConfig: need timeout_s > 0, backoff_s >= 0, attempts >= 1, max_gap >= 0, got "
                             f"{self.timeout_s}, {self.backoff_s}, {self.attempts}, {self.max_gap}")
        if self.max_connections < 1:
            raise ValueError(f"RemoteConfig.max_connections must be >= 1, got {self.max_connections}")
        if self.windows_ahead < 1 or self.window_samples < 1:
            raise ValueError(f"RemoteConfig: windows_ahead and window_samples must be >= 1, got "
                             f"{self.windows_ahead} and {self.window_samples}")


def remote_config_from_json(text: str, flag: str = "--remote") -> RemoteConfig:
    """The RemoteConfig a command line's JSON object names (its fields, the rest default); "" is the default one.
    A key that is not a field, a value of the wrong type or out of range is a ValueError naming `flag`."""
    if not text:
        return RemoteConfig()
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not JSON ({e}): {text!r}") from e
    if not isinstance(given, dict):
        raise ValueError(f"{flag}: must be a JSON object of RemoteConfig fields, got {text!r}")
    fields = {f.name: f for f in dataclasses.fields(RemoteConfig)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"{flag}: unknown RemoteConfig field(s) {unknown}; the fields are {sorted(fields)}")
    for name, value in given.items():
        kind = type(fields[name].default)
        if isinstance(value, bool) or not (isinstance(value, kind) or kind is float and isinstance(value, int)):
            raise ValueError(f"{flag}: {name} must be a JSON {'number' if kind is float else kind.__name__}, "
                             f"got {value!r}")
    try:
        return RemoteConfig(**{k: float(v) if type(fields[k].default) is float else v for k, v in given.items()})
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from e


def is_remote(url: str) -> bool:
    """A URL read through fsspec: neither a local path, file:// nor a webdataset `pipe:` command."""
    scheme = urlparse(url).scheme
    return scheme not in ("", "file", "pipe") and len(scheme) > 1   # one letter: a Windows drive


def storage_options(protocol: str, cfg: RemoteConfig) -> dict[str, Any]:
    """Timeouts in each filesystem's own terms (fsspec passes these to aiohttp / botocore)."""
    if protocol in ("http", "https"):
        import aiohttp
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout_s,
                                                                   sock_read=cfg.timeout_s)},
                **fsspec_tls_options(protocol)}   # the CAs trusted now, not those when aiohttp was imported
    if protocol in ("s3", "s3a"):
        # botocore's own retries off (`total_max_attempts` counts the first try): RemoteStore retries 5xx and
        # throttling with `attempts` and `backoff_s` as for HTTP, instead of up to 5 botocore tries inside each
        # of ours. (s3fs still retries a dropped connection a few times at 0.1 s, which it does not let us set.)
        # max_concurrency 1: s3fs would HEAD a file before reading it whole (the index) to split the read.
        return {"config_kwargs": {"connect_timeout": cfg.timeout_s, "read_timeout": cfg.timeout_s,
                                  "retries": {"total_max_attempts": 1}},
                "max_concurrency": 1}
    return {}


def _s3_error(e: BaseException) -> tuple[int | None, str, str] | None:
    """(HTTP status, S3 error code, message) of a botocore ClientError, or of the Python error s3fs turned it
    into (FileNotFoundError for NoSuchKey, PermissionError for AccessDenied, OSError otherwise), which keeps the
    ClientError as its cause."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return (status if isinstance(status, int) else None, str(response["Error"].get("Code", "")),
                    str(response["Error"].get("Message", "")))
    return None


def http_status(e: BaseException) -> int | None:
    """The HTTP status a failed request was answered with, whichever client made it; None if none came."""
    status = getattr(e, "status", None)   # aiohttp.ClientResponseError, HTTPStatusError
    if isinstance(status, int):
        return status
    s3 = _s3_error(e)
    return s3[0] if s3 else None


def _unverified(e: BaseException) -> str | None:
    """What a server certificate that failed verification is named by, through either HTTP client; else None."""
    if isinstance(e, CurlError) and e.code == CURL_PEER_FAILED_VERIFICATION:
        return not_verified(str(e))
    return certificate_failure(e)


def is_transient(e: BaseException) -> bool:
    status = http_status(e)
    if status is not None:
        return status in TRANSIENT_STATUSES
    if _unverified(e) is not None:   # permanent (aiohttp's error is a ClientError, retried below otherwise)
        return False
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, CurlError):
        return e.code in CURL_TRANSIENT
    if isinstance(e, RangeNotHonoured):
        return False
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    # ClientPayloadError (connection cut mid-body), ServerDisconnectedError, ClientConnectorError, ...
    if isinstance(e, aiohttp.ClientError):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:
        return False
    # s3://: connect failures and timeouts (EndpointConnectionError, ConnectTimeoutError), a connection closed
    # or a read timing out mid-response (HTTPClientError: ConnectionClosedError, ReadTimeoutError)
    return isinstance(e, (BotoConnectionError, HTTPClientError))


def describe(e: BaseException) -> str:
    unverified = _unverified(e)
    if unverified is not None:
        return unverified
    s3 = _s3_error(e)
    if s3 is not None:
        status, code, message = s3
        return f"S3 {code}" + (f" (HTTP {status})" if status else "") + (f": {message}" if message else "")
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(e, 'message', '') or ''}".rstrip()
    if isinstance(e, FileNotFoundError):
        return "not found (HTTP 404 or no such object)"
    if isinstance(e, PermissionError):
        return f"access denied ({e})"
    return f"{type(e).__name__}: {e}"


def _permanent(url: str, what: str, e: BaseException) -> RemoteReadError:
    cls = RemoteNotFound if isinstance(e, FileNotFoundError) or http_status(e) == 404 else RemoteReadError
    return cls(f"{url}: {what} failed: {describe(e)}")


class _Call:
    """One get(): the requests of a call, answered by the loop thread as they end."""

    def __init__(self, url: str, ranges: list[tuple[int, int]] | None):
        self.url, self.ranges = url, ranges
        self.out: list[Any] = [None] * (len(ranges) if ranges is not None else 1)
        self.left = len(self.out)
        self.done = threading.Event()

    def answer(self, i: int, value: Any) -> None:
        self.out[i] = value
        self.left -= 1
        if not self.left:
            self.done.set()


class _CurlLoop:
    """Every libcurl transfer of a RemoteStore, driven by one thread on one multi handle: the callers (the
    reader's windows in flight, each in a thread of its pool) hand it their requests and wait; libcurl keeps the
    connections open across calls, up to `RemoteConfig.max_connections`.

    Why one loop rather than a multi handle per calling thread: the loader keeps six windows in flight, and six
    threads each waking for their own sockets and taking the GIL in turn cost more CPU per sample than one thread
    serving every socket that is ready at each wake-up (BENCHMARKS.md "remote" has both). libcurl waits and moves
    the bytes with the GIL released. Why `perform` and `select` rather than libcurl's socket API with an epoll
    selector: the socket callbacks (a Python call and an epoll_ctl per socket change, several per request) cost
    more than they save at a few hundred sockets (measured: 0.25 against 0.20 ms of CPU per sample fetched), and
    `max_connections` keeps the sockets within what select(2) sees. The thread ends after `IDLE_S` without
    requests and starts with the next one; a forked child makes a loop of its own (RemoteStore)."""

    IDLE_S = 5.0
    POLL_S = 0.002   # how long new requests may wait for the loop to look while it waits on sockets

    def __init__(self, cfg: RemoteConfig):
        import pycurl
        self.pycurl, self.cfg = pycurl, cfg
        self.pid = os.getpid()
        self.multi = pycurl.CurlMulti()
        # requests past this many wait in libcurl's queue for a connection (see RemoteConfig.max_connections)
        self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, cfg.max_connections)
        self.idle: list[Any] = []
        self.jobs: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self.active: dict[Any, tuple[_Call, int, io.BytesIO]] = {}
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        # libcurl's CA default is the path of the system it was built on; use this system's, as Python's ssl does
        self.cafile, self.capath = verify_paths()

    def get(self, url: str, ranges: list[tuple[int, int]] | None) -> list[Any]:
        """Bytes [start, end) of each range of `url` (or, for None, the whole file), all requested at once: a
        bytes-like per request, or the exception that request ended with."""
        call = _Call(url, ranges)
        with self.lock:
            self.jobs.put(call)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="remote-curl", daemon=True)
                self.thread.start()
        call.done.wait()
        return call.out

    def _run(self) -> None:
        pc, multi = self.pycurl, self.multi
        try:
            while True:
                try:   # idle: block until a request comes, or end the thread
                    call = self.jobs.get(timeout=self.IDLE_S) if not self.active else self.jobs.get_nowait()
                except queue.Empty:
                    if not self.active:
                        with self.lock:
                            if self.jobs.empty():
                                self.thread = None
                                return
                    call = None
                while call is not None:
                    self._add(call)
                    try:
                        call = self.jobs.get_nowait()
                    except queue.Empty:
                        call = None
                while multi.perform()[0] == pc.E_CALL_MULTI_PERFORM:
                    pass
                while True:
                    left, ok, failed = multi.info_read()
                    for c in ok:
                        self._done(c, None)
                    for c, code, message in failed:
                        self._done(c, (code, message))
                    if not left:
                        break
                if self.active and multi.select(self.POLL_S) < 0:
                    time.sleep(self.POLL_S)   # no socket to wait on yet (name lookup, a timer): do not spin
        except BaseException as e:   # a bug here must not leave callers waiting forever
            with self.lock:
                self.thread = None
                for c, (call, i, _) in list(self.active.items()):
                    multi.remove_handle(c)
                    call.answer(i, e)
                self.active.clear()
                while not self.jobs.empty():
                    call = self.jobs.get_nowait()
                    for i in range(len(call.out)):
                        call.answer(i, e)
            raise

    def _add(self, call: _Call) -> None:
        pc = self.pycurl
        for i, rng in enumerate(call.ranges if call.ranges is not None else [None]):
            c = self.idle.pop() if self.idle else self._easy()
            # BytesIO.write takes libcurl's 16 kB chunks without a Python frame each (a preallocated buffer filled
            # by a Python callback cost more CPU); a body larger than the range (the whole file answered with 200,
            # an error page) is refused by libcurl from its length, not read into memory
            body = io.BytesIO()
            c.setopt(pc.URL, call.url)
            if rng:
                c.setopt(pc.RANGE, f"{rng[0]}-{rng[1] - 1}")
                c.setopt(pc.MAXFILESIZE_LARGE, rng[1] - rng[0])
            else:
                c.unsetopt(pc.RANGE)
                c.setopt(pc.MAXFILESIZE_LARGE, 0)   # no limit
            c.setopt(pc.WRITEFUNCTION, body.write)
            self.multi.add_handle(c)
            self.active[c] = (call, i, body)

    def _easy(self) -> Any:
        pc, c = self.pycurl, self.pycurl.Curl()
        c.setopt(pc.NOSIGNAL, 1)   # timeouts without SIGALRM: these run in threads
        c.setopt(pc.CONNECTTIMEOUT_MS, int(self.cfg.timeout_s * 1000))
        c.setopt(pc.LOW_SPEED_LIMIT, 1)   # a response stalled this long: the `sock_read` timeout of aiohttp
        c.setopt(pc.LOW_SPEED_TIME, max(1, math.ceil(self.cfg.timeout_s)))
        c.setopt(pc.FOLLOWLOCATION, 1)
        c.setopt(pc.MAXREDIRS, 5)
        c.setopt(pc.PROTOCOLS, pc.PROTO_HTTP | pc.PROTO_HTTPS)   # a redirect may not lead to file:// or others
        c.setopt(pc.REDIR_PROTOCOLS, pc.PROTO_HTTP | pc.PROTO_HTTPS)
        c.setopt(pc.BUFFERSIZE, 1 << 19)   # fewer receive calls: 0.08 ms less CPU per sample than the 16 kB default
        c.setopt(pc.USERAGENT, f"libcurl/{pc.version_info()[1]}")
        if self.cafile:
            c.setopt(pc.CAINFO, self.cafile)
        if self.capath:
            c.setopt(pc.CAPATH, self.capath)
        return c

    def _done(self, c: Any, error: tuple[int, str] | None) -> None:
        call, i, body = self.active.pop(c)
        status = c.getinfo(self.pycurl.RESPONSE_CODE)
        self.multi.remove_handle(c)
        c.setopt(self.pycurl.WRITEFUNCTION, _discard)   # drop the reference to the body
        self.idle.append(c)
        ranged = call.ranges is not None
        if status >= 400:   # redirects are followed: a 3xx here comes with error 47 (too many)
            value: Any = HTTPStatusError(status, call.url)
        elif ranged and (status == 200 or error is not None and error[0] == self.pycurl.E_FILESIZE_EXCEEDED):
            value = RangeNotHonoured(f"{call.url}: HTTP {status} to a ranged GET")
        elif error is not None:
            value = CurlError(*error)
        else:
            value = body.getvalue()
        call.answer(i, value)


def _discard(data: bytes) -> None:
    return None


class RemoteStore:
    """Requests that retry transient failures: one libcurl loop for http(s):// (unless `cfg.http_client` says
    fsspec), fsspec filesystems per URL for the others."""

    def __init__(self, cfg: RemoteConfig | None = None, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg or RemoteConfig()
        self.sleep = sleep
        self._fs: dict[str, tuple[Any, str]] = {}
        self._curl: _CurlLoop | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:   # to a DataLoader worker: its own connections, made there
        return {"cfg": self.cfg, "sleep": self.sleep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"], state["sleep"])

    def _uses_curl(self, url: str) -> bool:
        return self.cfg.http_client == "curl" and urlparse(url).scheme in ("http", "https")

    def _curl_get(self, url: str, ranges: list[tuple[int, int]] | None) -> list[Any]:
        with self._lock:
            if self._curl is None or self._curl.pid != os.getpid():   # a forked child: its own connections
                try:
                    self._curl = _CurlLoop(self.cfg)
                except ImportError as e:
                    raise RemoteReadError(f"{url}: pycurl is not installed ({e}); install the project's pinned "
                                          f"dependencies, or use RemoteConfig(http_client='fsspec')") from e
            loop = self._curl
        return loop.get(url, ranges)

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
        if self._uses_curl(url):
            def whole() -> bytes:
                (got,) = self._curl_get(url, None)
                if isinstance(got, BaseException):
                    raise got
                return got
            return self._retry(url, "reading", whole)
        fs, path = self._fs_path(url)
        return self._retry(url, "reading", lambda: fs.cat_file(path))

    def _ranges(self, url: str, starts: list[int], ends: list[int]) -> list[Any]:
        """One try at each range: its bytes, or the exception it failed with."""
        if self._uses_curl(url):
            return self._curl_get(url, list(zip(starts, ends)))
        fs, path = self._fs_path(url)
        return fs.cat_ranges([path] * len(starts), starts, ends, on_error="return")

    def cat_ranges(self, url: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Bytes [start, end) of each range, all requested at once; only the failed ones are retried."""
        out: list[bytes | None] = [None] * len(starts)
        todo = list(range(len(starts)))
        last: BaseException | None = None
        for attempt in range(self.cfg.attempts):
            if attempt:
                self.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                got = self._ranges(url, [starts[i] for i in todo], [ends[i] for i in todo])
            except Exception as e:   # the whole call failed (e.g. the libcurl loop could not start)
                got = [e] * len(todo)
            failed = []
            for i, r in zip(todo, got):
                s, e = starts[i], ends[i]
                if isinstance(r, RangeNotHonoured):
                    raise ShardError(f"{url}: asked for bytes {s}-{e - 1} ({e - s} bytes), got more: the server "
                                     f"ignores Range requests") from r
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
        if not isinstance(e, ShardError) and (e.__cause__ is None or http_status(e.__cause__) != 416):
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
        self._started: tuple[Any, ThreadPoolExecutor, deque, list[int]] | None = None   # start(): want, requests

    def __len__(self) -> int:
        return len(self.index)

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

    def start(self, want) -> None:
        """Send the requests of the first `windows_ahead` windows now, for `want` (the same callable samples() is
        given later): the loader starts the slot's next shard while the current one is still decoded, so that a
        shard's first window costs no round trip of its own (measured at 20 ms: 8 shards of 128 samples ran at
        52% of the local rate, one shard of 1024 at 65%)."""
        if self._started is None:
            pool = ThreadPoolExecutor(self.store.cfg.windows_ahead)
            self._started = (want, pool, deque(), [0])
            self._fill(*self._started)

    def _fill(self, want, pool: ThreadPoolExecutor, pending: deque, nxt: list[int]) -> None:
        while len(pending) < self.store.cfg.windows_ahead and nxt[0] < len(self.index):
            rows, nxt[0] = self._plan(want, nxt[0])
            pending.append((rows, pool.submit(self._fetch, rows)))

    def close(self) -> None:
        """Stop what start() sent and samples() did not take (no request outlives the reader)."""
        if self._started is not None:
            self._started[1].shutdown(wait=True, cancel_futures=True)
            self._started = None

    def samples(self, want) -> Iterator[tuple[str, dict[str, memoryview] | None]]:
        """Yields (key, {suffix: bytes view}) per sample in tar order, or (key, None) for one `want` declined."""
        self.start(want)
        started, pool, pending, nxt = self._started
        if started is not want:
            raise ValueError(f"shard {self.url}: samples() asked with another `want` than start() was given")
        try:
            while True:
                self._fill(want, pool, pending, nxt)
                if not pending:
                    return
                rows, fut = pending.popleft()
                blocks = fut.result()
                self._fill(want, pool, pending, nxt)   # keep `windows_ahead` in flight while this one is decoded
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
            self.close()   # after an error or an early stop: no stray request
