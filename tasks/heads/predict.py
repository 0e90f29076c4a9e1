"""Predicted maps: a head applied to a published year store, on the store's own grid.

Layout of a map (``{map_uri}``, a Zarr v3 store, one group per zone group of the store):

===============  =======  ==========  ===================================================
array            dtype    fill        meaning
===============  =======  ==========  ===================================================
``class``        uint8    255         predicted class code (classification heads)
``probability``  float32  NaN         probability of the predicted class
``value``        float32  NaN         predicted value (regression heads)
===============  =======  ==========  ===================================================

Arrays have the zone group's shape, 256 x 256 chunks and its CRS (``proj:``/``spatial:``
attributes and a CF ``spatial_ref`` on the group); the class names are in the attributes.
Pixels whose embedding is no data stay at the fill value. The map is written one 256-px
shard window at a time (memory bounded by a window); each window commits with
:func:`tasks.storage.commit_stage` (a marker under ``.tessera/windows/``), so a stopped or
killed run resumes where it stopped, and ``map.json`` is written last: a map without it is
incomplete. An optional Cloud-Optimised GeoTIFF per zone group (``{group}.tif``; bands:
class and probability, or value) is written from the finished Zarr.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field
from pyproj import CRS, Transformer

from tasks.config import StorageConfig
from tasks.errors import DataError
from tasks.grid import PIXEL_M, SHARD_PX
from tasks.heads.models import Head
from tasks.heads.samples import _values_at, _window_bbox
from tasks.publish import ZoneExtent, grid_mapping_attrs
from tasks.reader import open_region, zone_groups
from tasks.stop import check_stop
from tasks.storage import commit_stage, is_done, join, mark_done, write_bytes_atomic, zarr_store

__all__ = ["MapRef", "WindowRef", "map_preview_png", "predict_map", "read_map"]

NO_CLASS = 255
"""Fill value of the ``class`` array (no data)."""


class WindowRef(BaseModel):
    """One committed window of a predicted map."""

    model_config = ConfigDict(frozen=True)

    group: str
    row: int = Field(description="Shard row of the window in the zone grid.")
    col: int = Field(description="Shard column.")
    n_valid: int
    seconds: float = 0.0


class MapRef(BaseModel):
    """A complete predicted map."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="The map's Zarr store.")
    head_uri: str
    year: int
    task: str
    classes: list[str] = Field(default_factory=list)
    groups: list[str]
    n_windows: int
    n_valid: int
    cog_uris: list[str] = Field(default_factory=list)
    seconds: float = 0.0


def _windows(ext: ZoneExtent, bbox: tuple[float, float, float, float] | None) -> Iterator[tuple[int, int]]:
    n_r, n_c = ext.height // SHARD_PX, ext.width // SHARD_PX
    r0, r1, c0, c1 = 0, n_r, 0, n_c
    if bbox is not None:
        to_utm = Transformer.from_crs(4326, ext.epsg, always_xy=True)
        x0, y0, x1, y1 = to_utm.transform_bounds(*bbox, densify_pts=21)
        c0 = max(int((x0 - ext.x0) // (SHARD_PX * PIXEL_M)), 0)
        c1 = min(int((x1 - ext.x0) // (SHARD_PX * PIXEL_M)) + 1, n_c)
        r0 = max(int((ext.y0 - y1) // (SHARD_PX * PIXEL_M)), 0)
        r1 = min(int((ext.y0 - y0) // (SHARD_PX * PIXEL_M)) + 1, n_r)
    for r in range(r0, r1):
        for c in range(c0, c1):
            yield r, c


def _prepare_group(root: zarr.Group, name: str, ext: ZoneExtent, head: Head,
                   classes: list[str]) -> zarr.Group:
    if name in root:
        return root[name]
    g = root.create_group(name)
    shape, chunks = (ext.height, ext.width), (SHARD_PX, SHARD_PX)
    if head.task == "classification":
        g.create_array("class", shape=shape, chunks=chunks, dtype="uint8", fill_value=NO_CLASS)
        g.create_array("probability", shape=shape, chunks=chunks, dtype="float32",
                       fill_value=np.nan)
    else:
        g.create_array("value", shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan)
    crs = CRS.from_epsg(ext.epsg)
    g.attrs.update({"proj:code": f"EPSG:{ext.epsg}", "spatial:transform": ext.transform,
                    "spatial:shape": [ext.height, ext.width], "spatial_ref": grid_mapping_attrs(
                        crs, ext.transform), "classes": classes, "task": head.task})
    return g


def predict_map(
    head: Head,
    head_uri: str,
    classes: list[str],
    output_uri: str,
    year: int,
    map_uri: str,
    storage: StorageConfig | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    cog: bool = False,
) -> MapRef:
    """Apply a head to every published pixel of a year store (or of a lon/lat box).

    Args:
        head: The fitted head (:func:`~tasks.heads.models.load_head`).
        head_uri: Where it came from (recorded in ``map.json``).
        classes: Class names (classification).
        output_uri: Root holding ``{year}.zarr``.
        year: The year.
        map_uri: Where the map's Zarr store goes.
        storage: Storage config.
        bbox: Only the shard windows touching this (west, south, east, north) box.
        cog: Also write a Cloud-Optimised GeoTIFF per zone group.

    Raises:
        DataError: no store, or the box misses every zone group.
        StopRequested: asked to stop (committed windows are kept; run again to resume).
    """
    t0 = time.perf_counter()
    storage = storage or StorageConfig()
    done = is_done(map_uri, storage)
    if done is not None:
        return MapRef.model_validate(done)
    groups = zone_groups(output_uri, year, storage)
    if not groups:
        raise DataError(f"Expected a published store {output_uri}/{year}.zarr. Got none.")
    root = zarr.open_group(zarr_store(map_uri, storage), mode="a")
    refs: list[WindowRef] = []
    written: list[str] = []
    for name, ext in groups.items():
        wins = list(_windows(ext, bbox))
        if not wins:
            continue
        g = _prepare_group(root, name, ext, head, classes)
        to_ll = Transformer.from_crs(ext.epsg, 4326, always_xy=True)
        written.append(name)
        for r, c in wins:
            uri = join(map_uri, ".tessera", "windows", name, f"{r}_{c}")
            refs.append(commit_stage(uri, storage, WindowRef, lambda r=r, c=c, g=g, ext=ext,
                                     to_ll=to_ll, name=name: _predict_window(
                                         head, g, name, ext, r, c, output_uri, year, storage,
                                         to_ll)))
    if not written:
        raise DataError(f"Expected the box {bbox} to touch the store {output_uri}/{year}.zarr "
                        f"(zones {sorted(groups)}). Got none.")
    cogs = [write_cog(map_uri, n, storage) for n in written] if cog else []
    ref = MapRef(uri=map_uri, head_uri=head_uri, year=year, task=head.task, classes=classes,
                 groups=written, n_windows=len(refs), n_valid=sum(w.n_valid for w in refs),
                 cog_uris=cogs, seconds=round(time.perf_counter() - t0, 3))
    write_bytes_atomic(join(map_uri, "map.json"), json.dumps(ref.model_dump(mode="json"),
                                                             indent=1).encode(), storage)
    mark_done(map_uri, storage, ref)
    return ref


def _predict_window(head: Head, g: zarr.Group, name: str, ext: ZoneExtent, r: int, c: int,
                    output_uri: str, year: int, storage: StorageConfig,
                    to_ll: Transformer) -> WindowRef:
    t0 = time.perf_counter()
    check_stop("predicted map")
    wx0, wy0 = ext.x0 + c * SHARD_PX * PIXEL_M, ext.y0 - r * SHARD_PX * PIXEL_M
    da = open_region(output_uri, year, _window_bbox(to_ll, wx0, wy0, wx0 + SHARD_PX * PIXEL_M,
                                                    wy0 - SHARD_PX * PIXEL_M), storage,
                     crs=ext.epsg)
    xs = wx0 + (np.arange(SHARD_PX) + 0.5) * PIXEL_M
    ys = wy0 - (np.arange(SHARD_PX) + 0.5) * PIXEL_M
    xx, yy = np.meshgrid(xs, ys)
    emb = _values_at(da, xx.ravel(), yy.ravel())
    ok = np.isfinite(emb).all(1)
    rows = slice(r * SHARD_PX, (r + 1) * SHARD_PX)
    cols = slice(c * SHARD_PX, (c + 1) * SHARD_PX)
    if head.task == "classification":
        cls = np.full(SHARD_PX * SHARD_PX, NO_CLASS, np.uint8)
        prob = np.full(SHARD_PX * SHARD_PX, np.nan, np.float32)
        if ok.any():
            p = head.predict_proba(emb[ok])
            cls[ok] = p.argmax(1).astype(np.uint8)
            prob[ok] = p.max(1)
        g["class"][rows, cols] = cls.reshape(SHARD_PX, SHARD_PX)
        g["probability"][rows, cols] = prob.reshape(SHARD_PX, SHARD_PX)
    else:
        val = np.full(SHARD_PX * SHARD_PX, np.nan, np.float32)
        if ok.any():
            val[ok] = head.predict(emb[ok])
        g["value"][rows, cols] = val.reshape(SHARD_PX, SHARD_PX)
    return WindowRef(group=name, row=r, col=c, n_valid=int(ok.sum()),
                     seconds=round(time.perf_counter() - t0, 3))


def read_map(map_uri: str, group: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Arrays (numpy) and attributes of one zone group of a complete map.

    Raises:
        DataError: the map is incomplete (no ``map.json`` commit).
    """
    storage = storage or StorageConfig()
    if is_done(map_uri, storage) is None:
        raise DataError(f"Expected a complete map at {map_uri}. Got an incomplete one (run "
                        "predict-map again to resume it).")
    g = zarr.open_group(zarr_store(map_uri, storage, read_only=True), mode="r")[group]
    out: dict[str, Any] = {k: g[k][:] for k in ("class", "probability", "value") if k in g}
    out["attrs"] = dict(g.attrs)
    return out


def write_cog(map_uri: str, group: str, storage: StorageConfig) -> str:
    """A Cloud-Optimised GeoTIFF of one zone group of a map (``{map_uri}/{group}.tif``)."""
    import tempfile
    from pathlib import Path

    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.transform import Affine

    g = zarr.open_group(zarr_store(map_uri, storage, read_only=True), mode="r")[group]
    names = ["class", "probability"] if "class" in g else ["value"]
    h, w = g[names[0]].shape
    a, b, c, d, e, f = g.attrs["spatial:transform"][:6]
    transform = Affine(a, b, c, d, e, f)
    crs = g.attrs["proj:code"]
    out = join(map_uri, f"{group}.tif")
    with tempfile.TemporaryDirectory() as tmp:
        plain, final = Path(tmp) / "plain.tif", Path(tmp) / "cog.tif"
        with rasterio.open(plain, "w", driver="GTiff", width=w, height=h, count=len(names),
                           dtype="float32", crs=crs, transform=transform, nodata=np.nan,
                           tiled=True, blockxsize=SHARD_PX, blockysize=SHARD_PX) as dst:
            for r0 in range(0, h, SHARD_PX):  # bounded memory: one row of shards at a time
                block = [g[n][r0:r0 + SHARD_PX, :].astype(np.float32) for n in names]
                if names[0] == "class":
                    block[0][block[0] == NO_CLASS] = np.nan
                win = rasterio.windows.Window(0, r0, w, block[0].shape[0])
                for i, arr in enumerate(block):
                    dst.write(arr, i + 1, window=win)
            dst.descriptions = tuple(names)
        rio_copy(plain, final, driver="COG", compress="deflate")
        write_bytes_atomic(out, final.read_bytes(), storage)
    return out


_PALETTE = np.array([(31, 120, 180), (227, 26, 28), (177, 89, 40), (178, 223, 138),
                     (255, 255, 153), (255, 127, 0), (51, 160, 44), (1, 70, 30),
                     (106, 61, 154), (166, 206, 227), (251, 154, 153), (202, 178, 214)], np.uint8)


def map_preview_png(map_uri: str, group: str, storage: StorageConfig, max_side: int = 512) -> bytes:
    """A small PNG of a map group: class colours, or a grey ramp of the value (2-98 %)."""
    import io

    from PIL import Image

    g = zarr.open_group(zarr_store(map_uri, storage, read_only=True), mode="r")[group]
    name = "class" if "class" in g else "value"
    h, w = g[name].shape
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    a = g[name][::step, ::step]
    if name == "class":
        rgb = _PALETTE[np.asarray(a) % len(_PALETTE)]
        rgb[a == NO_CLASS] = 0
    else:
        v = np.asarray(a, np.float32)
        ok = np.isfinite(v)
        lo, hi = (np.percentile(v[ok], [2, 98]) if ok.any() else (0.0, 1.0))
        grey = (np.clip((v - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(np.where(ok, grey, 0)[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def legend_markdown(classes: list[str]) -> str:
    """Colour legend of a class map (Markdown)."""
    return " · ".join(f"{c}: rgb{tuple(int(v) for v in _PALETTE[i % len(_PALETTE)])}"
                      for i, c in enumerate(classes))
