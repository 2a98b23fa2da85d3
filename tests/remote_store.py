"""A real remote store for the tests and benchmarks/bench_remote.py: nginx serving a directory with byte ranges,
optionally with latency added by nginx itself, moto's S3 server (`MotoS3`, for s3://), and a small fault proxy of
our own in front of either.

nginx runs unprivileged in the foreground (`master_process off`: one process, no privilege drop, so it can read
test temp dirs that only their owner may enter), on a free loopback port, with an access log that records
method, path, status, $bytes_sent, the Range and User-Agent headers of every request, which is how the tests count
bytes and tell the HTTP clients apart.

Latency (`delay_s`, the benchmark's): nginx's echo module (Debian's libnginx-mod-http-echo) waits on a timer
(`echo_sleep`) at the start of every request, then hands it to the static file handler (`echo_exec`), so ranges,
404s and 416s are answered as without the delay, and the bytes still go out by sendfile. A Python proxy copying
every byte in front of nginx cost about as much CPU as the loader's HTTP client, on the same cores.

The fault proxy exists because nginx cannot fail on cue: per request it takes the next scripted fault for that
path (503, 404, 403; "reset": the upstream's status and headers, half the body, then a TCP reset; "ignore-range":
the request without its Range header, as to a server that has no range support) or forwards the request to nginx
unchanged. It also logs every request as nginx does (method, path, status, bytes, Range, User-Agent), which is
how the s3:// tests count requests and bytes: moto keeps no access log.

TLS (`tls=`, https://): certificates the tests make with `cryptography` (`make_tls`: a throwaway CA and a server
certificate it signs, for 127.0.0.1 or, to test a hostname mismatch, another name); a client trusts the CA as a
user would trust theirs, through SSL_CERT_FILE. A handshake a client refuses never reaches the access log; nginx
notes the connection in its error log (`closed_before_request()`), which is how the tests count the tries.
"""
from __future__ import annotations

import datetime
import http.client
import ipaddress
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NGINX_CONF = """\
{modules}
daemon off;
master_process off;
worker_processes 1;
pid {state}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format counted '$request_method $uri $status $bytes_sent "$http_range" "$http_user_agent"';
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
        listen 127.0.0.1:{port}{ssl};
        root {root};
{tls}{locations}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).exists()), None)
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/setup.sh (it installs Debian's nginx)")
    return found


def echo_module() -> Path:
    """nginx's echo module (echo_sleep), from the modules directory the nginx binary was built with."""
    out = subprocess.run([nginx_binary(), "-V"], capture_output=True, text=True).stderr
    found = next((Path(a.split("=", 1)[1]) for a in out.split() if a.startswith("--modules-path=")),
                 Path("/usr/lib/nginx/modules")) / "ngx_http_echo_module.so"
    if not found.exists():
        raise RuntimeError(f"{found} is missing: nginx adds the benchmark's latency with its echo module; run "
                           f"scripts/setup.sh (it installs Debian's libnginx-mod-http-echo)")
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


@dataclass(frozen=True)
class TLS:
    """PEM files of a test CA and of a server certificate it signed (`make_tls`)."""
    ca_cert: Path   # what a client trusts: SSL_CERT_FILE
    ca_key: Path
    cert: Path      # the server's (nginx's ssl_certificate)
    key: Path


def _write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())   # P-256: made in a millisecond, unlike RSA
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def _key_usage(*allowed: str) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: n in allowed for n in names})


def _certificate(subject: x509.Name, key, issuer: x509.Name, issuer_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder(subject_name=subject, issuer_name=issuer, public_key=key.public_key(),
                                      serial_number=x509.random_serial_number(),
                                      not_valid_before=now - datetime.timedelta(hours=1),
                                      not_valid_after=now + datetime.timedelta(days=2))
    # key identifiers, critical basic constraints and key usages: what OpenSSL's strict verification (the default
    # context of Python >= 3.13) asks of a chain
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(directory: Path, names: tuple[str, ...] = ("127.0.0.1",), ca: TLS | None = None) -> TLS:
    """A server certificate for `names` (IP addresses or DNS names) in `directory`, signed by `ca`'s CA, or by a
    new CA written beside it when `ca` is None."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if ca is None:
        ca = TLS(directory / "ca.pem", directory / "ca-key.pem", directory / "server.pem", directory / "server-key.pem")
        ca_key = _write_key(ca.ca_key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"avcap test CA {directory.name}")])
        ca_cert = _certificate(name, ca_key, name, ca_key,
                               [(x509.BasicConstraints(ca=True, path_length=0), True),
                                (_key_usage("key_cert_sign", "crl_sign"), True)])
        ca.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca = TLS(ca.ca_cert, ca.ca_key, directory / "server.pem", directory / "server-key.pem")
        ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    key = _write_key(ca.key)
    alt = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), key, ca_cert.subject, ca_key,
                        [(x509.SubjectAlternativeName(alt), False),
                         (x509.BasicConstraints(ca=False, path_length=None), True),
                         (_key_usage("digital_signature"), True),
                         (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                         (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])
    ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


@dataclass
class LogLine:
    method: str
    path: str
    status: int
    bytes_sent: int       # headers and body, as nginx counts them
    range: str            # the Range header, "-" when none
    agent: str            # the User-Agent header, "-" when none


class _Service:
    """A loopback server the tests start and stop: a context manager over `start()` / `stop()`."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Nginx(_Service):
    """`nginx -p STATE -c nginx.conf -e stderr` serving `root` on a free loopback port (a context manager),
    every request answered `delay_s` late (whole milliseconds: nginx reads 3 decimals; see the module docstring);
    over https with `tls`'s server certificate when given."""

    def __init__(self, root: Path, state: Path, delay_s: float = 0.0, tls: TLS | None = None):
        self.root, self.state = Path(root).resolve(), Path(state).resolve()
        self.delay_s = delay_s
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        self.state.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):   # the free port may be taken between our probe and nginx's bind
            self.port = free_port()
            conf = self.state / "nginx.conf"
            if self.delay_s:
                modules = f"load_module {echo_module()};"
                locations = (f"        location / {{ echo_sleep {self.delay_s:.3f}; echo_exec @file; }}\n"
                             "        location @file { }")
            else:
                modules, locations = "", "        location / { }"
            ssl, tls = "", ""
            if self.tls:
                ssl = " ssl"
                tls = (f"        error_log {self.state}/error.log info;\n"
                       f"        ssl_certificate {self.tls.cert.resolve()};\n"
                       f"        ssl_certificate_key {self.tls.key.resolve()};\n")
            conf.write_text(_NGINX_CONF.format(state=self.state, port=self.port, root=self.root, modules=modules,
                                               locations=locations, ssl=ssl, tls=tls))
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


    def closed_before_request(self) -> int:
        """Connections the client closed before sending a request, so far: each a refused certificate (and the
        probe that saw nginx listening). nginx notes them as "while SSL handshaking" or, when the client's alert
        came after nginx's part of the handshake (TLS 1.3), "while waiting for request"."""
        path = self.state / "error.log"
        text = path.read_text() if path.exists() else ""
        return text.count(" while SSL handshaking") + text.count(" while waiting for request")

    def log(self) -> list[LogLine]:
        """Every request so far (nginx writes a line as each request ends)."""
        path = self.state / "access.log"
        lines = []
        for raw in path.read_text().splitlines() if path.exists() else []:
            head, _, quoted = raw.partition(' "')
            rng, _, agent = quoted.partition('" "')
            method, p, status, sent = head.split()
            lines.append(LogLine(method, p, int(status), int(sent), rng, agent.rstrip('"')))
        return lines


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as a real store: fsspec reuses its connections

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None

    def log_message(self, *args) -> None:
        pass

    def _forward(self, method: str, keep_range: bool = True) -> http.client.HTTPResponse:
        # and a signed request's signature (S3: moto refuses an unsigned request to a private bucket)
        kept = ("range", "accept-encoding", "user-agent", "authorization") if keep_range else (
            "accept-encoding", "user-agent", "authorization")
        headers = {k: v for k, v in self.headers.items() if k.lower() in kept or k.lower().startswith("x-amz-")}
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
        fault = proxy.take(method, self.path)
        proxy.record(method, self.path, fault)
        rng, agent = self.headers.get("Range", "-"), self.headers.get("User-Agent", "-")
        if fault in ("503", "404", "403"):
            body = f"injected {fault}\n".encode()
            proxy.logged(LogLine(method, self.path, int(fault), len(body), rng, agent))
            self.send_response(int(fault))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)
            return
        resp = self._forward(method, keep_range=fault != "ignore-range")
        body = resp.read()
        proxy.logged(LogLine(method, self.path, resp.status, 0 if method == "HEAD" else len(body), rng, agent))
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


class FaultProxy(_Service):
    """Threaded HTTP proxy to 127.0.0.1:`upstream_port` that answers with scripted faults or forwards."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._faults: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, fault injected or None)
        self._log: list[LogLine] = []
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, path: str, *faults: str, method: str = "GET") -> None:
        """The next requests for `path` (by `method`) get `faults` in order ("503", "404", "403", "reset",
        "ignore-range")."""
        with self._lock:
            self._faults[(method, path)].extend(faults)

    def take(self, method: str, path: str) -> str | None:
        with self._lock:
            queue = self._faults.get((method, path))
            return queue.pop(0) if queue else None

    def record(self, method: str, path: str, fault: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, fault))

    def logged(self, line: LogLine) -> None:
        with self._lock:
            self._log.append(line)

    def log(self) -> list[LogLine]:
        """Every request answered so far, as in nginx's log (`bytes_sent`: the body the upstream gave, whole
        even when a "reset" cut it), for a store that keeps no access log of its own (moto)."""
        with self._lock:
            return list(self._log)

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



class MotoS3(_Service):
    """moto's S3 server (`python -m moto.server`, a real S3 HTTP API kept in memory) on a free loopback port, in
    its own process like nginx (a context manager). Clients reach it through the environment (`env()`): dummy
    credentials and the endpoint, as for MinIO or any other S3-compatible store. With `tls` it serves https with
    that certificate (as S3 itself does)."""

    def __init__(self, tls: TLS | None = None):
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint or self.url}

    def start(self) -> "MotoS3":
        for attempt in range(3):   # the free port may be taken between our probe and moto's bind
            self.port = free_port()
            tls = ["-s", "-c", str(self.tls.cert), "-k", str(self.tls.key)] if self.tls else []
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                          str(self.port), *tls], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _wait_listening(self.port, self.proc, "moto_server", timeout=60)
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()   # its access log: drained
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        return self

    stop = Nginx.stop

