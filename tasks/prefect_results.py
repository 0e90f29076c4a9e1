"""Where and how Prefect persists the factory's task results: JSON, guarded, secret-free.

Task results are the small references of :mod:`tasks.refs` (and a few lists and dicts). They
live under ``{work}/prefect-results`` so that another run, worker or machine with the same
work root is served from cache. Two rules make that safe on shared storage:

- **JSON, never pickle.** :class:`RefSerializer` writes a result as plain JSON; an object
  becomes ``{"__ref__": "<name>", "data": {...}}`` where ``<name>`` is looked up in an
  allow-list of result types (:data:`RESULT_TYPES`), never imported by a name read from the
  file. Prefect's own JSON serializer is not enough: its record names the decoder function
  to import, so whoever can write the work bucket could make the next run call any function.
- **Guarded reads.** Prefect deserialises a record with the serializer the *record* names.
  :class:`ResultStorage` refuses, before Prefect sees the bytes, any record whose serializer
  is not :class:`RefSerializer` (a pickle or a decoder swapped in by someone with write
  access): it raises :class:`ResultIntegrityError`.

:class:`ResultStorage` is a Prefect ``WritableFileSystem`` block. Its fields, which Prefect
saves on the server, are the work root and the storage config: they hold no credentials;
each process resolves its own when it reads or writes (:func:`tasks.storage.get_fs`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import BaseModel, Field

from tasks.config import StorageConfig
from tasks.storage import content_key, get_fs, join, normalise, write_bytes_atomic

__all__ = [
    "RESULT_TYPES",
    "RefSerializer",
    "ResultIntegrityError",
    "ResultStorage",
    "register_result_types",
    "result_storage_for",
]

SERIALIZER_TYPE = "tessera-json"
"""The ``type`` of :class:`RefSerializer` in result records."""

RESULT_TYPES: dict[str, type[BaseModel]] = {}
"""Result models a record may name, by class name (filled by :func:`register_result_types`)."""


def register_result_types(*types: type[BaseModel]) -> None:
    """Allow these pydantic models as task results (by class name; names must be unique)."""
    for t in types:
        other = RESULT_TYPES.setdefault(t.__name__, t)
        if other is not t:
            raise ValueError(f"Expected unique result type names. Got two {t.__name__!r}.")


def _register_factory_results() -> None:
    from tasks.catalog import CatalogRef
    from tasks.geotessera import GeoTesseraRef
    from tasks.preview import PreviewRef
    from tasks.refs import (
        CheckpointRef,
        DPixelRef,
        EmbeddingRef,
        MaskRef,
        PublishRef,
        SceneRef,
        TrainingSetRef,
    )

    register_result_types(SceneRef, MaskRef, DPixelRef, TrainingSetRef, CheckpointRef,
                          EmbeddingRef, PublishRef, CatalogRef, PreviewRef, GeoTesseraRef)


_register_factory_results()


class ResultIntegrityError(BaseException):
    """A persisted result record is not one the factory wrote (wrong serializer or shape).

    Deliberately a ``BaseException``: Prefect's cache lookup treats any ``Exception`` while
    reading a record as "no cached result" and would silently recompute; a tampered record
    must stop the run loudly instead.
    """


class TaskError(RuntimeError):
    """A failed task's exception as read back from a result record: its type name and
    message only (an exception is never rebuilt from a name read from a file)."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return {"__error__": type(obj).__name__, "message": str(obj)}
    if isinstance(obj, BaseModel):
        name = type(obj).__name__
        if RESULT_TYPES.get(name) is not type(obj):
            raise TypeError(f"Expected a registered result type. Got {name!r}.")
        return {"__ref__": name, "data": obj.model_dump(mode="json")}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("Expected a dict with string keys.")
        if "__ref__" in obj or "__error__" in obj:
            raise TypeError("Expected no '__ref__' or '__error__' key in a plain dict result.")
        return {k: _encode(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"Expected a JSON value or a registered result model. Got {type(obj).__name__}.")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, dict):
        if "__ref__" in obj:
            cls = RESULT_TYPES.get(obj["__ref__"]) if isinstance(obj["__ref__"], str) else None
            if cls is None or set(obj) != {"__ref__", "data"}:
                raise ResultIntegrityError(f"unknown result type {obj.get('__ref__')!r} in a record")
            return cls.model_validate(obj["data"])
        if "__error__" in obj and set(obj) == {"__error__", "message"}:
            return TaskError(f"{obj['__error__']}: {obj['message']}")
        return {k: _decode(v) for k, v in obj.items()}
    return obj


class RefSerializer(Serializer):
    """Plain JSON for the factory's result types (an allow-list; nothing is imported by name)."""

    type: Literal["tessera-json"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        """JSON bytes of a result."""
        return json.dumps(_encode(obj), sort_keys=True, separators=(",", ":")).encode()

    def loads(self, blob: bytes) -> Any:
        """The result a blob holds (registered models rebuilt and validated)."""
        return _decode(json.loads(blob))


def check_record(content: bytes, where: str) -> None:
    """Raise :class:`ResultIntegrityError` unless ``content`` is a record :class:`RefSerializer`
    wrote: a JSON object with ``metadata.serializer`` exactly ``{"type": "tessera-json"}``."""
    try:
        rec = json.loads(content)
        ser = rec["metadata"]["serializer"]
    except (ValueError, KeyError, TypeError):
        raise ResultIntegrityError(f"result record {where} is not a factory result record; "
                                   "refusing to load it") from None
    if ser != {"type": SERIALIZER_TYPE}:
        kind = ser.get("type") if isinstance(ser, dict) else type(ser).__name__
        raise ResultIntegrityError(
            f"result record {where} names serializer {kind!r}; only {SERIALIZER_TYPE!r} is "
            "accepted (the file was not written by the factory): refusing to load it. Delete "
            "it to recompute."
        )


class ResultStorage(WritableFileSystem):
    """Task results under a work root, read through the integrity check, credentials
    resolved in the process at each access (see module docstring)."""

    _block_type_name = "Tessera Result Storage"
    _block_type_slug = "tessera-result-storage"

    basepath: str = Field(description="Folder of the result records (a local path or URI).")
    storage: StorageConfig = Field(default_factory=StorageConfig,
                                   description="Storage settings (no credentials).")

    def _uri(self, path: str) -> str:
        if ".." in path.split("/"):
            raise ValueError(f"Expected a record key without '..'. Got {path!r}.")
        return join(self.basepath, path)

    def _read(self, path: str) -> bytes:
        uri = self._uri(path)
        fs, p = get_fs(uri, self.storage)
        with fs.open(p, "rb") as f:
            content = f.read()
        check_record(content, path)
        return content

    def _write(self, path: str, content: bytes) -> str:
        uri = self._uri(path)
        write_bytes_atomic(uri, content, self.storage)
        return uri

    async def aread_path(self, path: str) -> bytes:
        """Bytes of a record, checked (async callers)."""
        return self._read(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        """Bytes of a record, checked (Prefect calls it as ``read_path(key, _sync=True)``)."""
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Write a record atomically (async callers)."""
        return self._write(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        """Write a record atomically."""
        return self._write(path, content)


def result_storage_for(storage: StorageConfig) -> ResultStorage:
    """The result storage of a build: ``{work}/prefect-results``.

    Prefect accepts only a saved block as a task's result storage, so the block is saved on
    the server under a name derived from its content (``tessera-results-<hash>``); what is
    saved is the folder and the storage settings, never a credential.
    """
    block = ResultStorage(basepath=join(normalise(storage.work_uri), "prefect-results"),
                          storage=storage)
    name = "tessera-results-" + content_key(block.basepath, storage)[:16]
    block.save(name, overwrite=True)
    return block
