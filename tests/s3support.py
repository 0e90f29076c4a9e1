"""Test support for object storage: a moto S3 server in a subprocess and a fault-injecting
S3 proxy in front of it.

The moto server runs as a child process (``python -m moto.server``) so that it outlives a
build killed with ``kill -9`` and serves any process of a build (task-runner workers, a CLI
subprocess). The proxy (:class:`FaultProxy`, stdlib only, threaded) forwards every request to
it and, on a seeded share of requests, answers ``503 SlowDown`` with S3's XML error body or
drops the connection: before any response, or (for GETs) in the middle of the body. It keeps
counts of what it did and the access key ids it saw (in memory only) so a test can show that
faults happened and which credentials a client used.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FaultProxy",
    "MotoServer",
    "files_newer_than",
    "find_needles",
    "free_port",
    "needles",
    "s3fs_for",
]

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)
"""S3's throttling answer (HTTP 503)."""

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "content-length"}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Expected a server at {url}. Got exit code {proc.returncode}.")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310  (loopback)
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"Expected a server at {url} within {timeout:.0f} s. Got no answer.")


class MotoServer:
    """``python -m moto.server`` on loopback, as a child process in its own session."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> MotoServer:
        """Start the server and wait until it answers."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        _wait_http(f"{self.url}/moto-api/", timeout, self.proc)
        return self

    def stop(self) -> None:
        """Stop the server (and wait for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def s3fs_for(endpoint: str, **kwargs: Any):  # noqa: ANN201
    """A fresh s3fs filesystem on an endpoint (credentials from the environment)."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **kwargs)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silent: no access log (it would show request lines on stderr)."""

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.server.count("chunked_request")
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self, reset: bool) -> None:
        """Close the connection without (the rest of) a response."""
        self.close_connection = True
        try:
            if reset:  # RST: "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        body = self._read_body()
        auth = self.headers.get("Authorization") or ""
        proxy = self.server
        if m := _CREDENTIAL.search(auth):
            proxy.key_ids.add(m.group(1))
        elif m := _CREDENTIAL.search(self.path.replace("%2F", "/")):
            proxy.key_ids.add(m.group(1))
        fault = proxy.draw(self.command)
        proxy.count("requests")
        proxy.count(f"method_{self.command}")
        if "range" in {k.lower() for k in self.headers}:
            proxy.count("range_request")
        if fault == "slowdown":
            proxy.count("slowdown")
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN_BODY)
            return
        if fault in ("drop", "reset"):
            proxy.count(fault)
            self._drop(reset=fault == "reset")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            length = resp.getheader("Content-Length")
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in out_headers:
            self.send_header(k, v)
        if self.command == "HEAD":
            if length is not None:  # the object's size, with no body
                self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "midbody" and len(data) >= 2:
            proxy.count("midbody")
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop(reset=False)
            return
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], upstream: tuple[str, int], seed: int,
                 slowdown: float, drop: float, midbody: float) -> None:
        super().__init__(addr, _Handler)
        self.upstream = upstream
        self.rates = {"slowdown": slowdown, "drop": drop, "midbody": midbody}
        self.enabled = True
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.key_ids: set[str] = set()

    def count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    def draw(self, method: str) -> str | None:
        """The fault for the next request (seeded), or None."""
        with self.lock:
            if not self.enabled:
                return None
            x = self.rng.random()
            coin = self.rng.random()
        s, d, m = self.rates["slowdown"], self.rates["drop"], self.rates["midbody"]
        if x < s:
            return "slowdown"
        if x < s + d:
            return "reset" if coin < 0.5 else "drop"
        if x < s + d + m and method == "GET":  # a broken body only where there is one
            return "midbody"
        return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients that give up on a dropped connection are expected."""
        self.count("handler_error")


class FaultProxy:
    """A threaded HTTP proxy in front of an S3 endpoint that injects S3 faults.

    Args:
        upstream: the real endpoint, ``http://host:port``.
        slowdown: share of requests answered ``503 SlowDown`` (not forwarded).
        drop: share of requests whose connection is closed (FIN or RST) with no response
            (not forwarded).
        midbody: share of GET requests forwarded, whose response body is cut in the middle.
        seed: seeds the fault draws.
    """

    def __init__(self, upstream: str, *, slowdown: float = 0.0, drop: float = 0.0,
                 midbody: float = 0.0, seed: int = 0) -> None:
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self._server = _ProxyServer(("127.0.0.1", 0), (host, int(port)), seed, slowdown, drop, midbody)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fault-proxy")

    @property
    def stats(self) -> Counter[str]:
        """Counts: requests, per method, slowdown, drop, reset, midbody, range_request, ..."""
        with self._server.lock:
            return Counter(self._server.stats)

    @property
    def key_ids(self) -> set[str]:
        """Access key ids seen in request signatures (memory only)."""
        with self._server.lock:
            return set(self._server.key_ids)

    def faults(self, enabled: bool) -> None:
        """Turn fault injection on or off."""
        with self._server.lock:
            self._server.enabled = enabled

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def needles(secret: str) -> list[bytes]:
    """Byte patterns that would reveal ``secret``: as is, URL-quoted, JSON-escaped (``\\/``
    too), UTF-16, inside base64 at each of the three alignments (the stable middle of each
    encoding), and its longest run of letters, digits and dashes (whatever escaping the
    other characters get) when that run is 16 characters or more."""
    import base64
    import json
    from urllib.parse import quote

    raw = secret.encode()
    out = {raw, quote(secret, safe="").encode(), json.dumps(secret)[1:-1].encode(),
           secret.encode("utf-16-le"), json.dumps(secret)[1:-1].replace("/", "\\/").encode()}
    runs = re.findall(r"[A-Za-z0-9-]{16,}", secret)
    if runs:
        out.add(max(runs, key=len).encode())
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + raw)
        core = enc[4:-4] if len(enc) > 12 else enc
        out.add(core)
    return sorted(out)


def find_needles(blobs: Iterable[tuple[str, bytes]], secrets: Iterable[str]) -> list[str]:
    """``"where: which"`` for every blob that holds any pattern of any secret."""
    pats = [(s[:14] + "...", n) for s in secrets for n in needles(s)]
    hits = []
    for where, data in blobs:
        for label, n in pats:
            if n in data:
                hits.append(f"{where}: {label}")
                break
    return hits


def files_newer_than(root: str, since: float, skip: Iterable[str] = (),
                     max_bytes: int = 256 << 20) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of regular files under ``root`` modified at or after ``since``."""
    skip_real = {os.path.realpath(p) for p in skip}
    for dirpath, _dirs, names in os.walk(root, onerror=lambda e: None):
        for name in names:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if not (st.st_mtime >= since or st.st_ctime >= since):
                    continue
                if not os.path.isfile(p) or os.path.islink(p) or st.st_size > max_bytes:
                    continue
                if os.path.realpath(p) in skip_real:
                    continue
                with open(p, "rb") as f:
                    yield p, f.read()
            except OSError:
                continue
