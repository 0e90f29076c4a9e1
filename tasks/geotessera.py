"""Export a year store to geotessera's 0.1-degree npy tile layout (reference section 5).

Each 0.1 degree cell is named by its centre, ``grid_{lon:.2f}_{lat:.2f}`` with centre =
floor(v * 10) / 10 + 0.05, and written in its native UTM zone (the zone of its centre) at
10 m: the cell's lon/lat box projected to that zone and snapped outward to the zone store's
10 m pixel grid (about 1,100 x 700 px at 52 degrees N). Under ``dest_uri``::

    global_0.1_degree_representation/{year}/grid_X_Y/grid_X_Y.npy          int8 (H, W, B), B = K
    global_0.1_degree_representation/{year}/grid_X_Y/grid_X_Y_scales.npy   float32 (H, W)
    global_0.1_degree_tiff_all/grid_X_Y.tiff     landmask uint8 (H, W): CRS + north-up transform
    registry/manifest.parquet                    geotessera's columns (MANIFEST_COLUMNS)
    registry/landmasks.parquet                   so an offline reader does not try to download
                                                 (LANDMASK_COLUMNS; without them geotessera
                                                 warns and ignores the file)

No-data (NaN scale in the store, or outside the zone grid) is written as q = 0 and s = 0, as
npy tiles carry it. A cell is exported when it holds at least one valid pixel. Read offline
with ``GeoTessera(dataset_version="1.0", dataset_variant=variant,
embeddings_dir=dest_uri, registry_dir=dest_uri + "/registry")``.
"""

from __future__ import annotations

import hashlib
import io
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from pydantic import BaseModel, ConfigDict
from pyproj import Transformer

from tasks.config import StorageConfig
from tasks.grid import PIXEL_M, zone_of_lon
from tasks.reader import zone_groups
from tasks.storage import join, write_bytes_atomic, zarr_store

__all__ = [
    "LANDMASK_COLUMNS",
    "MANIFEST_COLUMNS",
    "GeoTesseraRef",
    "cell_name",
    "export_geotessera",
]

MANIFEST_SCHEMA = pa.schema(
    [
        ("version", pa.string()),
        ("variant", pa.string()),
        ("lon", pa.float64()),
        ("lat", pa.float64()),
        ("year", pa.int64()),
        ("grid_size", pa.int64()),
        ("scales_size", pa.int64()),
        ("grid_path", pa.string()),
        ("scales_path", pa.string()),
        ("grid_mtime", pa.float64()),
        ("scales_mtime", pa.float64()),
    ]
)
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
"""geotessera 0.11's manifest.parquet columns, in its order."""
LANDMASK_SCHEMA = pa.schema(
    [
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("hash", pa.string()),
        ("file_size", pa.int64()),
        ("lon_i", pa.int32()),
        ("lat_i", pa.int32()),
    ]
)
"""geotessera's ``landmasks.parquet`` (what ``geotessera-registry`` writes, without its point
geometry): the reader requires ``lat``, ``lon`` and ``file_size`` (bytes of the GeoTIFF) and
looks rows up by ``lon_i``/``lat_i`` = round(100 * lon/lat) (derived when absent, written
here as it writes them); ``hash`` is the SHA-256 of the GeoTIFF. Rows sorted by lat, lon."""
LANDMASK_COLUMNS = LANDMASK_SCHEMA.names
GEOTESSERA_VERSION = "1.0"
"""``version`` column: geotessera accepts "1.0" or "1.1", never "v1"."""
CELL_DEG = 0.1


class GeoTesseraRef(BaseModel):
    """What an export wrote."""

    model_config = ConfigDict(frozen=True)

    dest_uri: str
    manifest_uri: str
    cells: list[str]


def cell_name(lon_centre: float, lat_centre: float) -> str:
    """``grid_{lon:.2f}_{lat:.2f}`` of a cell centre."""
    return f"grid_{lon_centre:.2f}_{lat_centre:.2f}"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _landmask_bytes(valid: np.ndarray, epsg: int, x0: float, y0: float) -> bytes:
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    h, w = valid.shape
    with MemoryFile() as mem:
        with mem.open(
            driver="GTiff",
            height=h,
            width=w,
            count=1,
            dtype="uint8",
            crs=f"EPSG:{epsg}",
            transform=from_origin(x0, y0, PIXEL_M, PIXEL_M),
            compress="deflate",
        ) as ds:
            ds.write(valid.astype(np.uint8), 1)
        return mem.read()


def export_geotessera(
    output_uri: str,
    year: int,
    dest_uri: str,
    storage: StorageConfig,
    variant: str = "tessera-factory",
) -> GeoTesseraRef:
    """Export every 0.1-degree cell with published pixels of one year (module docstring).

    Args:
        output_uri: Root holding ``{year}.zarr``.
        year: The year.
        dest_uri: Root of the export (``embeddings_dir``; the registry goes to ``registry/``).
        storage: Storage config for both.
        variant: ``variant`` column; readers must pass the same ``dataset_variant``.

    Returns:
        A :class:`GeoTesseraRef` listing the cells written.
    """
    groups = zone_groups(output_uri, year, storage)
    root = zarr.open_group(
        zarr_store(join(output_uri, f"{year}.zarr"), storage, read_only=True), mode="r"
    )
    cells: set[tuple[float, float]] = set()
    for ext in groups.values():
        to_ll = Transformer.from_crs(ext.epsg, 4326, always_xy=True)
        lon0, lat0, lon1, lat1 = to_ll.transform_bounds(*ext.bbox, densify_pts=21)
        for i in range(math.floor(lon0 * 10), math.ceil(lon1 * 10)):
            for j in range(math.floor(lat0 * 10), math.ceil(lat1 * 10)):
                cells.add((round(i / 10 + 0.05, 2), round(j / 10 + 0.05, 2)))
    rows = []
    written = []
    for lon_c, lat_c in sorted(cells):
        zone, south = int(zone_of_lon(lon_c)), lat_c < 0
        name = f"utm{zone:02d}{'s' if south else ''}"
        if name not in groups:
            continue
        ext = groups[name]
        to_utm = Transformer.from_crs(4326, ext.epsg, always_xy=True)
        x_min, y_min, x_max, y_max = to_utm.transform_bounds(
            lon_c - 0.05, lat_c - 0.05, lon_c + 0.05, lat_c + 0.05, densify_pts=21
        )
        c0 = math.floor((x_min - ext.x0) / PIXEL_M)
        c1 = math.ceil((x_max - ext.x0) / PIXEL_M)
        r0 = math.floor((ext.y0 - y_max) / PIXEL_M)
        r1 = math.ceil((ext.y0 - y_min) / PIXEL_M)
        h, w = r1 - r0, c1 - c0
        q = np.zeros((h, w, int(root[name]["embeddings"].shape[-1])), np.int8)
        s = np.zeros((h, w), np.float32)
        rr0, rr1 = max(r0, 0), min(r1, ext.height)  # the part inside the zone grid
        cc0, cc1 = max(c0, 0), min(c1, ext.width)
        if rr1 > rr0 and cc1 > cc0:
            qz = root[name]["embeddings"][rr0:rr1, cc0:cc1, :]
            sz = root[name]["scales"][rr0:rr1, cc0:cc1]
            ok = np.isfinite(sz)
            q[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = np.where(ok[..., None], qz, 0)
            s[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = np.where(ok, sz, 0)
        valid = s > 0
        if not valid.any():
            continue
        cell = cell_name(lon_c, lat_c)
        rel_dir = f"global_0.1_degree_representation/{year}/{cell}"
        grid_rel, scales_rel = f"{rel_dir}/{cell}.npy", f"{rel_dir}/{cell}_scales.npy"
        grid_b, scales_b = _npy_bytes(q), _npy_bytes(s)
        write_bytes_atomic(join(dest_uri, grid_rel), grid_b, storage)
        write_bytes_atomic(join(dest_uri, scales_rel), scales_b, storage)
        tiff_rel = f"global_0.1_degree_tiff_all/{cell}.tiff"
        tiff_b = _landmask_bytes(valid, ext.epsg, ext.x0 + c0 * PIXEL_M, ext.y0 - r0 * PIXEL_M)
        write_bytes_atomic(join(dest_uri, tiff_rel), tiff_b, storage)
        now = time.time()
        rows.append(
            {
                "version": GEOTESSERA_VERSION,
                "variant": variant,
                "lon": lon_c,
                "lat": lat_c,
                "year": year,
                "grid_size": len(grid_b),
                "scales_size": len(scales_b),
                "grid_path": grid_rel,
                "scales_path": scales_rel,
                "grid_mtime": now,
                "scales_mtime": now,
                "_tiff": tiff_b,
            }
        )
        written.append(cell)
    manifest = pa.Table.from_pylist(
        [{k: r[k] for k in MANIFEST_COLUMNS} for r in rows], schema=MANIFEST_SCHEMA
    )
    landmasks = pa.Table.from_pylist(
        [
            {
                "lat": r["lat"],
                "lon": r["lon"],
                "hash": hashlib.sha256(r["_tiff"]).hexdigest(),
                "file_size": len(r["_tiff"]),
                "lon_i": round(r["lon"] * 100),
                "lat_i": round(r["lat"] * 100),
            }
            for r in sorted(rows, key=lambda r: (r["lat"], r["lon"]))
        ],
        schema=LANDMASK_SCHEMA,
    )
    manifest_uri = join(dest_uri, "registry", "manifest.parquet")
    for uri, table in (
        (join(dest_uri, "registry", "landmasks.parquet"), landmasks),
        (manifest_uri, manifest),
    ):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes_atomic(uri, buf.getvalue(), storage)  # the manifest last: it lists cells
    return GeoTesseraRef(dest_uri=dest_uri, manifest_uri=manifest_uri, cells=written)
