"""Growing a zone grid: a resize east/south, a journaled origin move west/north.

East or south, the arrays' shapes grow and no byte of data moves. West or north, Zarr
indexes from the origin, so every shard takes a new key: :func:`_move_origin` stages a copy
of every shard, retracts all scales (the zone reads as absent, never as misplaced data),
resizes and re-keys, then copies the scales back last. Its journal
(``.tessera/grow/{group}.json``) makes every step resumable by the next prepare
(:func:`_finish_move`). Call everything here under an exclusive :class:`ZoneLease`.
"""

from __future__ import annotations

import json
from typing import Any

import zarr

from tasks.config import StorageConfig
from tasks.errors import StorageError
from tasks.grid import PIXEL_M, SHARD_PX
from tasks.publish._fs import _read_json
from tasks.publish.conventions import DATA_ARRAYS, GROW_DIR
from tasks.publish.coords import ZoneExtent, _spatial_attrs, _write_coords
from tasks.publish.leases import ZoneLease
from tasks.publish.records import _rewrite_record_offsets
from tasks.storage import get_fs, join, write_bytes_atomic, zarr_store


def _journal_uri(store_uri: str, group: str) -> str:
    return join(store_uri, GROW_DIR, f"{group}.json")


def _shard_keys(fs: Any, array_path: str) -> list[tuple[str, tuple[int, ...]]]:
    """(path, chunk index) of every stored shard of an array (v3 default keys ``c/i/j[/k]``)."""
    base = array_path.rstrip("/") + "/c"
    try:
        fs.invalidate_cache(base)
        paths = fs.find(base)
    except FileNotFoundError:
        return []
    out = []
    for p in paths:
        rel = p[len(base) + 1 :] if p.startswith(base) else p.split("/c/", 1)[-1]
        try:
            out.append((p, tuple(int(x) for x in rel.split("/"))))
        except ValueError:
            continue
    return sorted(out, key=lambda kv: kv[1])


def _grow_zone(
    store_uri: str,
    group: zarr.Group,
    old: ZoneExtent,
    new: ZoneExtent,
    storage: StorageConfig,
    lease: ZoneLease,
) -> None:
    """Grow a zone grid to ``new`` (covering ``old``); call under an exclusive lease.

    East/south: resize only. West/north: :func:`_move_origin` first.
    """
    if new.x0 != old.x0 or new.y0 != old.y0:
        _move_origin(store_uri, old.group, old, new, storage, lease)
        return
    for name in DATA_ARRAYS:
        if name in group:
            arr = group[name]
            arr.resize((new.height, new.width, *arr.shape[2:]))
    _write_coords(group, new)
    group.attrs.update(_spatial_attrs(new))


def _move_origin(
    store_uri: str,
    name: str,
    old: ZoneExtent,
    new: ZoneExtent,
    storage: StorageConfig,
    lease: ZoneLease,
) -> None:
    """Move a zone grid's origin west/north by whole shards, resumably (exclusive lease held).

    Journal ``.tessera/grow/{group}.json`` records ``old``/``new`` and the phase:

    1. ``staging``: copy every shard of every data array to ``.tessera/grow/{group}/`` (the
       array is untouched, so a crash here is redone from scratch);
    2. ``moving``: delete the scales shards (the zone now reads as absent), then the other
       shards; resize the arrays and rewrite coordinates, ``spatial_ref``, group attributes
       and tile records (a consistent new grid with every tile absent); copy staged shards
       to their new keys, ``scales`` LAST; delete the staging copies and the journal. Every step is idempotent, so a crash is resumed by
       rerunning phase 2 from the journal.
    """
    fs, store_path = get_fs(store_uri, storage)
    journal = _journal_uri(store_uri, name)
    stage_uri = join(store_uri, GROW_DIR, name)
    _, stage_path = get_fs(stage_uri, storage)
    rec = {"group": name, "old": old.model_dump(), "new": new.model_dump(), "phase": "staging"}
    write_bytes_atomic(journal, json.dumps(rec).encode(), storage)
    if fs.exists(stage_path):
        fs.rm(stage_path, recursive=True)
    for arr_name in DATA_ARRAYS:
        for path, idx in _shard_keys(fs, f"{store_path}/{name}/{arr_name}"):
            dst = f"{stage_path}/{arr_name}/c/" + "/".join(map(str, idx))
            _copy(fs, path, dst)
            lease.renew()
    rec["phase"] = "moving"
    write_bytes_atomic(journal, json.dumps(rec).encode(), storage)
    _finish_move(store_uri, name, storage, lease)


def _copy(fs: Any, src: str, dst: str) -> None:
    """Copy one object (server-side on S3); parents made where the filesystem needs them."""
    fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
    fs.copy(src, dst)


def _finish_move(store_uri: str, name: str, storage: StorageConfig, lease: ZoneLease) -> None:
    """Phase 2 of :func:`_move_origin`, from its journal (idempotent)."""
    rec = _read_json(_journal_uri(store_uri, name), storage)
    if rec is None:
        return
    old, new = ZoneExtent(**rec["old"]), ZoneExtent(**rec["new"])
    fs, store_path = get_fs(store_uri, storage)
    _, stage_path = get_fs(join(store_uri, GROW_DIR, name), storage)
    if rec["phase"] == "staging":  # crashed while staging: the arrays are intact, redo
        _move_origin(store_uri, name, old, new, storage, lease)
        return
    d_row = round((new.y0 - old.y0) / (SHARD_PX * PIXEL_M))
    d_col = round((old.x0 - new.x0) / (SHARD_PX * PIXEL_M))
    # scales first: from here the zone reads as absent until its scales come back
    for arr_name in ("scales", "embeddings", "rgb"):
        for path, _ in _shard_keys(fs, f"{store_path}/{name}/{arr_name}"):
            fs.rm(path)
    # the new grid, complete and consistent (every tile absent) before any shard returns
    group = zarr.open_group(zarr_store(join(store_uri, name), storage), mode="r+")
    for arr_name in DATA_ARRAYS:
        if arr_name in group:
            arr = group[arr_name]
            arr.resize((new.height, new.width, *arr.shape[2:]))
    _write_coords(group, new)
    group.attrs.update(_spatial_attrs(new))
    _rewrite_record_offsets(store_uri, new, storage)
    for arr_name in DATA_ARRAYS:  # scales last: the commit
        for path, idx in _shard_keys(fs, f"{stage_path}/{arr_name}"):
            moved = (idx[0] + d_row, idx[1] + d_col, *idx[2:])
            _copy(fs, path, f"{store_path}/{name}/{arr_name}/c/" + "/".join(map(str, moved)))
            lease.renew()
    if fs.exists(stage_path):
        fs.rm(stage_path, recursive=True)
    _, jpath = get_fs(_journal_uri(store_uri, name), storage)
    fs.rm(jpath)


def _check_no_move(store_uri: str, name: str, storage: StorageConfig) -> None:
    if _read_json(_journal_uri(store_uri, name), storage) is not None:
        raise StorageError(
            f"{join(store_uri, name)}: Expected a zone grid at rest. Got an unfinished origin "
            "move (a crashed prepare_zone_stores); run prepare_zone_stores again to finish it."
        )
