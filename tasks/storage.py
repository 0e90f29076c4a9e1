"""Storage through fsspec: local paths and ``s3://`` URIs, content keys and commit markers.

Intermediates live under the work root at paths derived from what produced them (a content
key), and a result becomes visible only when its commit marker (``_done.json``) is written
last, so a crashed stage never leaves something that looks complete. Credentials for S3 come
from the environment (or a Prefect block upstream) through s3fs; they are never logged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import zarr
from fsspec.core import url_to_fs
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from tasks.config import StorageConfig
from tasks.credentials import redact_secrets, s3_credentials
from tasks.errors import StorageError

T = TypeVar("T")

DONE_SUFFIX = ".done.json"
"""Commit marker written beside a result (``{uri}.done.json``), outside any Zarr hierarchy."""


def storage_options(uri: str, cfg: StorageConfig) -> dict[str, Any]:
    """fsspec options for a URI: S3 endpoint, region, credentials and request retries.

    Credentials are resolved here, at run time, in the process that opens the URI
    (:mod:`tasks.credentials`): the block ``cfg.s3_credentials_block`` names, else botocore's
    own chain (``AWS_*`` environment variables, profile, instance role). The options then hold
    secrets: never log or persist them (:func:`redact` cleans messages).

    Retries, one layer per transport (see :data:`S3FS_BODY_ATTEMPTS`): botocore's "standard"
    mode retries each request on throttling (503 SlowDown), 5xx, timeouts and dropped
    connections, with exponential back-off, for ``cfg.s3_max_attempts`` attempts.
    """
    if uri.startswith("s3://"):
        opts: dict[str, Any] = {
            "config_kwargs": {
                "retries": {"max_attempts": cfg.s3_max_attempts, "mode": "standard"},
                "connect_timeout": 10,
                "read_timeout": 60,
            },
        }
        client: dict[str, Any] = {}
        if cfg.s3_endpoint_url:
            opts["endpoint_url"] = cfg.s3_endpoint_url
        creds = s3_credentials(cfg.s3_credentials_block)
        region = cfg.s3_region or (creds.region if creds else None)
        if region:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
        if creds is not None:
            opts.update(creds.options())
        return opts
    return {}


_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
    "500", "502", "503", "504",
})
"""S3 / botocore error codes and HTTP statuses that mark a transient error."""
_TRANSIENT_TYPES = (
    "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError",
    "ConnectTimeoutError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
    "IncompleteReadError", "ResponseStreamingError", "ServerTimeoutError",
)
"""Exception class names (botocore, aiohttp) of dropped connections and timeouts."""


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code or HTTP status of a botocore ClientError, else None."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error") or {}
        code = err.get("Code")
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(code or status) if (code or status) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying: throttling, 5xx, timeouts, dropped connections.

    Judged from the error's type and, for S3, its structured error code or HTTP status
    (never from substrings of a message, which may hold anything, a tile id included). The
    cause chain is followed, since s3fs and zarr wrap botocore's errors.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
            return False
        if isinstance(e, TimeoutError | ConnectionError):
            return True
        if type(e).__name__ in _TRANSIENT_TYPES:
            return True
        code = _error_code(e)
        if code is not None:
            return code in _TRANSIENT_CODES
        e = e.__cause__ or e.__context__
    return False


def with_retries(
    fn: Callable[[], T],
    *,
    delays_s: Sequence[float] = (0.5, 2.0, 8.0),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on a transient error retry after each delay in turn, then re-raise.

    For whole operations above single requests whose failure would otherwise fail a stage
    late (a request is already retried by botocore): e.g. the commit marker's PUT.
    """
    for delay in (*delays_s, None):
        try:
            return fn()
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def redact(text: str, cfg: StorageConfig | None = None) -> str:
    """``text`` with every secret this process knows replaced by ``***``."""
    return redact_secrets(text)


def normalise(uri: str) -> str:
    """Absolute form of a local path; URIs with a scheme unchanged."""
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    """Join URI parts with '/'."""
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


S3FS_BODY_ATTEMPTS = 3
"""Attempts of s3fs's own loop. botocore retries requests but not the read of a response
body that breaks mid-stream; s3fs's loop re-issues such a GET (the one layer for response
bodies). Kept at 3 (s3fs's default is 5) so that, for a request botocore already gave up
on, it adds at most two more tries rather than multiplying botocore's attempts."""


def get_fs(uri: str, cfg: StorageConfig, asynchronous: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for a URI."""
    opts = storage_options(uri, cfg)
    if asynchronous:
        opts["asynchronous"] = True
    fs, path = url_to_fs(uri, **opts)
    if uri.startswith("s3://"):
        fs.retries = S3FS_BODY_ATTEMPTS
    return fs, path


def zarr_store(uri: str, cfg: StorageConfig, read_only: bool = False) -> zarr.abc.store.Store:
    """A Zarr v3 store for a URI: a LocalStore for paths, an FsspecStore otherwise."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return zarr.storage.LocalStore(path, read_only=read_only)
    if uri.startswith("s3://"):
        fs, path = get_fs(uri, cfg, asynchronous=True)
        return zarr.storage.FsspecStore(fs, path=path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options(uri, cfg),
                                             read_only=read_only)


def done_uri(uri: str) -> str:
    """The commit marker of a result."""
    return uri.rstrip("/") + DONE_SUFFIX


def is_done(uri: str, cfg: StorageConfig) -> dict[str, Any] | None:
    """The commit record of a result if it is complete, else None."""
    fs, path = get_fs(done_uri(uri), cfg)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def mark_done(uri: str, cfg: StorageConfig, record: BaseModel | dict[str, Any]) -> None:
    """Write the commit marker of a result; the last write that makes it visible."""
    data = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
    write_bytes_atomic(done_uri(uri), json.dumps(data, indent=1).encode(), cfg)


R = TypeVar("R", bound=BaseModel)


def commit_stage(uri: str, storage: StorageConfig, ref_type: type[R], compute: Callable[[], R],
                 *, clear: bool = True) -> R:
    """The one way a stage commits its output at ``uri``.

    Served from the commit record when the output is complete (a re-run, another worker,
    another machine). Otherwise any partial output of an interrupted attempt is removed
    (unless ``clear`` is False: a stage that resumes from its own partial state, like
    training from its last checkpoint), ``compute`` writes the output and returns its
    reference, and the commit record is written last: an interrupted stage (an error, a
    stop request, ``kill -9``) never leaves something that looks complete.
    """
    if (done := is_done(uri, storage)) is not None:
        return ref_type.model_validate(done)
    if clear:
        remove(uri, storage)
    ref = compute()
    mark_done(uri, storage, ref)
    return ref


def write_bytes_atomic(uri: str, data: bytes, cfg: StorageConfig) -> None:
    """Write bytes so readers see the old or the new content, never a part.

    Local files are written to a temporary name and renamed; object stores make a single
    PUT visible atomically already (retried on transient errors: a PUT is idempotent).
    """
    fs, path = get_fs(uri, cfg)
    if "://" in uri and not uri.startswith("file://"):
        with_retries(lambda: fs.pipe_file(path, data))
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


def remove(uri: str, cfg: StorageConfig) -> None:
    """Delete a result (file or folder tree) and its commit marker, if they exist."""
    fs, path = get_fs(done_uri(uri), cfg)
    if fs.exists(path):
        fs.rm(path)
    fs, path = get_fs(uri, cfg)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def content_key(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (pydantic models allowed)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(to_jsonable_python(p), sort_keys=True).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:20]


CODE_SUFFIXES = (".py", ".c", ".h")
"""Source files of a package that :func:`code_version` hashes."""


@functools.cache
def code_version(*modules: str) -> str:
    """Hash of the source of the given modules or packages (dotted names); part of cache keys.

    Each stage names the code its output depends on, so changing the model does not
    invalidate cached scenes, while changing the synthetic Earth does. A package counts its
    compiled kernels' C sources too (:data:`CODE_SUFFIXES`: ``tessera_model/kernels``).
    """
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for mod in sorted(modules):
        path = root.joinpath(*mod.split("."))
        files = (
            sorted(f for f in path.rglob("*") if f.suffix in CODE_SUFFIXES and f.is_file())
            if path.is_dir()
            else [path.with_suffix(".py")]
        )
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def raise_storage(uri: str, exc: Exception, cfg: StorageConfig | None = None) -> None:
    """Raise a StorageError for ``exc`` at ``uri``, with any configured secret redacted."""
    msg = f"storage error at {uri}: {type(exc).__name__}: {exc}"
    raise StorageError(redact(msg, cfg) if cfg is not None else msg) from exc
