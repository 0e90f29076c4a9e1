"""HTTP for the STAC source: range reads of Cloud-Optimised GeoTIFFs with retries, and the
glue that lets rasterio (GDAL) read a COG through them.

- :class:`RangeClient` sends GET requests (whole or byte ranges) over a bounded pool of
  connections. Throttling (429, honouring ``Retry-After`` in seconds), 5xx, 408, dropped
  connections, timeouts and truncated bodies are retried with doubling waits; 400, 401, 403,
  404, 410 and other 4xx fail at once (:class:`FetchError` with ``permanent=True``). Every
  body's length is checked against what was asked, so a cut body never reaches the decoder.
- :func:`open_cog` gives rasterio a COG behind a URL via its Python opener interface: GDAL
  asks for the header and then for the byte ranges of the tiles a window needs; only those are
  fetched (no full-scene download).

URLs may carry a signature (a SAS token) in their query: errors and logs show them without it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import urllib3
from rasterio._vsiopener import MultiByteRangeResource, MultiByteRangeResourceContainer

__all__ = ["FetchError", "HttpStats", "RangeClient", "open_cog", "redact_url"]

HEAD_BYTES = 16_384
"""First bytes fetched of a COG (header and IFDs of a typical COG fit in them)."""
MIN_READ = 16_384
"""Smallest range fetched for a read that the cached bytes do not cover."""
MERGE_GAP = 16_384
"""Ranges closer than this are fetched as one request."""
_PERMANENT = frozenset({400, 401, 403, 404, 405, 410, 411, 413, 414, 416, 422})
_MAX_WAIT_S = 60.0


def redact_url(url: str) -> str:
    """A URL without its query (where signatures live)."""
    return url.split("?", 1)[0]


class FetchError(Exception):
    """A request failed: ``permanent`` when retrying cannot help, else after every attempt.

    ``status`` is the HTTP status (None for a connection-level failure).
    """

    def __init__(self, url: str, message: str, status: int | None, permanent: bool) -> None:
        self.url = redact_url(url)
        self.status = status
        self.permanent = permanent
        super().__init__(f"{message} ({self.url})")


@dataclass
class HttpStats:
    """What a client did (summed over threads; for tests and benchmarks)."""

    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n_bytes: int, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n_bytes
            self.seconds += seconds

    def retry(self, why: str) -> None:
        with self.lock:
            self.retries[why] = self.retries.get(why, 0) + 1


class RangeClient:
    """GET with retries over at most ``max_connections`` connections at once.

    Args:
        max_connections: Connections open at once (all hosts together).
        timeout_s: Connect and read timeout per request.
        max_attempts: Attempts per request for transient failures.
        backoff_s: First wait between attempts (doubling); a 429's Retry-After wins.
    """

    def __init__(self, max_connections: int, timeout_s: float, max_attempts: int,
                 backoff_s: float) -> None:
        self._pool = urllib3.PoolManager(
            num_pools=16, maxsize=max_connections, block=True, retries=False,
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        )
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.stats = HttpStats()
        self._local = threading.local()

    def thread_seconds(self) -> float:
        """Seconds this thread has spent in requests (for per-read accounting)."""
        return float(getattr(self._local, "seconds", 0.0))

    def get(self, url: str, start: int | None = None, length: int | None = None
            ) -> tuple[bytes, int | None]:
        """The body (or ``length`` bytes from ``start``) and the resource's total size.

        Raises:
            FetchError: permanent at once; transient after ``max_attempts``.
        """
        headers = {"Accept-Encoding": "identity"}
        if start is not None and length is not None:
            headers["Range"] = f"bytes={start}-{start + length - 1}"
        last = ""
        last_status: int | None = None
        for attempt in range(self.max_attempts):
            wait_s = self.backoff_s * (2 ** attempt)
            t0 = time.perf_counter()
            try:
                with self._slots:
                    resp = self._pool.request("GET", url, headers=headers, preload_content=True,
                                              redirect=True)
                status, body = resp.status, resp.data
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                why = type(exc).__name__
                last, last_status = f"{why} (connection dropped, timed out or body cut)", None
                self.stats.retry(why)
                self._sleep(wait_s, attempt)
                continue
            finally:
                dt = time.perf_counter() - t0
                self._local.seconds = self.thread_seconds() + dt
            self.stats.add(len(body), dt)
            if status in (200, 206):
                got = _checked_body(status, body, resp.headers, start, length)
                if got is not None:
                    return got
                last, last_status = f"HTTP {status} with a short body ({len(body)} bytes)", status
                self.stats.retry("short-body")
                self._sleep(wait_s, attempt)
                continue
            if status in _PERMANENT or (400 <= status < 500 and status not in (408, 429)):
                raise FetchError(url, f"Expected HTTP 200/206. Got HTTP {status}"
                                 f"{_reason(body)}", status, permanent=True)
            last, last_status = f"HTTP {status}{_reason(body)}", status
            self.stats.retry(str(status))
            if status == 429:
                wait_s = _retry_after(resp.headers.get("Retry-After"), wait_s)
            self._sleep(wait_s, attempt)
        raise FetchError(url, f"Expected a complete answer within {self.max_attempts} "
                         f"attempt(s). Got {last}", last_status, permanent=False)

    def _sleep(self, seconds: float, attempt: int) -> None:
        if attempt + 1 < self.max_attempts:
            time.sleep(min(seconds, _MAX_WAIT_S))

    def close(self) -> None:
        self._pool.clear()


def _checked_body(status: int, body: bytes, headers: Any, start: int | None,
                  length: int | None) -> tuple[bytes, int | None] | None:
    """(body, total size) when the body is complete, else None."""
    declared = headers.get("Content-Length")
    if declared is not None and int(declared) != len(body):
        return None
    if start is None or length is None:
        return body, len(body)
    if status == 200:  # the server ignored Range: slice what was asked
        return body[start : start + length], len(body)
    total: int | None = None
    crange = headers.get("Content-Range", "")
    if "/" in crange and not crange.endswith("*"):
        total = int(crange.rsplit("/", 1)[1])
    want = length if total is None else max(0, min(length, total - start))
    if len(body) != want:
        return None
    return body, total


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


def _reason(body: bytes) -> str:
    text = body[:300].decode("utf-8", "replace").strip()
    for tag in ("<Code>", "<code>"):  # Azure blob errors: <Error><Code>AuthenticationFailed
        if tag in text:
            return ": " + text.split(tag, 1)[1].split("<", 1)[0]
    return f": {text[:120]}" if text and not text.startswith("<") else ""


# --- rasterio opener ----------------------------------------------------------------------------
class _RemoteFile(MultiByteRangeResource):
    """A read-only file over HTTP range requests; fetched spans are kept for the open's life."""

    def __init__(self, client: RangeClient, url: str, head: bytes, size: int) -> None:
        self._client = client
        self._url = url
        self._size = size
        self._spans: list[tuple[int, bytes]] = [(0, head)]
        self._pos = 0

    def _cached(self, start: int, n: int) -> bytes | None:
        for s, b in self._spans:
            if s <= start and start + n <= s + len(b):
                return b[start - s : start - s + n]
        return None

    def _fetch(self, start: int, n: int) -> bytes:
        body, _ = self._client.get(self._url, start, n)
        self._spans.append((start, body))
        return body

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._pos
        n = max(0, min(n, self._size - self._pos))
        if n == 0:
            return b""
        got = self._cached(self._pos, n)
        if got is None:
            body = self._fetch(self._pos, min(max(n, MIN_READ), self._size - self._pos))
            got = body[:n]
        self._pos += len(got)
        return got

    def get_byte_ranges(self, offsets: list[int], sizes: list[int]) -> list[bytes]:
        """The ranges GDAL needs for a window: neighbours merged, each merged range one GET."""
        order = sorted(range(len(offsets)), key=lambda i: offsets[i])
        out: list[bytes] = [b""] * len(offsets)
        groups: list[list[int]] = []
        for i in order:
            if groups:
                g = groups[-1]
                end = max(offsets[j] + sizes[j] for j in g)
                if offsets[i] - end <= MERGE_GAP:
                    g.append(i)
                    continue
            groups.append([i])
        for g in groups:
            s = min(offsets[j] for j in g)
            e = max(offsets[j] + sizes[j] for j in g)
            body = self._cached(s, e - s)
            if body is None:
                body = self._fetch(s, e - s)
            for j in g:
                out[j] = body[offsets[j] - s : offsets[j] - s + sizes[j]]
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._spans = []

    def __enter__(self) -> _RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _OneFile(MultiByteRangeResourceContainer):
    """Serves exactly one path (GDAL's probes for sidecar files find nothing)."""

    def __init__(self, path: str, file: _RemoteFile, size: int) -> None:
        self._path = path
        self._file = file
        self._size = size

    def open(self, path: str, mode: str = "r", **kwds: Any) -> _RemoteFile:
        if path != self._path:
            raise FileNotFoundError(path)
        return self._file

    def isfile(self, path: str) -> bool:
        return path == self._path

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        return 0

    def size(self, path: str) -> int:
        return self._size

    def rm(self, path: str) -> None:
        raise PermissionError(path)


@contextlib.contextmanager
def open_cog(client: RangeClient, url: str) -> Iterator[Any]:
    """A rasterio dataset reading the COG at ``url`` through ``client`` (header fetched now).

    Raises:
        FetchError: the header could not be fetched.
        rasterio.errors.RasterioIOError: the bytes are not a readable GeoTIFF.
    """
    import rasterio

    head, size = client.get(url, 0, HEAD_BYTES)
    size = len(head) if size is None else size
    path = f"cog-{uuid.uuid4().hex}.tif"  # one opener per path: unique per open
    container = _OneFile(path, _RemoteFile(client, url, head, size), size)
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), \
            rasterio.open(path, opener=container) as src:
        yield src
