"""A loopback HTTP server for the demo clips: `/v/{youtube_id}.mp4` with byte ranges.

yt-dlp's generic extractor downloads a plain mp4 URL, and its download-sections path hands the URL to ffmpeg,
which seeks with HTTP Range requests; so the server answers HEAD, full GETs and single `bytes=` ranges (206),
and 416 for a range it cannot satisfy. It listens on 127.0.0.1 only, on a free port.

    with MediaServer(media_dir) as server:
        url_template = server.url_template   # http://127.0.0.1:PORT/v/{youtube_id}.mp4
"""
from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PATH_RE = re.compile(r"^/v/([A-Za-z0-9_-]{11})\.mp4$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 16


@dataclass
class RequestRecord:
    method: str
    path: str
    range: str | None
    status: int


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(first, last) inclusive for a satisfiable single range, None for no/ignored range, "unsatisfiable"."""
    if not header:
        return None
    m = _RANGE_RE.match(header.strip())
    if m is None:
        return None  # multi-range or another unit: RFC 9110 allows answering with the whole file
    first_s, last_s = m.groups()
    if not first_s and not last_s:
        return "unsatisfiable"
    if not first_s:  # suffix range: the last N bytes
        n = int(last_s)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, last


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"  # keep-alive, as ffmpeg's http client expects

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        m = _PATH_RE.match(self.path.split("?", 1)[0])
        path = self.server.media_dir / f"{m.group(1)}.mp4" if m else None
        if path is None or not path.is_file():
            self._status_only(404)
            return
        size = path.stat().st_size
        rng = parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            self._status_only(416, {"Content-Range": f"bytes */{size}"})
            return
        first, last = rng if rng else (0, size - 1)
        status = 206 if rng else 200
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last - first + 1))
        if rng:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if not send_body:
            return
        try:
            with open(path, "rb") as f:
                f.seek(first)
                left = last - first + 1
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # ffmpeg drops the connection when it seeks elsewhere: normal, not an error

    def _status_only(self, status: int, headers: dict[str, str] | None = None) -> None:
        self._record(status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _record(self, status: int) -> None:
        with self.server.lock:
            self.server.records.append(RequestRecord(self.command, self.path, self.headers.get("Range"), status))

    def log_message(self, format: str, *args) -> None:
        pass  # the demo prints its own progress; per-request lines would drown it


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    media_dir: Path
    records: list[RequestRecord]
    lock: threading.Lock

    def handle_error(self, request, client_address) -> None:
        # A client closing a keep-alive connection mid-read is how ffmpeg ends a session: not worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


@dataclass
class MediaServer:
    """Serves media_dir/{youtube_id}.mp4 at http://127.0.0.1:PORT/v/{youtube_id}.mp4 while in a `with` block."""
    media_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port chosen by the OS
    _server: _Server | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _records: list[RequestRecord] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def start(self) -> "MediaServer":
        if not Path(self.media_dir).is_dir():
            raise FileNotFoundError(f"media_dir {self.media_dir} is not a directory")
        server = _Server((self.host, self.port), _Handler)
        server.media_dir, server.records, server.lock = Path(self.media_dir), self._records, self._lock
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="demo-media-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "MediaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url_template(self) -> str:
        """The pipeline's --url-template: `{youtube_id}` is filled per clip."""
        return self.base_url + "/v/{youtube_id}.mp4"

    def url(self, youtube_id: str) -> str:
        return self.url_template.format(youtube_id=youtube_id)

    @property
    def records(self) -> list[RequestRecord]:
        """Every request answered so far (method, path, Range header, status); kept after stop()."""
        with self._lock:
            return list(self._records)
