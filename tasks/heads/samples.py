"""Samples out: labelled pixels on a published store's grid, with their features.

:func:`sample_store` places labels on the 10 m grid of every zone group of a year store:
polygons are rasterised (pixel centres inside), points take the pixel that holds them. A
polygon keeps at most about ``max_per_polygon`` of its pixels, chosen by a hash of the
pixel's grid position and the seed (so the choice does not depend on windows or order).
Embeddings are read through :func:`tasks.reader.open_region`, one 256-px shard window at a
time, so memory is bounded by one window plus the samples kept. Pixels with no data (NaN)
are dropped. Every sample keeps its label, polygon id and location (EPSG, easting,
northing, lon, lat).

For the same pixels, :func:`dpixel_features` computes a raw-feature baseline from the build's
d-pixels (per-band seasonal statistics) and :func:`encoder_embeddings` runs any encoder
(e.g. a random-init one) on their d-pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import shapely
import zarr
from pyproj import CRS, Transformer

from tasks.acquire import ORBITS
from tasks.config import StorageConfig
from tasks.errors import DataError
from tasks.grid import PIXEL_M, SHARD_PX, Tile
from tasks.heads.labels import LabelSet
from tasks.reader import open_region, zone_groups
from tasks.refs import DPixelRef
from tasks.sources._noise import hash_keys, tag, uniform
from tasks.stop import check_stop
from tasks.storage import zarr_store

__all__ = ["QUARTERS", "Samples", "dpixel_features", "encoder_embeddings", "sample_store",
           "sample_tiles"]

QUARTERS = ((1, 91), (92, 182), (183, 274), (275, 366))
"""Day-of-year ranges of the four seasons (quarters) of the raw-feature baseline."""


@dataclass(frozen=True)
class Samples:
    """Labelled pixels (one row each).

    Attributes:
        features: (N, D) float32 (embeddings, or other features of the same pixels).
        label: (N,) int64 class codes or float64 values.
        polygon_id: (N,) int64 id of the label feature the pixel came from.
        epsg: (N,) int32 CRS of the pixel's zone grid.
        x, y: (N,) float64 easting/northing of the pixel centre in ``epsg``.
        lon, lat: (N,) float64 pixel centre.
        task, classes: as the :class:`~tasks.heads.labels.LabelSet`.
    """

    features: np.ndarray
    label: np.ndarray
    polygon_id: np.ndarray
    epsg: np.ndarray
    x: np.ndarray
    y: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    task: str
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, idx: np.ndarray) -> Samples:
        """The samples at ``idx`` (indices or a boolean mask)."""
        return replace(self, features=self.features[idx], label=self.label[idx],
                       polygon_id=self.polygon_id[idx], epsg=self.epsg[idx], x=self.x[idx],
                       y=self.y[idx], lon=self.lon[idx], lat=self.lat[idx])

    def with_features(self, features: np.ndarray) -> Samples:
        """The same pixels with other features (same row order)."""
        if features.shape[0] != len(self):
            raise DataError(f"Expected {len(self)} feature rows. Got {features.shape[0]}.")
        return replace(self, features=np.asarray(features, np.float32))


def _keep(cols: np.ndarray, rows: np.ndarray, epsg: int, p: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic subsample: keep a pixel when its hash is below its polygon's rate."""
    u = uniform(hash_keys(int(seed), tag("head-sample"), int(epsg), cols.astype(np.int64),
                          rows.astype(np.int64)))
    return u < p


def _window_bbox(to_ll: Transformer, x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
    west, south, east, north = to_ll.transform_bounds(x0 + 1, y1 + 1, x1 - 1, y0 - 1, densify_pts=5)
    return (west, south, east, north)


def _values_at(da: Any, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Rows of a (y, x, band) DataArray at the pixels nearest to (xs, ys)."""
    gx, gy = da["x"].values, da["y"].values
    if gx.size == 0 or gy.size == 0:
        return np.full((xs.size, da.shape[-1]), np.nan, np.float32)
    dx = gx[1] - gx[0] if gx.size > 1 else PIXEL_M
    dy = gy[1] - gy[0] if gy.size > 1 else -PIXEL_M
    ix = np.rint((xs - gx[0]) / dx).astype(np.int64)
    iy = np.rint((ys - gy[0]) / dy).astype(np.int64)
    ok = (ix >= 0) & (ix < gx.size) & (iy >= 0) & (iy < gy.size)
    out = np.full((xs.size, da.shape[-1]), np.nan, np.float32)
    vals = da.values
    out[ok] = vals[iy[ok], ix[ok]]
    return out


def sample_store(
    labels: LabelSet,
    output_uri: str,
    year: int,
    storage: StorageConfig | None = None,
    max_per_polygon: int = 50,
    seed: int = 0,
    inner_buffer_m: float = 0.0,
) -> Samples:
    """Labelled pixels of a published year store, with their dequantised embeddings.

    Args:
        labels: Validated labels (lon/lat).
        output_uri: Root holding ``{year}.zarr``.
        year: The year.
        storage: Storage config.
        max_per_polygon: About this many pixels per polygon at most (hash subsample).
        seed: Subsampling seed.
        inner_buffer_m: Shrink polygons by this much first (drop mixed pixels at edges).

    Raises:
        DataError: no store, or no label falls on a published pixel (geometries outside the
            store), naming how many fell outside.
    """
    storage = storage or StorageConfig()
    groups = zone_groups(output_uri, year, storage)
    if not groups:
        raise DataError(f"Expected a published store {output_uri}/{year}.zarr. Got none.")
    parts: list[dict[str, np.ndarray]] = []
    for _, ext in groups.items():
        check_stop("sampling labels")
        to_utm = Transformer.from_crs(4326, ext.epsg, always_xy=True)
        to_ll = Transformer.from_crs(ext.epsg, 4326, always_xy=True)

        def fwd(xy: np.ndarray, tr: Transformer = to_utm) -> np.ndarray:
            x, y = tr.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        geoms = shapely.transform(labels.geometry, fwd)
        if labels.kind == "polygon" and inner_buffer_m > 0:
            geoms = shapely.buffer(geoms, -inner_buffer_m)
        parts.extend(_sample_zone(labels, geoms, ext, output_uri, year, storage,
                                  max_per_polygon, seed, to_ll))
    if not parts:
        raise DataError(f"Expected labels on published pixels of {output_uri}/{year}.zarr "
                        f"(zones {sorted(groups)}). Got none of {len(labels)} features inside "
                        "the store: geometries outside the store, or only on no-data pixels.")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Samples(features=cat["features"], label=labels.value[cat["feature"]],
                   polygon_id=labels.polygon_id[cat["feature"]], epsg=cat["epsg"],
                   x=cat["x"], y=cat["y"], lon=cat["lon"], lat=cat["lat"], task=labels.task,
                   classes=labels.classes)


def _sample_zone(labels: LabelSet, geoms: np.ndarray, ext: Any, output_uri: str, year: int,
                 storage: StorageConfig, max_per_polygon: int, seed: int,
                 to_ll: Transformer) -> list[dict[str, np.ndarray]]:
    from affine import Affine
    from rasterio.features import rasterize

    b = shapely.bounds(geoms)  # (N, 4) xmin ymin xmax ymax
    valid = ~shapely.is_empty(geoms)
    c0 = np.floor((b[:, 0] - ext.x0) / PIXEL_M) // SHARD_PX
    c1 = np.floor((b[:, 2] - ext.x0) / PIXEL_M) // SHARD_PX
    r0 = np.floor((ext.y0 - b[:, 3]) / PIXEL_M) // SHARD_PX
    r1 = np.floor((ext.y0 - b[:, 1]) / PIXEL_M) // SHARD_PX
    n_sr, n_sc = ext.height // SHARD_PX, ext.width // SHARD_PX
    inside = valid & (c1 >= 0) & (c0 < n_sc) & (r1 >= 0) & (r0 < n_sr)
    if not inside.any():
        return []
    area_px = np.maximum(shapely.area(geoms) / PIXEL_M**2, 1.0)
    rate = np.minimum(1.0, max_per_polygon / area_px) if labels.kind == "polygon" else np.ones(len(geoms))
    windows: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(inside):  # per feature (not per pixel): the windows it touches
        for sr in range(max(int(r0[i]), 0), min(int(r1[i]), n_sr - 1) + 1):
            for sc in range(max(int(c0[i]), 0), min(int(c1[i]), n_sc - 1) + 1):
                windows.setdefault((sr, sc), []).append(int(i))
    out: list[dict[str, np.ndarray]] = []
    for (sr, sc), feats in sorted(windows.items()):
        check_stop("sampling labels")
        wx0, wy0 = ext.x0 + sc * SHARD_PX * PIXEL_M, ext.y0 - sr * SHARD_PX * PIXEL_M
        idx = np.asarray(feats)
        if labels.kind == "polygon":
            grid = rasterize(((geoms[i], i + 1) for i in idx), out_shape=(SHARD_PX, SHARD_PX),
                             transform=Affine(PIXEL_M, 0.0, wx0, 0.0, -PIXEL_M, wy0), fill=0,
                             dtype="int32")
            rr, cc = np.nonzero(grid)
            feat = grid[rr, cc].astype(np.int64) - 1
        else:
            px = shapely.get_coordinates(shapely.get_geometry(geoms[idx], 0))  # MultiPoint: first
            cc = np.floor((px[:, 0] - wx0) / PIXEL_M).astype(np.int64)
            rr = np.floor((wy0 - px[:, 1]) / PIXEL_M).astype(np.int64)
            ok = (cc >= 0) & (cc < SHARD_PX) & (rr >= 0) & (rr < SHARD_PX)
            rr, cc, feat = rr[ok], cc[ok], idx[ok]
        col_g = sc * SHARD_PX + cc
        row_g = sr * SHARD_PX + rr
        keep = _keep(col_g + ext.x0 // int(PIXEL_M), row_g - ext.y0 // int(PIXEL_M), ext.epsg,
                     rate[feat], seed)
        if not keep.any():
            continue
        col_g, row_g, feat = col_g[keep], row_g[keep], feat[keep]
        xs = ext.x0 + (col_g + 0.5) * PIXEL_M
        ys = ext.y0 - (row_g + 0.5) * PIXEL_M
        da = open_region(output_uri, year, _window_bbox(to_ll, wx0, wy0,
                                                        wx0 + SHARD_PX * PIXEL_M,
                                                        wy0 - SHARD_PX * PIXEL_M),
                         storage, crs=ext.epsg)
        vals = _values_at(da, xs, ys)
        ok = np.isfinite(vals).all(-1)
        if not ok.any():
            continue
        lon, lat = to_ll.transform(xs[ok], ys[ok])
        out.append({"features": vals[ok], "feature": feat[ok],
                    "epsg": np.full(int(ok.sum()), ext.epsg, np.int32), "x": xs[ok],
                    "y": ys[ok], "lon": np.asarray(lon), "lat": np.asarray(lat)})
    return out


def sample_tiles(samples: Samples, tiles: Sequence[Tile]) -> list[tuple[Tile, np.ndarray, np.ndarray, np.ndarray]]:
    """Which samples lie in which tile: ``(tile, sample indices, rows, cols)`` per tile."""
    out = []
    taken = np.zeros(len(samples), bool)
    for t in tiles:
        m = (~taken & (samples.epsg == t.epsg) & (samples.x >= t.x0) & (samples.x < t.x1)
             & (samples.y <= t.y0) & (samples.y > t.y1))
        if not m.any():
            continue
        taken |= m
        idx = np.flatnonzero(m)
        rows = np.floor((t.y0 - samples.y[idx]) / PIXEL_M).astype(np.int64)
        cols = np.floor((samples.x[idx] - t.x0) / PIXEL_M).astype(np.int64)
        out.append((t, idx, rows, cols))
    return out


@dataclass(frozen=True)
class PixelSeries:
    """d-pixel time series of some pixels of one tile (TESSERA arrays, pixel axis first).

    s2 (N, T, 10) uint16, s2_valid (N, T) bool, s2_doy (T,), s1 (N, T1, 2) int16 (ascending
    then descending), s1_valid (N, T1), s1_doy (T1,), s1_keys (T1,) int64.
    """

    s2: np.ndarray
    s2_valid: np.ndarray
    s2_doy: np.ndarray
    s1: np.ndarray
    s1_valid: np.ndarray
    s1_doy: np.ndarray
    s1_keys: np.ndarray


def read_series(dp: DPixelRef, rows: np.ndarray, cols: np.ndarray,
                storage: StorageConfig) -> PixelSeries:
    """The d-pixel time series of the given pixels of a tile (coordinate reads)."""
    from tasks.embed import S1_ORBIT_KEY

    g = zarr.open_group(zarr_store(dp.uri, storage, read_only=True), mode="r")
    t = g["bands"].shape[0]
    ti = np.arange(t)[:, None, None]
    bi = np.arange(g["bands"].shape[-1])[None, None, :]
    r3, c3 = rows[None, :, None], cols[None, :, None]
    s2 = np.moveaxis(g["bands"].vindex[ti, r3, c3, bi], 0, 1) if t else np.zeros((rows.size, 0, 10), np.uint16)
    s2_valid = (np.moveaxis(g["masks"].vindex[np.arange(t)[:, None], rows[None], cols[None]], 0, 1) > 0
                if t else np.zeros((rows.size, 0), bool))
    s1_parts, doys, keys = [], [], []
    for o in ORBITS:
        a = g[f"sar_{o}"]
        n = a.shape[0]
        d = g[f"sar_{o}_doy"][:]
        if n:
            s1_parts.append(np.moveaxis(a.vindex[np.arange(n)[:, None, None], r3, c3,
                                                 np.arange(2)[None, None, :]], 0, 1))
        else:
            s1_parts.append(np.zeros((rows.size, 0, 2), np.int16))
        doys.append(d)
        keys.append(d.astype(np.int64) + S1_ORBIT_KEY[o])
    s1 = np.concatenate(s1_parts, axis=1)
    return PixelSeries(s2=s2, s2_valid=s2_valid, s2_doy=g["doys"][:], s1=s1,
                       s1_valid=(s1 != 0).any(-1), s1_doy=np.concatenate(doys),
                       s1_keys=np.concatenate(keys))


def seasonal_features(ps: PixelSeries) -> np.ndarray:
    """Per-band seasonal statistics of d-pixels: the raw-feature baseline.

    Per quarter (:data:`QUARTERS`): the median of each S2 band over clear observations
    (reflectance, DN / 10000) and the mean of S1 VV/VH codes over valid ones; a quarter with
    no valid observation takes the pixel's annual value (0 when there is none).

    Returns:
        (N, 4 * (10 + 2)) float32.
    """
    n = ps.s2.shape[0]
    s2 = np.where(ps.s2_valid[..., None], ps.s2.astype(np.float32) / 1e4, np.nan)
    s1 = np.where(ps.s1_valid[..., None], ps.s1.astype(np.float32), np.nan)
    import warnings

    feats = []
    with warnings.catch_warnings():  # all-NaN slices are expected (cloudy quarters)
        warnings.simplefilter("ignore", RuntimeWarning)
        s2_year = np.nanmedian(s2, axis=1) if s2.shape[1] else np.full((n, 10), np.nan, np.float32)
        s1_year = np.nanmean(s1, axis=1) if s1.shape[1] else np.full((n, 2), np.nan, np.float32)
        for lo, hi in QUARTERS:
            q2 = (ps.s2_doy >= lo) & (ps.s2_doy <= hi)
            q1 = (ps.s1_doy >= lo) & (ps.s1_doy <= hi)
            m2 = np.nanmedian(s2[:, q2], axis=1) if q2.any() else np.full_like(s2_year, np.nan)
            m1 = np.nanmean(s1[:, q1], axis=1) if q1.any() else np.full_like(s1_year, np.nan)
            feats += [np.where(np.isnan(m2), s2_year, m2), np.where(np.isnan(m1), s1_year, m1)]
    out = np.concatenate(feats, axis=1)
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def dpixel_features(samples: Samples, dps: Sequence[DPixelRef], storage: StorageConfig) -> np.ndarray:
    """Raw-feature baseline (:func:`seasonal_features`) of every sample, from the d-pixels.

    Raises:
        DataError: a sample lies in none of the tiles of ``dps``.
    """
    out = np.zeros((len(samples), 4 * 12), np.float32)
    by_tile = {dp.tile.id: dp for dp in dps}
    seen = np.zeros(len(samples), bool)
    for tile, idx, rows, cols in sample_tiles(samples, [dp.tile for dp in dps]):
        check_stop("raw d-pixel features")
        out[idx] = seasonal_features(read_series(by_tile[tile.id], rows, cols, storage))
        seen[idx] = True
    if not seen.all():
        raise DataError(f"Expected every sample inside the build's tiles. Got {int((~seen).sum())} "
                        "outside (labels beyond the build's region).")
    return out


def encoder_embeddings(samples: Samples, dps: Sequence[DPixelRef], model: Any, seed: int,
                       storage: StorageConfig, batch_size: int = 1024,
                       device: str = "cpu") -> np.ndarray:
    """Embeddings of the samples by ``model`` (e.g. a random-init encoder), from d-pixels.

    Same sampling of time steps as the build's embedding (pixel ids and seed), so only the
    weights differ. Rows the encoder cannot cover are NaN.
    """
    from tasks.embed import pixel_ids
    from tessera_model import embed_pixels

    out = np.full((len(samples), model.spec.latent_dim), np.nan, np.float32)
    by_tile = {dp.tile.id: dp for dp in dps}
    for tile, idx, rows, cols in sample_tiles(samples, [dp.tile for dp in dps]):
        check_stop("random-init embeddings")
        ps = read_series(by_tile[tile.id], rows, cols, storage)
        ids = pixel_ids(tile, slice(0, tile.height), slice(0, tile.width)).reshape(tile.height, tile.width)
        out[idx] = embed_pixels(model, ps.s2, ps.s2_valid, ps.s2_doy, ps.s1, ps.s1_valid,
                                ps.s1_doy, ps.s1_keys, ids[rows, cols], seed=seed,
                                batch_size=batch_size, device=device,
                                before_batch=lambda: check_stop("random-init embeddings"))
    return out


def random_init_model(spec: Any, seed: int) -> Any:
    """An untrained encoder of the given spec (weights from ``torch.manual_seed(seed)``)."""
    import torch

    from tessera_model import TesseraModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TesseraModel(spec, with_projector=False).eval()


def crs_name(epsg: int) -> str:
    """``EPSG:nnnn`` (for reports)."""
    return CRS.from_epsg(int(epsg)).to_string()
