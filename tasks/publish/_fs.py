"""Small storage helpers shared by the publish modules (any fsspec store, local or S3)."""

from __future__ import annotations

import json
from typing import Any

import zarr

from tasks.config import StorageConfig
from tasks.storage import get_fs, zarr_store


def _open_root(store_uri: str, storage: StorageConfig, mode: str = "r+") -> zarr.Group | None:
    try:
        return zarr.open_group(zarr_store(store_uri, storage), mode=mode)  # type: ignore[arg-type]
    except FileNotFoundError:
        return None


def _ls(fs: Any, path: str) -> list[str]:
    """Names under a folder, bypassing fsspec's listing cache; [] when it does not exist."""
    try:
        fs.invalidate_cache(path)
        return list(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def _read_json(uri: str, storage: StorageConfig) -> dict[str, Any] | None:
    fs, path = get_fs(uri, storage)
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
