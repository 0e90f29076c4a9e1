"""Creating, validating and growing the year store and its zone groups.

:func:`prepare_zone_stores` runs once per build before any tile is published: it creates
the year store and one zone group per zone (arrays, coordinates, attributes), checks an
existing group's model version and band count, and grows a grid to cover new tiles
(:mod:`tasks.publish.grow`), each zone under an exclusive lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import DataError
from tasks.grid import PIXEL_M, SHARD_PX, Tile
from tasks.publish._fs import _open_root
from tasks.publish.conventions import (
    DATASET_VERSION,
    INNER_CHUNK_PX,
    _root_attrs,
    _zone_attrs,
    check_publish_model,
)
from tasks.publish.coords import (
    ZoneExtent,
    _grid_mapping_attrs,
    _group_name,
    _put_coord,
    year_store_uri,
)
from tasks.publish.grow import _finish_move, _grow_zone
from tasks.publish.leases import _lease
from tasks.storage import join, zarr_store


def _check_root(root: zarr.Group, store_uri: str, year: int) -> None:
    version = root.attrs.get("tessera:dataset_version")
    if version != DATASET_VERSION:
        raise DataError(
            f"{store_uri}: Expected tessera:dataset_version {DATASET_VERSION!r}. Got {version!r}."
        )
    got_year = root.attrs.get("tessera:year")
    if got_year != year:
        raise DataError(f"{store_uri}: Expected tessera:year {year}. Got {got_year!r}.")


def _check_zone(group: zarr.Group, where: str, model_version: str, n_bands: int) -> ZoneExtent:
    got = group.attrs.get("tessera:model_version")
    if got != model_version:
        raise DataError(
            f"{where}: Expected tessera:model_version {model_version!r} (this build). "
            f"Got {got!r} in the existing zone group. Versions are never mixed in one store: "
            "publish to another storage.output_uri, or remove the old store first."
        )
    got_bands = group.attrs.get("tessera:n_bands")
    if got_bands != n_bands:
        raise DataError(
            f"{where}: Expected tessera:n_bands {n_bands} (publish.dims of this build). Got "
            f"{got_bands!r} in the existing zone group. A store holds one K: publish to "
            "another storage.output_uri."
        )
    return ZoneExtent.from_attrs(dict(group.attrs))


def _create_zone(
    root: zarr.Group,
    ext: ZoneExtent,
    year: int,
    n_bands: int,
    model_version: str,
    cfg: PublishConfig,
) -> zarr.Group:
    group = root.create_group(
        ext.group, attributes=_zone_attrs(ext, year, n_bands, model_version, cfg.build_version)
    )
    h, w = ext.height, ext.width
    gm = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}

    def blosc() -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=cfg.compression_level, shuffle="shuffle")

    group.create_array(
        "embeddings",
        shape=(h, w, n_bands),
        dtype="int8",
        chunks=(INNER_CHUNK_PX, INNER_CHUNK_PX, n_bands),
        shards=(SHARD_PX, SHARD_PX, n_bands),
        compressors=blosc(),
        fill_value=0,
        dimension_names=["northing", "easting", "band"],
        attributes={**gm, "long_name": "int8 quantised embedding (dequantise as q * scale)"},
    )
    group.create_array(
        "scales",
        shape=(h, w),
        dtype="float32",
        chunks=(INNER_CHUNK_PX, INNER_CHUNK_PX),
        shards=(SHARD_PX, SHARD_PX),
        compressors=blosc(),
        fill_value=float("nan"),
        dimension_names=["northing", "easting"],
        attributes={**gm, "long_name": "per-pixel dequantisation scale (NaN = no data)"},
    )
    coords: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        (
            "easting",
            ext.x0 + PIXEL_M * (np.arange(w, dtype=np.float64) + 0.5),
            {"standard_name": "projection_x_coordinate", "axis": "X", "units": "m"},
        ),
        (
            "northing",
            ext.y0 - PIXEL_M * (np.arange(h, dtype=np.float64) + 0.5),
            {"standard_name": "projection_y_coordinate", "axis": "Y", "units": "m"},
        ),
        ("band", np.arange(n_bands, dtype=np.int32), {"long_name": "embedding dimension"}),
    ]
    for name, values, attrs in coords:
        _put_coord(group, name, values, attrs)
    group.create_array(
        "spatial_ref",
        shape=(),
        dtype="int32",
        compressors=None,
        fill_value=0,
        dimension_names=[],
        attributes=_grid_mapping_attrs(ext),
    )
    return group


def prepare_zone_stores(
    tiles: Sequence[Tile],
    year: int,
    cfg: PublishConfig,
    storage: StorageConfig,
    model_version: str,
    n_bands: int | None = None,
) -> list[str]:
    """Create, validate or grow the year store and one zone group per zone of the tiles.

    A new group's grid is the union of its tiles' extents snapped to whole 256-px shards; an
    existing group is grown to cover new tiles (east/south: resize; west/north: a journaled
    origin move, see the module docstring). Each zone is changed under an exclusive
    :class:`ZoneLease`; an unfinished origin move left by a crash is completed first.

    Args:
        tiles: Tiles that will be published (any zones, any order).
        year: The year; the store is ``{storage.output_uri}/{year}.zarr``.
        cfg: Publish config (compression level, build version, lease timing).
        storage: Storage roots.
        model_version: Recorded as ``tessera:model_version`` (with the family, preset, size,
            checkpoint hash prefix and int8 rule derived from it); an existing group must match.
        n_bands: Embedding dimensions B (default ``cfg.dims``, the Matryoshka prefix K); an
            existing group must match.

    Returns:
        The zone group names (e.g. ``["utm30", "utm31"]``), sorted; each lives at
        ``{storage.output_uri}/{year}.zarr/{name}``.

    Raises:
        DataError: an existing store of another ``tessera:dataset_version`` or year, or an
            existing zone group of another ``tessera:model_version`` or band count.
        StorageError: a lease could not be taken in time.
    """
    if n_bands is None:  # from the config: checked against the model (an explicit B is not)
        n_bands = cfg.dims
        check_publish_model(model_version, n_bands)
    store_uri = year_store_uri(storage.output_uri, year)
    if not tiles:
        return []
    root = _open_root(store_uri, storage)
    if root is None:
        with _lease(store_uri, "_root", cfg, storage, exclusive=True):
            root = _open_root(store_uri, storage)
            if root is None:
                root = zarr.create_group(
                    zarr_store(store_uri, storage), attributes=_root_attrs(year), zarr_format=3
                )
    _check_root(root, store_uri, year)
    by_zone: dict[tuple[int, bool], list[Tile]] = {}
    for t in tiles:
        by_zone.setdefault((t.zone, t.south), []).append(t)
    names: list[str] = []
    for (zone, south), zone_tiles in sorted(by_zone.items()):
        name = _group_name(zone, south)
        where = join(store_uri, name)
        with _lease(store_uri, name, cfg, storage, exclusive=True) as lease:
            _finish_move(store_uri, name, storage, lease)
            root = zarr.open_group(zarr_store(store_uri, storage), mode="r+")
            if name in root:
                group = root[name]
                if not isinstance(group, zarr.Group):
                    raise DataError(f"{where}: Expected a zone group. Got an array.")
                ext = _check_zone(group, where, model_version, n_bands)
                new = ext.union(zone_tiles)
                if new != ext:
                    _grow_zone(store_uri, group, ext, new, storage, lease)
            else:
                _create_zone(
                    root, ZoneExtent.from_tiles(zone_tiles), year, n_bands, model_version, cfg
                )
        names.append(name)
    return sorted(names)
