"""Tests of the geotessera 0.1-degree npy export (tasks/geotessera.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio
import zarr
from pyproj import Transformer

from tasks.geotessera import LANDMASK_COLUMNS, MANIFEST_COLUMNS, cell_name, export_geotessera
from tasks.grid import Tile
from tasks.publish import prepare_zone_stores, publish_tile
from tests.tasks.test_publish import CFG, MODEL, T_A, YEAR, _embedding, _storage, _write_emb


def test_cell_names() -> None:
    assert cell_name(0.15, 52.15) == "grid_0.15_52.15"
    assert cell_name(-0.05, -33.95) == "grid_-0.05_-33.95"


def test_export_layout_shapes_dtypes_crs_manifest(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    e = _embedding(T_A, 1)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, e), YEAR, CFG, storage, MODEL)
    dest = str(tmp_path / "gt")
    ref = export_geotessera(storage.output_uri, YEAR, dest, storage, variant="test")
    assert ref.cells == ["grid_0.15_52.15"]  # T_A lies in lon 0.10-0.15, lat 52.16-52.19
    cell = Path(dest) / "global_0.1_degree_representation" / str(YEAR) / "grid_0.15_52.15"
    q = np.load(cell / "grid_0.15_52.15.npy")
    s = np.load(cell / "grid_0.15_52.15_scales.npy")
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert q.shape[2] == 128 and q.shape[:2] == s.shape
    # 0.1 deg at 52 N at 10 m (~1,112 x 686 px) plus meridian convergence 3 deg off the CM
    assert 1112 <= s.shape[0] <= 1150 and 686 <= s.shape[1] <= 740
    assert np.isfinite(s).all() and (s >= 0).all()
    assert ((s == 0) <= (q == 0).all(-1)).all()  # no-data: q = 0 and s = 0

    with rasterio.open(Path(dest) / "global_0.1_degree_tiff_all" / "grid_0.15_52.15.tiff") as tif:
        assert tif.crs.to_epsg() == 32631 and (tif.height, tif.width) == s.shape
        t = tif.transform
        assert t.b == 0 and t.d == 0 and t.a == 10 and t.e == -10  # north-up, 10 m
        mask = tif.read(1)
    np.testing.assert_array_equal(mask == 1, s > 0)
    # the cell covers its 0.1 degree box
    to_ll = Transformer.from_crs(32631, 4326, always_xy=True)
    lon0, lat0, lon1, lat1 = to_ll.transform_bounds(
        t.c, t.f - 10 * tif.height, t.c + 10 * tif.width, t.f
    )
    assert lon0 <= 0.1 and lon1 >= 0.2 and lat0 <= 52.1 and lat1 >= 52.2
    # the tile's pixels are in the cell, unchanged
    r, c = round((t.f - T_A.y0) / 10), round((T_A.x0 - t.c) / 10)
    g = zarr.open_group(f"{storage.output_uri}/{YEAR}.zarr/utm31", mode="r")
    sz = g["scales"][:]
    np.testing.assert_array_equal(s[r : r + 256, c : c + 256], np.where(np.isfinite(sz), sz, 0))
    np.testing.assert_array_equal(q[r : r + 256, c : c + 256], g["embeddings"][:])
    assert (s > 0).sum() == np.isfinite(e).all(-1).sum()

    m = pq.read_table(Path(dest) / "registry" / "manifest.parquet")
    assert m.column_names == MANIFEST_COLUMNS
    row = m.to_pylist()[0]
    assert row["version"] == "1.0" and row["variant"] == "test" and row["year"] == YEAR
    assert (round(row["lon"] * 100), round(row["lat"] * 100)) == (15, 5215)
    assert row["grid_size"] == (cell / "grid_0.15_52.15.npy").stat().st_size
    assert (Path(dest) / row["scales_path"]).exists() and (Path(dest) / row["grid_path"]).exists()
    _check_landmask_registry(Path(dest), "grid_0.15_52.15", (15, 5215))


def _check_landmask_registry(dest: Path, cell: str, key: tuple[int, int]) -> None:
    """landmasks.parquet as geotessera 0.11's registry reader takes it.

    Its reader (``Registry._load_landmasks_registry``) requires the columns lat, lon and
    file_size (else it warns and drops the whole file), indexes rows by (lon_i, lat_i) =
    round(100 * lon/lat) and reads ``int(row["file_size"])`` as the GeoTIFF's size.
    """
    table = pq.read_table(dest / "registry" / "landmasks.parquet")
    assert table.column_names == LANDMASK_COLUMNS
    assert {"lat", "lon", "file_size"} <= set(table.column_names)
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {
        "lat": "double",
        "lon": "double",
        "hash": "string",
        "file_size": "int64",
        "lon_i": "int32",
        "lat_i": "int32",
    }
    df = table.to_pandas().set_index(["lon_i", "lat_i"])
    row = df.loc[key]
    tiff = dest / "global_0.1_degree_tiff_all" / f"{cell}.tiff"
    assert int(row["file_size"]) == tiff.stat().st_size
    assert row["hash"] == hashlib.sha256(tiff.read_bytes()).hexdigest()
    assert (round(row["lon"] * 100), round(row["lat"] * 100)) == key


def test_landmask_registry_rows_sorted_and_one_per_cell(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    far = Tile(zone=31, south=False, x0=T_A.x0 + 10 * 2560, y0=T_A.y0 - 10 * 2560, size_px=256)
    prepare_zone_stores([T_A, far], YEAR, CFG, storage, MODEL)
    for t, seed in ((T_A, 1), (far, 2)):
        publish_tile(_write_emb(tmp_path, t, _embedding(t, seed)), YEAR, CFG, storage, MODEL)
    dest = tmp_path / "gt"
    ref = export_geotessera(storage.output_uri, YEAR, str(dest), storage, variant="test")
    assert len(ref.cells) >= 2
    rows = pq.read_table(dest / "registry" / "landmasks.parquet").to_pylist()
    assert [(r["lat"], r["lon"]) for r in rows] == sorted((r["lat"], r["lon"]) for r in rows)
    assert sorted(cell_name(r["lon"], r["lat"]) for r in rows) == sorted(ref.cells)
    for r in rows:
        _check_landmask_registry(dest, cell_name(r["lon"], r["lat"]), (r["lon_i"], r["lat_i"]))
