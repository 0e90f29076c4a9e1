"""Tests of int8 publishing into the ``tessera:`` v1 Zarr convention (tasks/publish.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import DataError
from tasks.grid import PIXEL_M, Tile
from tasks.publish import (
    ZoneExtent,
    dequantise_zone,
    open_zone,
    prepare_zone_stores,
    provenance_uri,
    publish_tile,
    read_tile_record,
    refresh_n_tiles,
    zone_group_name,
)
from tasks.refs import EmbeddingRef

YEAR = 2024
MODEL = "1.0"
CFG = PublishConfig()
# Two tiles of zone 31N with a one-tile gap between them (x), plus one a row below.
T_A = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
T_B = Tile(zone=31, south=False, x0=302080 + 2 * 2560, y0=5785600, size_px=256)
T_C = Tile(zone=31, south=False, x0=302080 + 2560, y0=5785600 - 2560, size_px=256)


def _embedding(tile: Tile, seed: int, nodata_frac: float = 0.1) -> np.ndarray:
    """Float32 (H, W, 128) embeddings with NaN rows where there is no data."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(tile.height, tile.width, 128)).astype(np.float32)
    e *= rng.uniform(0.01, 3.0, size=(tile.height, tile.width, 1)).astype(np.float32)
    e[rng.random((tile.height, tile.width)) < nodata_frac] = np.nan
    return e


def _write_emb(root: Path, tile: Tile, e: np.ndarray, key: str = "k") -> EmbeddingRef:
    uri = str(root / "emb" / f"{tile.id}-{key}.zarr")
    g = zarr.open_group(uri, mode="w")
    g.create_array("embedding", data=e, chunks=(64, 64, 128))
    valid = int(np.isfinite(e).all(-1).sum())
    return EmbeddingRef(
        uri=uri, key=key, tile=tile, n_valid=valid, n_nodata=e.shape[0] * e.shape[1] - valid
    )


def _storage(tmp_path: Path, name: str = "out") -> StorageConfig:
    return StorageConfig(output_uri=str(tmp_path / name), work_uri=str(tmp_path / "work"))


def _publish(tmp_path: Path, storage: StorageConfig, tiles: list[Tile], seeds: dict[str, int]):
    prepare_zone_stores(tiles, YEAR, CFG, storage, MODEL)
    refs = []
    for t in tiles:
        emb = _write_emb(tmp_path, t, _embedding(t, seeds[t.id]), key=str(seeds[t.id]))
        refs.append(publish_tile(emb, YEAR, CFG, storage, MODEL))
    return refs


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_zone_group_names() -> None:
    assert zone_group_name(T_A) == "utm31"
    assert zone_group_name(Tile(zone=7, south=True, x0=0, y0=2560, size_px=256)) == "utm07s"


def test_zone_extent_snaps_union_to_shards() -> None:
    ext = ZoneExtent.from_tiles([T_B, T_A, T_C])
    assert (ext.x0, ext.y0, ext.width, ext.height) == (T_A.x0, T_A.y0, 3 * 256, 2 * 256)
    assert ext.transform == [10.0, 0.0, float(T_A.x0), 0.0, -10.0, float(T_A.y0)]
    with pytest.raises(DataError, match="one zone"):
        ZoneExtent.from_tiles([T_A, Tile(zone=32, south=False, x0=0, y0=2560, size_px=256)])


def test_round_trip_dequantised_matches_float(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    e = _embedding(T_A, seed=1)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    ref = publish_tile(_write_emb(tmp_path, T_A, e), YEAR, CFG, storage, MODEL)
    assert not ref.skipped and ref.group == "utm31"

    ds = open_zone(storage.output_uri, YEAR, "utm31", storage)
    assert ds["embeddings"].dtype == np.int8 and ds["scales"].dtype == np.float32
    deq = dequantise_zone(ds).values
    valid = np.isfinite(e).all(-1)
    assert 0 < valid.sum() < valid.size
    cos = _cosine(deq[valid], e[valid])
    assert cos.min() >= 0.9999
    scales = ds["scales"].values
    assert np.isnan(scales[~valid]).all() and np.isfinite(scales[valid]).all()
    assert (ds["embeddings"].values[~valid] == 0).all()
    assert np.isnan(deq[~valid]).all()


def test_quantisation_follows_contract_formula(tmp_path: Path) -> None:
    """Section 4: s = max|e| / 127, q = clamp(round(e / s), -127, 127), per pixel."""
    storage = _storage(tmp_path)
    e = _embedding(T_A, seed=2)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, e), YEAR, CFG, storage, MODEL)
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r")
    q, s = g["embeddings"][:], g["scales"][:]
    valid = np.isfinite(e).all(-1)
    s_want = np.maximum(np.abs(e[valid]).max(-1) / 127.0, 1e-8)
    np.testing.assert_allclose(s[valid], s_want, rtol=1e-6)
    q_want = np.clip(np.round(e[valid] / s[valid][:, None]), -127, 127)
    assert np.abs(q[valid].astype(np.int32) - q_want).max() <= 1  # float rounding at .5 only
    assert (np.abs(q[valid]).max(-1) == 127).all()


def test_open_zarr_and_rioxarray_crs_transform(tmp_path: Path) -> None:
    rioxarray = pytest.importorskip("rioxarray")
    storage = _storage(tmp_path)
    _publish(tmp_path, storage, [T_A, T_C], {T_A.id: 1, T_C.id: 2})
    ds = xr.open_zarr(str(tmp_path / "out" / f"{YEAR}.zarr"), group="utm31", consolidated=False)
    assert ds["embeddings"].dims == ("northing", "easting", "band")
    assert ds["scales"].dims == ("northing", "easting")
    assert ds.sizes == {"northing": 512, "easting": 512, "band": 128}
    assert rioxarray is not None
    assert ds.rio.crs.to_epsg() == 32631
    assert ds["scales"].rio.crs.to_epsg() == 32631
    assert ds["embeddings"].rio.crs.to_epsg() == 32631
    t = ds["scales"].rio.transform()
    assert tuple(t)[:6] == (10.0, 0.0, float(T_A.x0), 0.0, -10.0, float(T_A.y0))
    # recomputed from the coordinates, too (pixel centres, northing descending)
    t2 = ds["scales"].rio.transform(recalc=True)
    assert tuple(t2)[:6] == (10.0, 0.0, float(T_A.x0), 0.0, -10.0, float(T_A.y0))
    np.testing.assert_array_equal(ds["northing"].values[:2], [T_A.y0 - 5.0, T_A.y0 - 15.0])
    np.testing.assert_array_equal(ds["easting"].values[:2], [T_A.x0 + 5.0, T_A.x0 + 15.0])


def test_attributes_and_array_layout_per_convention(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    _publish(tmp_path, storage, [T_A, T_B], {T_A.id: 1, T_B.id: 2})
    root = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr"), mode="r")
    names = [c["name"] for c in root.attrs["zarr_conventions"]]
    assert names == ["tessera:", "proj:", "spatial:"]
    assert root.attrs["tessera:dataset_version"] == "v1"
    assert root.attrs["tessera:year"] == YEAR
    g = root["utm31"]
    a = dict(g.attrs)
    assert [c["name"] for c in a["zarr_conventions"]] == names
    assert a["tessera:utm_zone"] == 31
    assert a["tessera:n_bands"] == 128
    assert a["tessera:n_tiles"] == 2
    assert a["tessera:model_version"] == MODEL
    assert a["tessera:build_version"] == CFG.build_version
    assert a["proj:code"] == "EPSG:32631"
    assert a["spatial:dimensions"] == ["northing", "easting"]
    assert a["spatial:transform"] == [10.0, 0.0, float(T_A.x0), 0.0, -10.0, float(T_A.y0)]
    assert a["spatial:shape"] == [256, 768]
    assert a["spatial:bbox"] == [float(T_A.x0), float(T_A.y1), float(T_B.x1), float(T_A.y0)]
    assert a["spatial:registration"] == "pixel"

    emb, sc = g["embeddings"], g["scales"]
    assert emb.dtype == np.int8 and emb.fill_value == 0
    assert emb.shards == (256, 256, 128) and emb.chunks == (64, 64, 128)
    assert emb.metadata.dimension_names == ("northing", "easting", "band")
    assert sc.dtype == np.float32 and np.isnan(sc.fill_value)
    assert sc.shards == (256, 256) and sc.metadata.dimension_names == ("northing", "easting")
    blosc = emb.compressors[0].to_dict()["configuration"]
    assert blosc["cname"] == "zstd" and blosc["clevel"] == CFG.compression_level
    for name, n, dtype in (
        ("easting", 768, np.float64),
        ("northing", 256, np.float64),
        ("band", 128, np.int32),
    ):
        c = g[name]
        assert c.shape == (n,) and c.dtype == dtype
        assert c.shards is None and c.compressors == ()
    assert np.all(np.diff(g["northing"][:]) == -PIXEL_M)
    assert g["embeddings"].attrs["grid_mapping"] == "spatial_ref"
    assert "crs_wkt" in g["spatial_ref"].attrs


def test_tiles_land_at_their_offsets(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    seeds = {T_A.id: 1, T_B.id: 2, T_C.id: 3}
    _publish(tmp_path, storage, [T_A, T_B, T_C], seeds)
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r")
    assert g.attrs["tessera:n_tiles"] == 3
    scales = g["scales"][:]
    for t, (r, c) in ((T_A, (0, 0)), (T_B, (0, 512)), (T_C, (256, 256))):
        e = _embedding(t, seeds[t.id])
        valid = np.isfinite(e).all(-1)
        window = scales[r : r + 256, c : c + 256]
        np.testing.assert_array_equal(np.isfinite(window), valid)
        q = g["embeddings"][r : r + 256, c : c + 256, :]
        deq = q.astype(np.float32) * window[..., None]
        assert _cosine(deq[valid], e[valid]).min() >= 0.9999
        rec = read_tile_record(storage.output_uri, YEAR, t, storage)
        assert rec is not None and (rec["row_offset"], rec["col_offset"]) == (r, c)
    # the shards no tile owns stay absent
    assert np.isnan(scales[0:256, 256:512]).all() and np.isnan(scales[256:512, 0:256]).all()


def test_republish_same_is_skipped_and_new_content_replaces(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    e1 = _embedding(T_A, seed=1)
    ref1 = publish_tile(_write_emb(tmp_path, T_A, e1, "a"), YEAR, CFG, storage, MODEL)
    shard = tmp_path / "out" / f"{YEAR}.zarr" / "utm31" / "scales" / "c" / "0" / "0"
    before = shard.stat().st_mtime_ns
    again = publish_tile(_write_emb(tmp_path, T_A, e1.copy(), "b"), YEAR, CFG, storage, MODEL)
    assert again.skipped and not ref1.skipped and again.key == ref1.key
    assert shard.stat().st_mtime_ns == before

    e2 = _embedding(T_A, seed=7, nodata_frac=0.3)
    ref2 = publish_tile(_write_emb(tmp_path, T_A, e2, "c"), YEAR, CFG, storage, MODEL)
    assert not ref2.skipped and ref2.key != ref1.key
    ds = open_zone(storage.output_uri, YEAR, 31, storage)
    valid = np.isfinite(e2).all(-1)
    np.testing.assert_array_equal(np.isfinite(ds["scales"].values), valid)
    assert _cosine(dequantise_zone(ds).values[valid], e2[valid]).min() >= 0.9999
    assert ds.attrs["tessera:n_tiles"] == 1


def test_record_has_no_time_and_provenance_goes_to_work_root(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    e = _embedding(T_A, seed=1)
    emb = _write_emb(tmp_path, T_A, e, "a")
    publish_tile(emb, YEAR, CFG, storage, MODEL)
    rec = read_tile_record(storage.output_uri, YEAR, T_A, storage)
    assert rec is not None and "published_at" not in rec and "source_key" not in rec
    assert str(tmp_path) not in json.dumps(rec)
    prov_path = Path(provenance_uri(storage.work_uri, YEAR, T_A))
    assert prov_path.is_relative_to(tmp_path / "work")
    prov = json.loads(prov_path.read_text())
    assert prov["publish_key"] == rec["publish_key"] and prov["output_uri"] == storage.output_uri
    assert (prov["source_key"], prov["source_uri"]) == (emb.key, emb.uri)
    assert prov["published_at"].startswith(str(time.gmtime().tm_year))
    # a skipped re-publish wrote nothing, so it leaves the first time in place
    prov_path.write_text(json.dumps({**prov, "published_at": "2000-01-01T00:00:00Z"}))
    assert publish_tile(_write_emb(tmp_path, T_A, e, "b"), YEAR, CFG, storage, MODEL).skipped
    assert json.loads(prov_path.read_text())["published_at"] == "2000-01-01T00:00:00Z"
    locks = tmp_path / "out" / f"{YEAR}.zarr" / ".tessera" / "locks"
    assert [p for p in locks.rglob("*") if p.is_file()] == []


def test_model_version_mismatch_refused(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    with pytest.raises(DataError, match=r"'2\.0'.*'1\.0'"):
        prepare_zone_stores([T_A], YEAR, CFG, storage, "2.0")
    emb = _write_emb(tmp_path, T_A, _embedding(T_A, 1))
    with pytest.raises(DataError, match="tessera:model_version"):
        publish_tile(emb, YEAR, CFG, storage, "2.0")


def test_dataset_version_mismatch_refused(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    zarr.create_group(
        str(tmp_path / "out" / f"{YEAR}.zarr"),
        attributes={"tessera:dataset_version": "v0", "tessera:year": YEAR},
    )
    with pytest.raises(DataError, match=r"'v1'.*'v0'"):
        prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)


def test_existing_group_reused_and_publish_outside_refused(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_B], YEAR, CFG, storage, MODEL)
    # a covered tile reuses the group unchanged
    assert prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL) == ["utm31"]
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r")
    assert g.attrs["spatial:shape"] == [256, 768]
    # publishing outside the grid without growing it first is refused, naming the tile
    with pytest.raises(DataError, match=T_C.id):
        publish_tile(_write_emb(tmp_path, T_C, _embedding(T_C, 3)), YEAR, CFG, storage, MODEL)


def test_wrong_embedding_shape_names_tile(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    emb = _write_emb(tmp_path, T_A, np.zeros((256, 256, 64), np.float32))
    with pytest.raises(DataError, match=rf"{T_A.id}.*Expected embedding shape"):
        publish_tile(emb, YEAR, CFG, storage, MODEL)


def test_south_zone_group(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    t = Tile(zone=23, south=True, x0=330240, y0=7395840, size_px=256)
    _publish(tmp_path, storage, [t], {t.id: 5})
    ds = open_zone(storage.output_uri, YEAR, "utm23s", storage)
    assert ds.attrs["proj:code"] == "EPSG:32723"
    assert ds.attrs["tessera:utm_zone"] == 23


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under a store, tile records included, as raw bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_bytes_deterministic_across_outputs_and_tile_order(tmp_path: Path) -> None:
    seeds = {T_A.id: 1, T_B.id: 2, T_C.id: 3}
    s1, s2 = _storage(tmp_path, "out1"), _storage(tmp_path, "out2")
    _publish(tmp_path, s1, [T_A, T_B, T_C], seeds)
    _publish(tmp_path, s2, [T_C, T_B, T_A], seeds)
    t1, t2 = _tree(tmp_path / "out1"), _tree(tmp_path / "out2")
    assert len(t1) > 10 and t1.keys() == t2.keys()
    assert [k for k in t1 if t1[k] != t2[k]] == []


def test_prepare_returns_one_group_per_zone_and_recounts(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    south = Tile(zone=23, south=True, x0=330240, y0=7395840, size_px=256)
    assert prepare_zone_stores([T_A, south, T_B], YEAR, CFG, storage, MODEL) == ["utm23s", "utm31"]
    publish_tile(_write_emb(tmp_path, T_A, _embedding(T_A, 1)), YEAR, CFG, storage, MODEL)
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r+")
    g.attrs.update({"tessera:n_tiles": 9})  # as if two concurrent updates had raced
    assert refresh_n_tiles(storage.output_uri, YEAR, "utm31", storage) == 1
    assert refresh_n_tiles(storage.output_uri, YEAR, "utm23s", storage) == 0
    assert (
        zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31")).attrs["tessera:n_tiles"]
        == 1
    )


# ---- inference mode (the embed stage's ``inference`` attribute; absent means fp32) ----------


def _emb_with(tmp_path: Path, tile: Tile, seed: int, inference: str | None) -> EmbeddingRef:
    ref = _write_emb(tmp_path, tile, _embedding(tile, seed), key=f"{seed}-{inference}")
    if inference is not None:
        zarr.open_group(ref.uri, mode="r+").attrs.update({"inference": inference})
    return ref


def _zone_attrs(tmp_path: Path) -> dict:
    return dict(zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31")).attrs)


def test_inference_recorded_in_record_and_zone_and_a_mismatch_refused(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_B, T_C], YEAR, CFG, storage, MODEL)
    publish_tile(_emb_with(tmp_path, T_A, 1, "int8-dynamic"), YEAR, CFG, storage, MODEL)
    assert _zone_attrs(tmp_path)["tessera:inference"] == "int8-dynamic"
    rec = read_tile_record(storage.output_uri, YEAR, T_A, storage)
    assert rec is not None and rec["inference"] == "int8-dynamic"

    for inference, shown in ((None, "'fp32'"), ("fp32", "'fp32'")):  # absent means fp32
        with pytest.raises(DataError, match=rf"tessera:inference 'int8-dynamic'.*Got {shown}"):
            publish_tile(_emb_with(tmp_path, T_B, 2, inference), YEAR, CFG, storage, MODEL)
    # refused before anything was written
    assert read_tile_record(storage.output_uri, YEAR, T_B, storage) is None
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r")
    assert np.isnan(g["scales"][:, 512:768]).all() and (g["embeddings"][:, 512:768] == 0).all()
    assert g.attrs["tessera:n_tiles"] == 1

    publish_tile(_emb_with(tmp_path, T_C, 3, "int8-dynamic"), YEAR, CFG, storage, MODEL)
    assert _zone_attrs(tmp_path)["tessera:n_tiles"] == 2


def test_inference_absent_is_fp32_and_writes_nothing_new(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_B, T_C], YEAR, CFG, storage, MODEL)
    publish_tile(_emb_with(tmp_path, T_A, 1, None), YEAR, CFG, storage, MODEL)
    assert "tessera:inference" not in _zone_attrs(tmp_path)
    rec = read_tile_record(storage.output_uri, YEAR, T_A, storage)
    assert rec is not None and "inference" not in rec
    # a zone that holds tiles without the attribute holds fp32 tiles
    with pytest.raises(DataError, match=r"tessera:inference 'fp32'.*Got 'int8-dynamic'"):
        publish_tile(_emb_with(tmp_path, T_B, 2, "int8-dynamic"), YEAR, CFG, storage, MODEL)
    publish_tile(_emb_with(tmp_path, T_B, 2, "fp32"), YEAR, CFG, storage, MODEL)
    assert _zone_attrs(tmp_path)["tessera:inference"] == "fp32"
    rec_b = read_tile_record(storage.output_uri, YEAR, T_B, storage)
    assert rec_b is not None and rec_b["inference"] == "fp32"


def test_inference_attribute_must_be_a_string(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    ref = _write_emb(tmp_path, T_A, _embedding(T_A, 1))
    zarr.open_group(ref.uri, mode="r+").attrs.update({"inference": 8})
    with pytest.raises(DataError, match="Expected attribute 'inference' a string"):
        publish_tile(ref, YEAR, CFG, storage, MODEL)
