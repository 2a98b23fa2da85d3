"""Test media made with the real ffmpeg, and a loopback HTTP server that serves it to the real yt-dlp.

`make_media` writes an mp4 (h264 + aac, `+faststart`) or other shapes from lavfi sources. `MediaServer` serves
files under fixed paths with HTTP Range support (yt-dlp's section download has ffmpeg seek over HTTP), and each
path has a `Route` describing its behaviour, so fault tests can script a path: fail N times with 429 and then
succeed, answer 500, stall, serve HTML instead of video. Every request is counted per path.
"""
from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from demo.server import parse_range


@dataclass
class MediaSpec:
    duration: float
    width: int = 320
    height: int = 240
    fps: int = 10
    video: bool = True
    audio: bool = True
    sample_rate: int = 44100
    channels: int = 2
    tone_hz: float = 440.0          # a different tone per clip makes every clip's fbank distinct
    keyframe_s: float = 1.0         # short GOPs: section downloads start near the requested time
    container: str = "mp4"
    noise_seed: int | None = None   # pink noise instead of tones: no period, so a time offset is unambiguous


def make_media(path: Path, spec: MediaSpec) -> Path:
    """Encode `spec` with ffmpeg into `path`; raises CalledProcessError with ffmpeg's message on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    maps = []
    if spec.video:
        cmd += ["-f", "lavfi", "-i",
                f"testsrc2=size={spec.width}x{spec.height}:rate={spec.fps}:duration={spec.duration}"]
        maps += ["-map", f"{len(maps) // 2}:v"]
    if spec.audio:
        # Left and right differ (tone vs. half-frequency tone) so a downmix is distinguishable from one channel.
        expr = f"0.4*sin(2*PI*{spec.tone_hz}*t)+0.05*sin(2*PI*37*t)"
        if spec.channels == 2:
            expr += f"|0.3*sin(2*PI*{spec.tone_hz / 2}*t)"
        source = (f"aevalsrc={expr}:s={spec.sample_rate}:d={spec.duration}" if spec.noise_seed is None else
                  f"anoisesrc=color=pink:seed={spec.noise_seed}:amplitude=0.3:r={spec.sample_rate}:d={spec.duration}")
        cmd += ["-f", "lavfi", "-i", source]
        maps += ["-map", f"{len(maps) // 2}:a"]
    cmd += maps
    if spec.video:
        gop = max(1, int(round(spec.keyframe_s * spec.fps)))
        cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(gop)]
    if spec.audio:
        cmd += ["-c:a", "aac", "-b:a", "96k", "-ar", str(spec.sample_rate), "-ac", str(spec.channels)]
    if spec.container == "mp4":
        cmd += ["-movflags", "+faststart", "-f", "mp4"]
    else:
        cmd += ["-f", spec.container]
    subprocess.run(cmd + [str(path)], check=True, capture_output=True, timeout=120)
    return path


HTML_PAGE = b"<!doctype html><html><head><title>Not a video</title></head><body><p>Nothing to see.</p></body></html>"


@dataclass
class Route:
    """How the server answers one path. Attributes may be changed while the server runs."""
    file: Path | None = None
    body: bytes | None = None
    content_type: str = "video/mp4"
    status: int = 200
    fail_first: int = 0          # answer `fail_status` to the first N requests, then behave normally
    fail_status: int = 429
    stall_s: float = 0.0         # sleep this long before answering (timeouts)
    reason: str | None = None    # HTTP reason phrase of error answers (clients quote it in their messages)
    drop_after_bytes: int | None = None  # send this much of the body, then close the connection (a reset)
    headers: dict[str, str] = field(default_factory=dict)
    served: int = 0              # requests answered so far (maintained by the server)




class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # Clients that hang up (ffmpeg seeking, killed downloads) are normal here; anything else is a bug.
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class MediaServer:
    """ThreadingHTTPServer on 127.0.0.1 and a free port; `routes` maps a URL path to its Route."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="media-server", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def url_template(self, prefix: str = "/v/", suffix: str = ".mp4") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}{{youtube_id}}{suffix}"

    def start(self) -> "MediaServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "MediaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take(self, path: str) -> tuple[Route | None, int | None]:
        """The route and, if this request is one of its scripted failures, the status to fail with."""
        with self._lock:
            self.hits[path] += 1
            route = self.routes.get(path)
            if route is None:
                return None, None
            route.served += 1
            fail = route.fail_status if route.served <= route.fail_first else None
            return route, fail

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                route, fail = server._take(path)
                try:
                    if route is not None and route.stall_s:
                        time.sleep(route.stall_s)
                    if route is None:
                        return self._plain(404, b"not found", head)
                    if fail is not None:
                        return self._plain(fail, f"scripted failure {fail}".encode(), head, route.reason)
                    if route.status != 200:
                        return self._plain(route.status, f"status {route.status}".encode(), head, route.reason)
                    data = route.body if route.body is not None else Path(route.file).read_bytes()
                    self._content(data, route, head)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # clients (ffmpeg seeking) hang up mid-body all the time

            def _plain(self, status: int, body: bytes, head: bool, reason: str | None = None) -> None:
                self.send_response(status, reason)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _content(self, data: bytes, route: Route, head: bool) -> None:
                size = len(data)
                start, end = 0, size - 1
                rng = parse_range(self.headers.get("Range"), size)  # the demo server's Range rules
                if rng == "unsatisfiable":
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng is not None:
                    start, end = rng
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                for k, v in route.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                body = data[start:end + 1]
                if route.drop_after_bytes is not None and route.drop_after_bytes < len(body):
                    self.wfile.write(body[: route.drop_after_bytes])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees the body end early
                    return
                self.wfile.write(body)

        return Handler
