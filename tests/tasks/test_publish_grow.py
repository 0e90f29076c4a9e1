"""Zone stores that grow, crash-safe commits and concurrent publishers (tasks/publish.py)."""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import time
from pathlib import Path

import fsspec.implementations.local as fs_local
import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
import zarr

from tasks.config import StorageConfig
from tasks.errors import StorageError
from tasks.grid import Tile
from tasks.publish import (
    ZoneExtent,
    ZoneLease,
    prepare_zone_stores,
    publish_tile,
    read_tile_record,
)
from tests.tasks.test_publish import (
    CFG,
    MODEL,
    T_A,
    T_C,
    YEAR,
    _cosine,
    _embedding,
    _storage,
    _write_emb,
)

tq = importlib.import_module("tessera_model.quantise")  # the package re-exports the function
S = 2560  # one shard, metres
T_EAST = Tile(zone=31, south=False, x0=T_A.x0 + 3 * S, y0=T_A.y0 - 2 * S, size_px=256)
T_NW = Tile(zone=31, south=False, x0=T_A.x0 - 2 * S, y0=T_A.y0 + S, size_px=256)


def _tiled_embedding(tile: Tile, seed: int, n_bands: int = 128) -> np.ndarray:
    """A 64 x 64 random pattern repeated over the tile (cheap to make and to compress)."""
    rng = np.random.default_rng(seed)
    e = np.tile(
        rng.normal(size=(64, 64, n_bands)).astype(np.float32),
        (tile.height // 64, tile.width // 64, 1),
    )
    e[rng.random((tile.height, tile.width)) < 0.2] = np.nan
    return e


def _zone(storage: StorageConfig) -> zarr.Group:
    return zarr.open_group(f"{storage.output_uri}/{YEAR}.zarr/utm31", mode="r")


def _check_tile(storage: StorageConfig, tile: Tile, e: np.ndarray) -> None:
    """The tile reads back at the offset the grid attributes give, within the int8 bound."""
    g = _zone(storage)
    ext = ZoneExtent.from_attrs(dict(g.attrs))
    r, c = ext.offset(tile)
    s = g["scales"][r : r + tile.height, c : c + tile.width]
    q = g["embeddings"][r : r + tile.height, c : c + tile.width, :]
    valid = np.isfinite(e).all(-1)
    np.testing.assert_array_equal(np.isfinite(s), valid)
    deq = q.astype(np.float32) * s[..., None]
    assert _cosine(deq[valid], e[valid]).min() >= 0.9999
    rec = read_tile_record(storage.output_uri, YEAR, tile, storage)
    assert rec is not None and (rec["row_offset"], rec["col_offset"]) == (r, c)


def _check_consistent(storage: StorageConfig, n_tiles: int, n_bands: int = 128) -> ZoneExtent:
    """Attributes, arrays, coordinates and CF spatial_ref all describe one grid."""
    g = _zone(storage)
    ext = ZoneExtent.from_attrs(dict(g.attrs))
    assert g.attrs["tessera:n_tiles"] == n_tiles
    assert g["embeddings"].shape == (ext.height, ext.width, n_bands)
    assert g["scales"].shape == (ext.height, ext.width)
    assert ext.height % 256 == 0 and ext.width % 256 == 0 and ext.x0 % S == 0 and ext.y0 % S == 0
    np.testing.assert_array_equal(g["easting"][:], ext.x0 + 10.0 * (np.arange(ext.width) + 0.5))
    np.testing.assert_array_equal(g["northing"][:], ext.y0 - 10.0 * (np.arange(ext.height) + 0.5))
    gt = [float(v) for v in g["spatial_ref"].attrs["GeoTransform"].split()]
    assert gt == [ext.x0, 10.0, 0.0, ext.y0, 0.0, -10.0]
    ds = xr.open_zarr(f"{storage.output_uri}/{YEAR}.zarr", group="utm31", consolidated=False)
    assert tuple(ds["scales"].rio.transform())[:6] == tuple(ext.transform)
    assert ds["scales"].rio.crs.to_epsg() == 32631
    store = Path(storage.output_uri) / f"{YEAR}.zarr" / ".tessera"
    assert not list((store / "locks").rglob("*-*")), "leases left behind"
    assert not (store / "grow").exists() or not list((store / "grow").rglob("*"))
    return ext


def test_grow_east_south_is_a_resize_that_moves_no_data(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    e_a = _embedding(T_A, 1)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, e_a), YEAR, CFG, storage, MODEL)
    shard = tmp_path / "out" / f"{YEAR}.zarr" / "utm31" / "embeddings" / "c" / "0" / "0" / "0"
    before = (shard.read_bytes(), shard.stat().st_mtime_ns)

    assert prepare_zone_stores([T_EAST], YEAR, CFG, storage, MODEL) == ["utm31"]
    ext = _check_consistent(storage, n_tiles=1)
    assert (ext.x0, ext.y0, ext.width, ext.height) == (T_A.x0, T_A.y0, 4 * 256, 3 * 256)
    assert (shard.read_bytes(), shard.stat().st_mtime_ns) == before  # not rewritten
    e_e = _embedding(T_EAST, 2)
    publish_tile(_write_emb(tmp_path, T_EAST, e_e), YEAR, CFG, storage, MODEL)
    _check_tile(storage, T_A, e_a)
    _check_tile(storage, T_EAST, e_e)
    _check_consistent(storage, n_tiles=2)


def test_grow_west_north_moves_origin_and_keeps_tiles(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    e_a, e_c = _embedding(T_A, 1), _embedding(T_C, 3)
    prepare_zone_stores([T_A, T_C], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, e_a), YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_C, e_c), YEAR, CFG, storage, MODEL)

    prepare_zone_stores([T_NW], YEAR, CFG, storage, MODEL)
    ext = _check_consistent(storage, n_tiles=2)
    assert (ext.x0, ext.y0) == (T_NW.x0, T_NW.y0)
    assert (ext.width, ext.height) == (4 * 256, 3 * 256)
    assert ext.offset(T_A) == (256, 512)
    _check_tile(storage, T_A, e_a)
    _check_tile(storage, T_C, e_c)
    # the area that was added reads as absent
    assert np.isnan(_zone(storage)["scales"][0:256, :]).all()
    e_n = _embedding(T_NW, 4)
    publish_tile(_write_emb(tmp_path, T_NW, e_n), YEAR, CFG, storage, MODEL)
    _check_tile(storage, T_NW, e_n)
    _check_tile(storage, T_A, e_a)
    _check_consistent(storage, n_tiles=3)


def test_origin_move_killed_midway_never_shows_misplaced_data_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = _storage(tmp_path)
    e_a, e_c = _embedding(T_A, 1), _embedding(T_C, 3)
    prepare_zone_stores([T_A, T_C], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, e_a), YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_C, e_c), YEAR, CFG, storage, MODEL)

    # 4 shards staged, then 2 embeddings shards and 1 scales shard moved back: die on the 8th
    calls = {"n": 0}
    real = fs_local.LocalFileSystem.cp_file

    def dying_cp(self, path1, path2, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError("killed")
        return real(self, path1, path2, **kw)

    monkeypatch.setattr(fs_local.LocalFileSystem, "cp_file", dying_cp)
    with pytest.raises(OSError, match="killed"):
        prepare_zone_stores([T_NW], YEAR, CFG, storage, MODEL)
    monkeypatch.setattr(fs_local.LocalFileSystem, "cp_file", real)

    # readers: a consistent new grid; each tile complete at its new place or absent
    g = _zone(storage)
    ext = ZoneExtent.from_attrs(dict(g.attrs))
    assert (ext.x0, ext.y0) == (T_NW.x0, T_NW.y0)
    seen = 0
    for t, e in ((T_A, e_a), (T_C, e_c)):
        r, c = ext.offset(t)
        s = g["scales"][r : r + 256, c : c + 256]
        if np.isfinite(s).any():
            seen += 1
            _check_tile(storage, t, e)
    assert seen == 1
    # publishing into a zone with an unfinished move is refused clearly
    with pytest.raises(StorageError, match="unfinished origin move"):
        publish_tile(_write_emb(tmp_path, T_NW, _embedding(T_NW, 4)), YEAR, CFG, storage, MODEL)

    prepare_zone_stores([T_NW], YEAR, CFG, storage, MODEL)  # resumes and completes
    _check_consistent(storage, n_tiles=2)
    _check_tile(storage, T_A, e_a)
    _check_tile(storage, T_C, e_c)


def test_publish_killed_between_blocks_leaves_tile_absent_and_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = _storage(tmp_path)
    big = Tile(zone=31, south=False, x0=T_A.x0, y0=T_A.y0, size_px=512)  # 2 write blocks
    prepare_zone_stores([big], YEAR, CFG, storage, MODEL, n_bands=16)  # 16 bands: fast
    e1, e2 = _tiled_embedding(big, 1, 16), _tiled_embedding(big, 2, 16)
    publish_tile(_write_emb(tmp_path, big, e1, "a"), YEAR, CFG, storage, MODEL)
    _check_tile(storage, big, e1)

    real = ZoneLease.renew
    calls = {"n": 0}

    def dying_renew(self: ZoneLease) -> None:  # the publisher renews after every block
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("killed between blocks")
        real(self)

    monkeypatch.setattr(ZoneLease, "renew", dying_renew)
    with pytest.raises(RuntimeError, match="killed between blocks"):
        publish_tile(_write_emb(tmp_path, big, e2, "b"), YEAR, CFG, storage, MODEL)
    monkeypatch.setattr(ZoneLease, "renew", real)
    assert calls["n"] == 1

    g = _zone(storage)
    assert np.isnan(g["scales"][:]).all(), "a half-written tile is visible"
    assert (g["embeddings"][:256] != 0).any(), "the first block was not written"
    assert read_tile_record(storage.output_uri, YEAR, big, storage) is None
    assert g.attrs["tessera:n_tiles"] == 0

    ref = publish_tile(_write_emb(tmp_path, big, e2, "c"), YEAR, CFG, storage, MODEL)
    assert not ref.skipped
    _check_tile(storage, big, e2)
    _check_consistent(storage, n_tiles=1, n_bands=16)


def test_republish_killed_while_reading_keeps_the_old_tile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile with a record is read, hashed and quantised before anything is written: a
    publish of new content killed there leaves the old content published."""
    storage = _storage(tmp_path)
    big = Tile(zone=31, south=False, x0=T_A.x0, y0=T_A.y0, size_px=512)  # 2 write blocks
    prepare_zone_stores([big], YEAR, CFG, storage, MODEL, n_bands=16)
    e1, e2 = _tiled_embedding(big, 1, 16), _tiled_embedding(big, 2, 16)
    publish_tile(_write_emb(tmp_path, big, e1, "a"), YEAR, CFG, storage, MODEL)
    before = read_tile_record(storage.output_uri, YEAR, big, storage)

    real = tq.quantise
    calls = {"n": 0}

    def dying_quantise(e, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed while reading")
        return real(e, **kw)

    monkeypatch.setattr(tq, "quantise", dying_quantise)
    with pytest.raises(RuntimeError, match="killed while reading"):
        publish_tile(_write_emb(tmp_path, big, e2, "b"), YEAR, CFG, storage, MODEL)
    monkeypatch.setattr(tq, "quantise", real)
    assert calls["n"] == 2

    _check_tile(storage, big, e1)
    assert read_tile_record(storage.output_uri, YEAR, big, storage) == before
    _check_consistent(storage, n_tiles=1, n_bands=16)
    ref = publish_tile(_write_emb(tmp_path, big, e2, "c"), YEAR, CFG, storage, MODEL)
    assert not ref.skipped
    _check_tile(storage, big, e2)


# ---- real processes ----------------------------------------------------------------------

T_P1 = T_A
T_P2 = Tile(zone=31, south=False, x0=T_A.x0 - 3 * S, y0=T_A.y0 + 2 * S, size_px=256)  # NW
T_P3 = Tile(zone=31, south=False, x0=T_A.x0 + 2 * S, y0=T_A.y0 - 3 * S, size_px=256)  # SE


def _worker(args: tuple[str, str, int]) -> str:
    root, tile_id, seed = args
    tile = Tile.from_id(tile_id)
    storage = StorageConfig(output_uri=f"{root}/out", work_uri=f"{root}/work")
    prepare_zone_stores([tile], YEAR, CFG, storage, MODEL)  # may grow the zone, either way
    emb = _write_emb(Path(root), tile, _embedding(tile, seed), key=str(seed))
    return publish_tile(emb, YEAR, CFG, storage, MODEL).group


def test_processes_growing_and_publishing_one_zone_at_once(tmp_path: Path) -> None:
    tiles = {T_P1.id: 1, T_P2.id: 2, T_P3.id: 3}
    # forkserver: real, separate processes (no inherited zarr/fsspec threads), forked from
    # one server that imported the code once, so the test stays fast on two cores
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.tasks.test_publish_grow"])
    with ctx.Pool(3) as pool:
        groups = pool.map(_worker, [(str(tmp_path), t, s) for t, s in tiles.items()])
    assert groups == ["utm31"] * 3
    storage = _storage(tmp_path)
    ext = _check_consistent(storage, n_tiles=3)
    assert (ext.x0, ext.y0) == (T_P2.x0, T_P2.y0)
    assert ext.bbox[2] == T_P3.x1 and ext.bbox[1] == T_P3.y1
    for t, seed in tiles.items():
        _check_tile(storage, Tile.from_id(t), _embedding(Tile.from_id(t), seed))
    recs = sorted((tmp_path / "out" / f"{YEAR}.zarr" / ".tessera" / "tiles").glob("*.json"))
    assert [json.loads(p.read_text())["tile_id"] for p in recs] == sorted(tiles)


def test_leases_exclude_conflicts_time_out_clearly_and_expire(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    store = f"{storage.output_uri}/{YEAR}.zarr"

    def lease(exclusive: bool, ttl_s: float = 60.0) -> ZoneLease:
        return ZoneLease(store, "utm31", storage, exclusive=exclusive, ttl_s=ttl_s, timeout_s=0.3)

    with lease(False), lease(False):  # shared leases coexist
        with pytest.raises(StorageError, match="exclusive lease"):
            lease(True).__enter__()
    with lease(True):
        with pytest.raises(StorageError, match="shared lease"):
            lease(False).__enter__()
    folder = tmp_path / "out" / f"{YEAR}.zarr" / ".tessera" / "locks" / "utm31"
    assert list(folder.iterdir()) == []  # released, and the failed tries cleaned up
    # a crashed writer's lease is ignored once older than the TTL
    stale = folder / f"x-{time.time_ns() - int(120e9)}-dead"
    stale.write_text("{}")
    with lease(False, ttl_s=60.0):
        pass
    with pytest.raises(StorageError, match="shared lease"):
        lease(False, ttl_s=600.0).__enter__()
    # renewing replaces the lease with a fresh one
    held = lease(False, ttl_s=0.03)
    with held:
        first = held._path
        time.sleep(0.02)
        held.renew()
        assert held._path != first and len([p for p in folder.iterdir() if p.name[0] == "s"]) == 1
