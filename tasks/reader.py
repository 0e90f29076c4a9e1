"""Read published ``tessera:`` v1 year stores: regions, single pixels, similarity maps.

Everything here reads through the Zarr arrays directly (shard-aware: a window read fetches
only the inner 64 x 64 chunks it touches, by byte range on S3) and dequantises as
``q * scale`` with :func:`tessera_model.quantise.dequantise`; a NaN scale (no data, or a tile
not yet committed) reads as NaN. Regions are lon/lat boxes ``(west, south, east, north)``.

- :func:`open_region`: float32 DataArray ``(y, x, band)`` with a CRS: one UTM
  zone natively (its own 10 m grid, no resampling), or several zones reprojected (nearest
  neighbour, never blending embeddings) onto one grid in a chosen CRS.
- :func:`pixel_vector`: one pixel's B-d vector by lon/lat (B = the store's K: 16..128).
- :func:`similarity_map`: cosine similarity to a query vector (or the mean of example
  pixels), computed shard window by shard window so memory stays bounded by one window.

A box that misses every published zone gives an empty (0 x 0) result, not a Zarr error.

CRS: results carry it the CF way, a ``spatial_ref`` coordinate with ``crs_wkt`` and the CF
grid-mapping parameters, named by ``grid_mapping`` in the encoding. That is what rioxarray's
``write_crs`` writes and what its ``.rio`` accessor reads, so ``da.rio.crs`` and
``da.rio.transform()`` work wherever rioxarray is installed, while this module does not
import it (it is an optional, reader-side dependency).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
import zarr
from pyproj import CRS, Transformer

from tasks.config import StorageConfig
from tasks.errors import DataError
from tasks.grid import PIXEL_M, SHARD_PX, zone_of_lon
from tasks.publish import ZoneExtent, grid_mapping_attrs, year_store_uri
from tasks.storage import zarr_store
from tessera_model.quantise import dequantise

__all__ = ["Window", "open_region", "pixel_vector", "similarity_map", "zone_groups"]

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Window:
    """A row/column window of one zone group (end-exclusive), with the group's grid."""

    group: str
    ext: ZoneExtent
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def empty(self) -> bool:
        return self.r1 <= self.r0 or self.c1 <= self.c0

    def eastings(self) -> np.ndarray:
        return self.ext.x0 + PIXEL_M * (np.arange(self.c0, self.c1) + 0.5)

    def northings(self) -> np.ndarray:
        return self.ext.y0 - PIXEL_M * (np.arange(self.r0, self.r1) + 0.5)

    def shard_windows(self) -> Iterator[Window]:
        """Sub-windows aligned to the 256-px shard grid, row-major."""
        for r in range(self.r0 - self.r0 % SHARD_PX, self.r1, SHARD_PX):
            for c in range(self.c0 - self.c0 % SHARD_PX, self.c1, SHARD_PX):
                yield Window(
                    self.group,
                    self.ext,
                    max(r, self.r0),
                    min(r + SHARD_PX, self.r1),
                    max(c, self.c0),
                    min(c + SHARD_PX, self.c1),
                )


def _root(output_uri: str, year: int, storage: StorageConfig) -> zarr.Group | None:
    try:
        return zarr.open_group(
            zarr_store(year_store_uri(output_uri, year), storage, read_only=True), mode="r"
        )
    except FileNotFoundError:
        return None


def _groups_of(root: zarr.Group) -> dict[str, tuple[ZoneExtent, zarr.Group]]:
    """Zone groups of an open year store with their grids (one listing, no re-opening)."""
    with warnings.catch_warnings():  # ".tessera/" (records, leases) is not a Zarr node
        warnings.simplefilter("ignore")
        members = list(root.groups())
    out = {
        name: (ZoneExtent.from_attrs(dict(g.attrs)), g)
        for name, g in members
        if name.startswith("utm") and "spatial:transform" in g.attrs
    }
    return dict(sorted(out.items()))


def zone_groups(
    output_uri: str, year: int, storage: StorageConfig | None = None
) -> dict[str, ZoneExtent]:
    """The zone groups of a year store and their grids; {} when the store does not exist."""
    root = _root(output_uri, year, storage or StorageConfig())
    if root is None:
        return {}
    return {name: ext for name, (ext, _) in _groups_of(root).items()}


def _window(name: str, ext: ZoneExtent, bbox: BBox) -> Window:
    """The window of a zone grid covering a lon/lat box (possibly empty)."""
    west, south, east, north = bbox
    to_utm = Transformer.from_crs(4326, ext.epsg, always_xy=True)
    x_min, y_min, x_max, y_max = to_utm.transform_bounds(west, south, east, north, densify_pts=21)
    c0 = int(np.floor((x_min - ext.x0) / PIXEL_M))
    c1 = int(np.ceil((x_max - ext.x0) / PIXEL_M))
    r0 = int(np.floor((ext.y0 - y_max) / PIXEL_M))
    r1 = int(np.ceil((ext.y0 - y_min) / PIXEL_M))
    return Window(
        name,
        ext,
        max(r0, 0),
        min(max(r1, 0), ext.height),
        max(c0, 0),
        min(max(c1, 0), ext.width),
    )


def _read(group: zarr.Group, w: Window) -> np.ndarray:
    """Dequantised float32 (h, w, B) of a window; NaN where the scale is NaN."""
    q = group["embeddings"][w.r0 : w.r1, w.c0 : w.c1, :]
    s = group["scales"][w.r0 : w.r1, w.c0 : w.c1]
    return dequantise(q, s)


def _with_crs(da: xr.DataArray, crs: CRS) -> xr.DataArray:
    """``da`` with its CRS as a CF ``spatial_ref`` coordinate (what rioxarray reads)."""
    out = da.assign_coords(spatial_ref=xr.Variable((), 0, attrs=grid_mapping_attrs(crs)))
    out.encoding["grid_mapping"] = "spatial_ref"
    return out


def _check_bbox(bbox: BBox) -> None:
    west, south, east, north = bbox
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise DataError(
            "Expected bbox (west, south, east, north) in degrees with west < east and "
            f"south < north. Got {bbox}."
        )


def _store_bands(root: zarr.Group | None) -> int:
    """B of a year store (its zone groups' ``tessera:n_bands``; 128 when it has none)."""
    if root is not None:
        for _, (_, g) in sorted(_groups_of(root).items()):
            return int(g.attrs.get("tessera:n_bands", g["embeddings"].shape[-1]))
    return 128


def _empty(n_bands: int, crs: CRS | None) -> xr.DataArray:
    da = xr.DataArray(
        np.zeros((0, 0, n_bands), np.float32),
        dims=("y", "x", "band"),
        coords={"y": np.zeros(0), "x": np.zeros(0), "band": np.arange(n_bands, dtype=np.int32)},
        name="embedding",
    )
    return _with_crs(da, crs) if crs is not None else da


def _windows(
    output_uri: str, year: int, bbox: BBox, storage: StorageConfig
) -> tuple[zarr.Group | None, list[Window]]:
    _check_bbox(bbox)
    root = _root(output_uri, year, storage)
    if root is None:
        return None, []
    wins = [_window(n, e, bbox) for n, (e, _) in _groups_of(root).items()]
    return root, [w for w in wins if not w.empty]


def open_region(
    output_uri: str,
    year: int,
    bbox: BBox,
    storage: StorageConfig | None = None,
    crs: str | int | None = None,
    resolution_m: float | None = None,
) -> xr.DataArray:
    """A region of a year as dequantised float32 embeddings with a CRS.

    Args:
        output_uri: Root holding ``{year}.zarr`` (local path or ``s3://``).
        year: The year.
        bbox: (west, south, east, north) in degrees.
        storage: Storage config (S3 endpoint, credentials); default local.
        crs: Output CRS. None: the native grid of the single zone the box touches (or, for
            several zones, the zone with the most pixels in the box). A zone whose own CRS
            equals ``crs`` is returned natively, without resampling.
        resolution_m: Output pixel size in units of ``crs`` when reprojecting (default 10 m,
            or about 10 m in degrees for a geographic CRS).

    Returns:
        DataArray ``(y, x, band)`` float32, NaN = no data; ``da.rio.crs`` and
        ``da.rio.transform()`` set. (0, 0, B) when the box misses every zone.
    """
    storage = storage or StorageConfig()
    root, wins = _windows(output_uri, year, bbox, storage)
    target = CRS.from_user_input(crs) if crs is not None else None
    if root is None or not wins:
        return _empty(_store_bands(root), target or CRS.from_epsg(4326))
    if target is None:
        big = max(wins, key=lambda w: (w.r1 - w.r0) * (w.c1 - w.c0))
        target = CRS.from_epsg(big.ext.epsg)
    native = [w for w in wins if CRS.from_epsg(w.ext.epsg) == target]
    if len(wins) == 1 and native:
        w = wins[0]
        return _as_da(_read(root[w.group], w), w.northings(), w.eastings(), target)
    return _reproject(root, wins, bbox, target, resolution_m)


def _as_da(values: np.ndarray, ys: np.ndarray, xs: np.ndarray, crs: CRS) -> xr.DataArray:
    da = xr.DataArray(
        values,
        dims=("y", "x", "band"),
        coords={"y": ys, "x": xs, "band": np.arange(values.shape[-1], dtype=np.int32)},
        name="embedding",
    )
    return _with_crs(da, crs)


def _reproject(
    root: zarr.Group,
    wins: Sequence[Window],
    bbox: BBox,
    target: CRS,
    resolution_m: float | None,
) -> xr.DataArray:
    """Nearest-neighbour reprojection of several zone windows onto one grid of ``target``."""
    from rasterio.transform import from_origin
    from rasterio.warp import Resampling, reproject

    res = resolution_m or (PIXEL_M if target.is_projected else 1e-4)
    to_t = Transformer.from_crs(4326, target, always_xy=True)
    x_min, y_min, x_max, y_max = to_t.transform_bounds(*bbox, densify_pts=21)
    width = max(int(np.ceil((x_max - x_min) / res)), 1)
    height = max(int(np.ceil((y_max - y_min) / res)), 1)
    dst_transform = from_origin(x_min, y_max, res, res)
    n_bands = int(root[wins[0].group]["embeddings"].shape[-1])
    out = np.full((n_bands, height, width), np.nan, np.float32)
    for w in wins:
        src = np.moveaxis(_read(root[w.group], w), -1, 0)
        src_transform = from_origin(
            w.ext.x0 + w.c0 * PIXEL_M, w.ext.y0 - w.r0 * PIXEL_M, PIXEL_M, PIXEL_M
        )
        part = np.full_like(out, np.nan)
        reproject(
            src,
            part,
            src_transform=src_transform,
            src_crs=CRS.from_epsg(w.ext.epsg).to_wkt(),
            src_nodata=np.nan,
            dst_transform=dst_transform,
            dst_crs=target.to_wkt(),
            dst_nodata=np.nan,
            resampling=Resampling.nearest,
        )
        fill = np.isnan(out[0]) & ~np.isnan(part[0])
        out[:, fill] = part[:, fill]
    xs = x_min + res * (np.arange(width) + 0.5)
    ys = y_max - res * (np.arange(height) + 0.5)
    return _as_da(np.moveaxis(out, 0, -1), ys, xs, target)


def pixel_vector(
    output_uri: str, year: int, lon: float, lat: float, storage: StorageConfig | None = None
) -> np.ndarray:
    """The dequantised float32 (B,) vector of the pixel containing (lon, lat).

    Tries the longitude's own UTM zone first, then any other zone group covering the point.
    All-NaN when the pixel is not published (no data, outside every zone grid).
    """
    storage = storage or StorageConfig()
    root = _root(output_uri, year, storage)
    groups = _groups_of(root) if root is not None else {}
    own = f"utm{int(zone_of_lon(lon)):02d}{'s' if lat < 0 else ''}"
    vec = np.full(_store_bands(root), np.nan, np.float32)
    for name in sorted(groups, key=lambda n: n != own):
        ext, g = groups[name]
        x, y = Transformer.from_crs(4326, ext.epsg, always_xy=True).transform(lon, lat)
        r, c = int(np.floor((ext.y0 - y) / PIXEL_M)), int(np.floor((x - ext.x0) / PIXEL_M))
        if not (0 <= r < ext.height and 0 <= c < ext.width):
            continue
        s = np.float32(g["scales"][r, c])
        if not np.isfinite(s):
            vec = np.full(int(g["embeddings"].shape[-1]), np.nan, np.float32)
            continue
        return dequantise(np.asarray(g["embeddings"][r, c, :]), np.asarray(s))
    return vec


def similarity_map(
    output_uri: str,
    year: int,
    bbox: BBox,
    storage: StorageConfig | None = None,
    query: np.ndarray | None = None,
    examples: Sequence[tuple[float, float]] | None = None,
    crs: str | int | None = None,
) -> xr.DataArray:
    """Cosine similarity of every pixel in a region to a query vector, shard window by window.

    Args:
        output_uri, year, bbox, storage: As :func:`open_region`.
        query: (B,) query vector; or
        examples: (lon, lat) points whose mean vector is the query (unpublished ones skipped).
        crs: As :func:`open_region`; with several zones the per-zone maps are reprojected.

    Returns:
        float32 DataArray ``(y, x)`` in [-1, 1], NaN = no data; (0, 0) outside the store.

    Raises:
        DataError: neither or both of ``query``/``examples``, or no example is published.
    """
    storage = storage or StorageConfig()
    if (query is None) == (examples is None):
        raise DataError("Expected exactly one of query or examples. Got both or neither.")
    if query is None:
        vecs = np.stack([pixel_vector(output_uri, year, x, y, storage) for x, y in examples or []])
        vecs = vecs[np.isfinite(vecs).all(-1)]
        if not len(vecs):
            raise DataError(f"Expected at least one published example pixel. Got {examples}.")
        query = vecs.mean(0)
    q = np.asarray(query, np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    root, wins = _windows(output_uri, year, bbox, storage)
    target = CRS.from_user_input(crs) if crs is not None else None
    if root is None or not wins:
        return _empty(1, target or CRS.from_epsg(4326)).isel(band=0, drop=True)
    maps = []
    for w in wins:
        out = np.full((w.r1 - w.r0, w.c1 - w.c0), np.nan, np.float32)
        g = root[w.group]
        for sw in w.shard_windows():  # bounded memory: one shard window at a time
            e = _read(g, sw)
            norm = np.linalg.norm(e, axis=-1)
            sim = (e @ q) / np.where(norm > 0, norm, np.nan)
            out[sw.r0 - w.r0 : sw.r1 - w.r0, sw.c0 - w.c0 : sw.c1 - w.c0] = sim
        maps.append((w, out))
    if target is None:
        big = max(wins, key=lambda w: (w.r1 - w.r0) * (w.c1 - w.c0))
        target = CRS.from_epsg(big.ext.epsg)
    if len(maps) == 1 and CRS.from_epsg(maps[0][0].ext.epsg) == target:
        w, m = maps[0]
        da = xr.DataArray(
            m, dims=("y", "x"), coords={"y": w.northings(), "x": w.eastings()}, name="similarity"
        )
        return _with_crs(da, target)
    return _reproject_maps(maps, bbox, target)


def _reproject_maps(
    maps: Sequence[tuple[Window, np.ndarray]], bbox: BBox, target: CRS
) -> xr.DataArray:
    from rasterio.transform import from_origin
    from rasterio.warp import Resampling, reproject

    res = PIXEL_M if target.is_projected else 1e-4
    x_min, y_min, x_max, y_max = Transformer.from_crs(
        4326, target, always_xy=True
    ).transform_bounds(*bbox, densify_pts=21)
    width, height = (
        max(int(np.ceil((x_max - x_min) / res)), 1),
        max(int(np.ceil((y_max - y_min) / res)), 1),
    )
    dst_transform = from_origin(x_min, y_max, res, res)
    out = np.full((height, width), np.nan, np.float32)
    for w, m in maps:
        part = np.full_like(out, np.nan)
        reproject(
            m,
            part,
            src_transform=from_origin(
                w.ext.x0 + w.c0 * PIXEL_M, w.ext.y0 - w.r0 * PIXEL_M, PIXEL_M, PIXEL_M
            ),
            src_crs=CRS.from_epsg(w.ext.epsg).to_wkt(),
            src_nodata=np.nan,
            dst_transform=dst_transform,
            dst_crs=target.to_wkt(),
            dst_nodata=np.nan,
            resampling=Resampling.nearest,
        )
        fill = np.isnan(out) & ~np.isnan(part)
        out[fill] = part[fill]
    xs = x_min + res * (np.arange(width) + 0.5)
    ys = y_max - res * (np.arange(height) + 0.5)
    da = xr.DataArray(out, dims=("y", "x"), coords={"y": ys, "x": xs}, name="similarity")
    return _with_crs(da, target)
