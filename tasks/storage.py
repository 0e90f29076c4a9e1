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
import uuid
from pathlib import Path
from typing import Any

import fsspec
import zarr
from fsspec.core import url_to_fs
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from tasks.config import StorageConfig
from tasks.errors import StorageError

DONE_SUFFIX = ".done.json"
"""Commit marker written beside a result (``{uri}.done.json``), outside any Zarr hierarchy."""


def storage_options(uri: str, cfg: StorageConfig) -> dict[str, Any]:
    """fsspec options for a URI (S3 endpoint and region; credentials from the environment)."""
    if uri.startswith("s3://"):
        opts: dict[str, Any] = {}
        client: dict[str, Any] = {}
        if cfg.s3_endpoint_url:
            opts["endpoint_url"] = cfg.s3_endpoint_url
        if cfg.s3_region:
            client["region_name"] = cfg.s3_region
        if client:
            opts["client_kwargs"] = client
        return opts
    return {}


def normalise(uri: str) -> str:
    """Absolute form of a local path; URIs with a scheme unchanged."""
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    """Join URI parts with '/'."""
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def get_fs(uri: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for a URI."""
    return url_to_fs(uri, **storage_options(uri, cfg))


def zarr_store(uri: str, cfg: StorageConfig, read_only: bool = False) -> zarr.abc.store.Store:
    """A Zarr v3 store for a URI: a LocalStore for paths, an FsspecStore otherwise."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return zarr.storage.LocalStore(path, read_only=read_only)
    opts = storage_options(uri, cfg)
    if uri.startswith("s3://"):
        opts = {**opts, "asynchronous": True}
    return zarr.storage.FsspecStore.from_url(uri, storage_options=opts, read_only=read_only)


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


def write_bytes_atomic(uri: str, data: bytes, cfg: StorageConfig) -> None:
    """Write bytes so readers see the old or the new content, never a part.

    Local files are written to a temporary name and renamed; object stores make a single
    PUT visible atomically already.
    """
    fs, path = get_fs(uri, cfg)
    if "://" in uri and not uri.startswith("file://"):
        fs.pipe_file(path, data)
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


def check_writable(uri: str, cfg: StorageConfig, field: str) -> None:
    """Probe that a root URI can be written, raising a StorageError naming the config field."""
    from tasks.errors import ConfigError

    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        fs, path = get_fs(probe, cfg)
        if "://" not in uri:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        fs.pipe_file(path, b"ok")
        fs.rm(path)
    except Exception as exc:
        raise ConfigError(field, f"cannot write to {uri!r} ({type(exc).__name__}: {exc})") from None


def content_key(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (pydantic models allowed)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(to_jsonable_python(p), sort_keys=True).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:20]


@functools.cache
def code_version(*modules: str) -> str:
    """Hash of the source of the given modules or packages (dotted names); part of cache keys.

    Each stage names the code its output depends on, so changing the model does not
    invalidate cached scenes, while changing the synthetic Earth does.
    """
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for mod in sorted(modules):
        path = root.joinpath(*mod.split("."))
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def raise_storage(uri: str, exc: Exception) -> None:
    raise StorageError(f"storage error at {uri}: {type(exc).__name__}: {exc}") from exc
