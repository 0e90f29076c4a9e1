"""Tests of the user-facing reader (tasks/reader.py) on a small local year store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor; a dev dependency, tasks.reader needs none)
import zarr
from pyproj import Transformer

from tasks.config import StorageConfig
from tasks.errors import DataError
from tasks.grid import Tile
from tasks.publish import prepare_zone_stores, publish_tile
from tasks.reader import open_region, pixel_vector, similarity_map, zone_groups
from tests.tasks.test_publish import CFG, MODEL, T_A, T_B, YEAR, _embedding, _write_emb

T_W = Tile(zone=30, south=False, x0=701440, y0=5785600, size_px=256)  # across the 0° meridian
SEEDS = {T_A.id: 1, T_B.id: 2, T_W.id: 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> StorageConfig:
    root = tmp_path_factory.mktemp("reader")
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    tiles = [T_A, T_B, T_W]
    prepare_zone_stores(tiles, YEAR, CFG, storage, MODEL)
    for t in tiles:
        publish_tile(_write_emb(root, t, _embedding(t, SEEDS[t.id])), YEAR, CFG, storage, MODEL)
    return storage


def _deq(storage: StorageConfig, group: str) -> np.ndarray:
    g = zarr.open_group(f"{storage.output_uri}/{YEAR}.zarr/{group}", mode="r")
    return g["embeddings"][:].astype(np.float32) * g["scales"][:][..., None]


def _lonlat(epsg: int, x: float, y: float) -> tuple[float, float]:
    return Transformer.from_crs(epsg, 4326, always_xy=True).transform(x, y)


def test_zone_groups_lists_grids(store: StorageConfig) -> None:
    groups = zone_groups(store.output_uri, YEAR, store)
    assert list(groups) == ["utm30", "utm31"]
    assert groups["utm31"].x0 == T_A.x0 and groups["utm30"].epsg == 32630


def test_open_region_native_matches_store(store: StorageConfig) -> None:
    w, s = _lonlat(32631, T_A.x0 + 1000, T_A.y0 - 2000)
    e, n = _lonlat(32631, T_A.x0 + 2000, T_A.y0 - 1000)
    da = open_region(store.output_uri, YEAR, (w, s, e, n), store)
    assert da.dtype == np.float32 and da.dims == ("y", "x", "band")
    assert da.rio.crs.to_epsg() == 32631
    x0, y0 = float(da.x[0]) - 5, float(da.y[0]) + 5
    assert (x0 - T_A.x0) % 10 == 0 and (T_A.y0 - y0) % 10 == 0  # on the native grid
    r, c = round((T_A.y0 - y0) / 10), round((x0 - T_A.x0) / 10)
    want = _deq(store, "utm31")[r : r + da.shape[0], c : c + da.shape[1]]
    np.testing.assert_array_equal(da.values, want)
    assert 90 < da.shape[0] < 110 and np.isnan(da.values).any() and np.isfinite(da.values).any()
    assert tuple(da.rio.transform())[:6] == (10.0, 0.0, x0, 0.0, -10.0, y0)


def test_bbox_outside_store_is_empty_not_an_error(store: StorageConfig) -> None:
    da = open_region(store.output_uri, YEAR, (10.0, 10.0, 10.1, 10.1), store)
    assert da.shape == (0, 0, 128)
    assert open_region(store.output_uri, 1999, (0.0, 52.0, 0.2, 52.2), store).shape == (0, 0, 128)
    sim = similarity_map(store.output_uri, YEAR, (10.0, 10.0, 10.1, 10.1), store, np.ones(128))
    assert sim.shape == (0, 0)
    assert np.isnan(pixel_vector(store.output_uri, YEAR, 10.0, 10.0, store)).all()
    with pytest.raises(DataError, match="west < east"):
        open_region(store.output_uri, YEAR, (1.0, 52.0, 0.0, 53.0), store)


def test_pixel_vector_by_lonlat(store: StorageConfig) -> None:
    deq = _deq(store, "utm31")
    e = _embedding(T_A, SEEDS[T_A.id])
    valid = np.argwhere(np.isfinite(e).all(-1))
    r, c = valid[len(valid) // 2]
    lon, lat = _lonlat(32631, T_A.x0 + 10 * c + 5, T_A.y0 - 10 * r - 5)
    v = pixel_vector(store.output_uri, YEAR, lon, lat, store)
    assert v.dtype == np.float32 and v.shape == (128,)
    np.testing.assert_array_equal(v, deq[r, c])
    s = np.abs(e[r, c]).max() / 127
    assert np.abs(v - e[r, c]).max() <= s / 2 + 1e-6  # the quantisation bound
    nodata = np.argwhere(~np.isfinite(e).all(-1))[0]
    lon, lat = _lonlat(32631, T_A.x0 + 10 * nodata[1] + 5, T_A.y0 - 10 * nodata[0] - 5)
    assert np.isnan(pixel_vector(store.output_uri, YEAR, lon, lat, store)).all()


def test_similarity_map_chunked_equals_direct(store: StorageConfig) -> None:
    # a box across two shards of T_A and the empty shard between T_A and T_B
    w, n = _lonlat(32631, T_A.x0 + 2000, T_A.y0 - 100)
    e, s = _lonlat(32631, T_A.x0 + 3500, T_A.y0 - 900)
    bbox = (w, s, e, n)
    region = open_region(store.output_uri, YEAR, bbox, store).values
    r, c = np.argwhere(np.isfinite(region).all(-1))[0]
    da = open_region(store.output_uri, YEAR, bbox, store)
    y, x = float(da.y[r]), float(da.x[c])
    lon, lat = _lonlat(32631, x, y)
    sim = similarity_map(store.output_uri, YEAR, bbox, store, examples=[(lon, lat)])
    q = region[r, c] / np.linalg.norm(region[r, c])
    direct = (region @ q) / np.linalg.norm(region, axis=-1)
    assert sim.shape == region.shape[:2] and sim.rio.crs.to_epsg() == 32631
    np.testing.assert_allclose(sim.values, direct, rtol=1e-5, atol=1e-6)
    assert sim.values[r, c] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(sim.values).any()  # the unpublished shard
    with pytest.raises(DataError, match="exactly one"):
        similarity_map(store.output_uri, YEAR, bbox, store)


def test_two_zones_reprojected_to_one_crs(store: StorageConfig) -> None:
    bbox = (-0.06, 52.165, 0.12, 52.185)
    da = open_region(store.output_uri, YEAR, bbox, store, crs=32631)
    assert da.rio.crs.to_epsg() == 32631 and da.shape[2] == 128
    to_ll = Transformer.from_crs(32631, 4326, always_xy=True)
    to_31 = Transformer.from_crs(4326, 32631, always_xy=True)
    # nearest neighbour: each output pixel is exactly the vector of the source pixel under its
    # centre, from zone 30 west of 0 degrees and from zone 31 east of it
    for epsg, tile in ((32630, T_W), (32631, T_A)):
        lon, lat = _lonlat(epsg, tile.x0 + 1005, tile.y0 - 1005)
        x, y = to_31.transform(lon, lat)
        px = da.sel(x=x, y=y, method="nearest")
        want = pixel_vector(
            store.output_uri, YEAR, *to_ll.transform(float(px.x), float(px.y)), store
        )
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(px.values, want)
    sim = similarity_map(store.output_uri, YEAR, bbox, store, query=want, crs=4326)
    assert sim.rio.crs.to_epsg() == 4326 and np.nanmax(sim.values) == pytest.approx(1.0, abs=1e-5)


_NO_RIOXARRAY = """
import json, sys
sys.modules["rioxarray"] = None  # any import of it now raises ImportError
from pyproj import CRS
from tasks.config import StorageConfig
from tasks.reader import open_region
out = sys.argv[1]
da = open_region(out, int(sys.argv[2]), tuple(map(float, sys.argv[3:7])), StorageConfig(output_uri=out))
ref = da.coords["spatial_ref"]
print(json.dumps({
    "epsg": CRS.from_wkt(ref.attrs["crs_wkt"]).to_epsg(),
    "grid_mapping": da.encoding["grid_mapping"],
    "shape": list(da.shape),
    "rioxarray_loaded": sys.modules.get("rioxarray") is not None,
}))
"""


def test_reader_works_without_rioxarray(store: StorageConfig) -> None:
    w, s = _lonlat(32631, T_A.x0 + 1000, T_A.y0 - 2000)
    e, n = _lonlat(32631, T_A.x0 + 2000, T_A.y0 - 1000)
    args = [store.output_uri, str(YEAR), *(repr(v) for v in (w, s, e, n))]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_RIOXARRAY, *args],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["epsg"] == 32631 and got["grid_mapping"] == "spatial_ref"
    assert got["shape"][2] == 128 and not got["rioxarray_loaded"]
    # the same CF coordinate is what rioxarray reads, where it is installed
    da = open_region(store.output_uri, YEAR, (w, s, e, n), store)
    assert da.rio.crs.to_epsg() == 32631
