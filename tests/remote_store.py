"""A real remote store for the tests and benchmarks/bench_remote.py: nginx serving a directory with byte ranges,
and a small fault/latency proxy of our own in front of it.

nginx runs unprivileged in the foreground (`master_process off`: one process, no privilege drop, so it can read
test temp dirs that only their owner may enter), on a free loopback port, with an access log that records
method, path, status, $bytes_sent and the Range header of every request, which is how the tests count bytes.

The proxy exists because nginx cannot add latency or fail on cue: per request it waits `delay_s`, then takes the
next scripted fault for that path (503, 404, 403, or "reset": the upstream's status and headers, half the body,
then a TCP reset) or forwards the request to nginx unchanged.
"""
from __future__ import annotations

import http.client
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {state}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format counted '$request_method $uri $status $bytes_sent "$http_range"';
    access_log {state}/access.log counted;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).exists()), None)
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/setup.sh (it installs Debian's nginx)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


@dataclass
class LogLine:
    method: str
    path: str
    status: int
    bytes_sent: int       # headers and body, as nginx counts them
    range: str            # the Range header, "-" when none


class Nginx:
    """`nginx -p STATE -c nginx.conf -e stderr` serving `root` on a free loopback port (a context manager)."""

    def __init__(self, root: Path, state: Path):
        self.root, self.state = Path(root).resolve(), Path(state).resolve()
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        self.state.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):   # the free port may be taken between our probe and nginx's bind
            self.port = free_port()
            conf = self.state / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(state=self.state, port=self.port, root=self.root))
            self.proc = subprocess.Popen([nginx_binary(), "-p", str(self.state), "-c", str(conf), "-e", "stderr"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _wait_listening(self.port, self.proc, "nginx")
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> list[LogLine]:
        """Every request so far (nginx writes a line as each request ends)."""
        path = self.state / "access.log"
        lines = []
        for raw in path.read_text().splitlines() if path.exists() else []:
            head, _, rng = raw.partition(' "')
            method, p, status, sent = head.split()
            lines.append(LogLine(method, p, int(status), int(sent), rng.rstrip('"')))
        return lines


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as a real store: fsspec reuses its connections

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None

    def log_message(self, *args) -> None:
        pass

    def _forward(self, method: str) -> http.client.HTTPResponse:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept-encoding")}
        for attempt in range(2):   # nginx may have closed an idle keep-alive connection
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection("127.0.0.1", self.server.proxy.upstream_port, timeout=30)
            try:
                self.upstream.request(method, self.path, headers=headers)
                return self.upstream.getresponse()
            except (ConnectionError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _handle(self, method: str) -> None:
        proxy: FaultProxy = self.server.proxy
        if proxy.delay_s:
            time.sleep(proxy.delay_s)
        fault = proxy.take(method, self.path)
        proxy.record(method, self.path, fault)
        if fault in ("503", "404", "403"):
            body = f"injected {fault}\n".encode()
            self.send_response(int(fault))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)
            return
        resp = self._forward(method)
        body = resp.read()
        self.send_response(resp.status)
        for name in ("Content-Length", "Content-Range", "Content-Type", "Accept-Ranges", "Last-Modified", "ETag"):
            if resp.getheader(name) is not None:
                self.send_header(name, resp.getheader(name))
        self.end_headers()
        if method == "HEAD":
            return
        if fault == "reset":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            # SO_LINGER 0: close() sends a TCP RST, the client sees its connection reset mid-body
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass   # the connection we reset on purpose
        if self.upstream is not None:
            self.upstream.close()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256   # the default listen backlog (5) drops a burst of concurrent connects: 1 s SYN retries


class FaultProxy:
    """Threaded HTTP proxy to 127.0.0.1:`upstream_port` that adds `delay_s` per request and scripted faults."""

    def __init__(self, upstream_port: int, delay_s: float = 0.0):
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self._faults: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, fault injected or None)
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, path: str, *faults: str, method: str = "GET") -> None:
        """The next requests for `path` (by `method`) get `faults` in order ("503", "404", "403", "reset")."""
        with self._lock:
            self._faults[(method, path)].extend(faults)

    def take(self, method: str, path: str) -> str | None:
        with self._lock:
            queue = self._faults.get((method, path))
            return queue.pop(0) if queue else None

    def record(self, method: str, path: str, fault: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, fault))

    def start(self) -> "FaultProxy":
        self.server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.proxy = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _delay_pump(reader, writer, upstream_port: int, delay_s: float) -> None:
    """One client connection of the DelayProxy: each chunk from the client (a request head: HTTP clients do not
    pipeline) waits `delay_s`, then goes to nginx; nginx's bytes come back unparsed."""
    import asyncio
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)

    async def client_to_upstream():
        while chunk := await reader.read(1 << 16):
            await asyncio.sleep(delay_s)
            up_writer.write(chunk)
            await up_writer.drain()
        up_writer.close()

    async def upstream_to_client():
        while chunk := await up_reader.read(1 << 20):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    try:
        await asyncio.gather(client_to_upstream(), upstream_to_client())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        up_writer.close()


def serve_delay_proxy(upstream_port: int, delay_s: float) -> None:
    """A byte-pumping latency proxy (asyncio, no HTTP parsing): the benchmark's, where FaultProxy's per-request
    Python HTTP handling would be the bottleneck. Prints its URL, then serves until killed."""
    import asyncio

    async def main():
        server = await asyncio.start_server(lambda r, w: _delay_pump(r, w, upstream_port, delay_s), "127.0.0.1", 0,
                                            backlog=256)
        print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


class ProxyProcess:
    """The delay proxy (serve_delay_proxy) in a process of its own, so that its CPU does not count against the
    loader being measured (benchmarks/bench_remote.py). A context manager; `url` once started."""

    def __init__(self, upstream_port: int, delay_s: float):
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "ProxyProcess":
        import sys
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.remote_store", str(self.upstream_port),
                                      str(self.delay_s)], cwd=root, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the proxy process did not start (said {self.url!r})")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


if __name__ == "__main__":   # python -m tests.remote_store UPSTREAM_PORT DELAY_S: prints its URL, serves
    import sys
    serve_delay_proxy(int(sys.argv[1]), float(sys.argv[2]))
