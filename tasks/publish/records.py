"""Per-tile commit records, the zone's tile count, and provenance in the work root.

A record ``{year}.zarr/.tessera/tiles/{tile_id}.json`` is written right after a tile's
scales (its commit) and holds only what the published bytes depend on (content hash, grid
offsets, model version, rules). ``tessera:n_tiles`` is recounted from the records until a
recount after the write agrees (:func:`_converge_n_tiles`). When a tile was published goes
to the work root instead (:func:`provenance_uri`), so identical builds publish identical
bytes.
"""

from __future__ import annotations

import json
from typing import Any

import zarr

from tasks.config import StorageConfig
from tasks.errors import StorageError
from tasks.grid import Tile
from tasks.publish._fs import _ls, _open_root, _read_json
from tasks.publish.conventions import PROVENANCE_DIR, RECORDS_DIR
from tasks.publish.coords import ZoneExtent, year_store_uri
from tasks.storage import get_fs, join, write_bytes_atomic, zarr_store


def _record_uri(store_uri: str, tile: Tile) -> str:
    return join(store_uri, RECORDS_DIR, f"{tile.id}.json")


def provenance_uri(work_uri: str, year: int, tile: Tile) -> str:
    """Where :func:`publish_tile` notes when (and into which output root) it wrote a tile.

    ``{work_uri}/provenance/{year}/tiles/{tile_id}.json``: in the work root, beside the
    stages' commit markers, because a wall-clock time in the published bytes would make two
    identical builds differ.
    """
    return join(work_uri, PROVENANCE_DIR, str(year), "tiles", f"{tile.id}.json")


def read_tile_record(
    output_uri: str, year: int, tile: Tile, storage: StorageConfig
) -> dict[str, Any] | None:
    """The commit record of a published tile, or None when it is not published."""
    return _read_json(_record_uri(year_store_uri(output_uri, year), tile), storage)


def _count_tiles(store_uri: str, zone: int, south: bool, storage: StorageConfig) -> int:
    """Committed tiles of one zone group, counted from the records (tile ids start "31N-")."""
    fs, path = get_fs(join(store_uri, RECORDS_DIR), storage)
    prefix = f"{zone:02d}{'S' if south else 'N'}-"
    names = [p.rsplit("/", 1)[-1] for p in _ls(fs, path)]
    return sum(1 for n in names if n.startswith(prefix) and n.endswith(".json"))


def _rewrite_record_offsets(store_uri: str, ext: ZoneExtent, storage: StorageConfig) -> None:
    fs, path = get_fs(join(store_uri, RECORDS_DIR), storage)
    prefix = f"{ext.zone:02d}{'S' if ext.south else 'N'}-"
    for p in _ls(fs, path):
        fname = p.rsplit("/", 1)[-1]
        if not (fname.startswith(prefix) and fname.endswith(".json")):
            continue
        uri = join(store_uri, RECORDS_DIR, fname)
        rec = _read_json(uri, storage)
        if rec is None:
            continue
        r0, c0 = ext.offset(Tile.from_id(rec["tile_id"]))
        if (rec.get("row_offset"), rec.get("col_offset")) != (r0, c0):
            rec.update(row_offset=r0, col_offset=c0)
            write_bytes_atomic(uri, json.dumps(rec, sort_keys=True, indent=1).encode(), storage)


def _converge_n_tiles(
    store_uri: str, where: str, ext: ZoneExtent, storage: StorageConfig, max_rounds: int = 20
) -> int:
    """Write ``tessera:n_tiles`` = the record count until a recount after the write agrees.

    Concurrent publishers each end with a recount that includes every record written before
    their last attribute write, so the last write standing is the true count.
    """
    n = _count_tiles(store_uri, ext.zone, ext.south, storage)
    for _ in range(max_rounds):
        group = zarr.open_group(zarr_store(where, storage), mode="r+")
        if group.attrs.get("tessera:n_tiles") != n:
            group.attrs.update({"tessera:n_tiles": n})
        again = _count_tiles(store_uri, ext.zone, ext.south, storage)
        if again == n:
            return n
        n = again
    return n


def refresh_n_tiles(output_uri: str, year: int, group: str, storage: StorageConfig) -> int:
    """Recount ``tessera:n_tiles`` of a zone group from the tile records and store it.

    :func:`publish_tile` updates the count itself; call this once after publishing tiles of
    one zone concurrently, where two updates may race.

    Returns:
        The number of committed tiles of the group.
    """
    store_uri = year_store_uri(output_uri, year)
    root = _open_root(store_uri, storage)
    if root is None or group not in root:
        raise StorageError(f"Expected zone group {join(store_uri, group)}. Got none.")
    zg = root[group]
    ext = ZoneExtent.from_attrs(dict(zg.attrs))
    n = _count_tiles(store_uri, ext.zone, ext.south, storage)
    if zg.attrs.get("tessera:n_tiles") != n:
        zg.attrs.update({"tessera:n_tiles": n})
    return n
