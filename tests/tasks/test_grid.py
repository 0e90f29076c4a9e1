"""Tiling: alignment to the shard grid, zone crossing, coverage, stable ids."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from tasks.grid import SHARD_M, Tile, plan_tiles, region_mask, zone_of_lon


def test_tiles_align_to_shard_grid():
    tiles = plan_tiles(box(0.10, 52.19, 0.16, 52.205), 512)
    assert tiles
    for t in tiles:
        assert t.x0 % (512 * 10) == 0 and t.y0 % (512 * 10) == 0
        assert t.x0 % SHARD_M == 0 and t.y0 % SHARD_M == 0
        assert t.epsg == 32631


def test_tile_size_must_be_multiple_of_256():
    with pytest.raises(ValueError, match="multiple of 256"):
        plan_tiles(box(0.1, 52.1, 0.11, 52.11), 300)


def test_ids_are_stable_and_parse():
    t = Tile(zone=31, south=False, x0=296960, y0=5788160, size_px=256)
    assert t.id == "31N-E0296960-N5788160-256"
    assert Tile.from_id(t.id) == t
    with pytest.raises(ValueError, match="tile id"):
        Tile.from_id("nonsense")


def test_zone_crossing_covers_each_pixel_once():
    region = box(5.97, 45.00, 6.03, 45.02)  # crosses the 31/32 boundary at 6 E
    tiles = plan_tiles(region)
    zones = {t.zone for t in tiles}
    assert zones == {31, 32}
    # every pixel centre counted belongs to exactly one zone (its native one)
    total = 0
    for t in tiles:
        m = region_mask(t, region)
        total += m.sum()
    area_m2 = total * 100.0
    from tasks.grid import region_area_km2

    assert area_m2 / 1e6 == pytest.approx(region_area_km2(region), rel=0.02)


def test_tiles_cover_region_without_overlap():
    region = Polygon([(0.10, 52.19), (0.18, 52.19), (0.14, 52.23)])
    tiles = plan_tiles(region)
    keys = {(t.zone, t.x0, t.y0) for t in tiles}
    assert len(keys) == len(tiles)
    covered = sum(region_mask(t, region).sum() for t in tiles)
    from tasks.grid import region_area_km2

    assert covered * 100 / 1e6 == pytest.approx(region_area_km2(region), rel=0.02)
    # tiles touching nothing of the region are not planned
    assert all(region_mask(t, region).any() for t in tiles)


def test_southern_hemisphere():
    tiles = plan_tiles(box(-47.95, -15.80, -47.90, -15.77))
    assert {t.epsg for t in tiles} == {32723}
    assert all(t.south for t in tiles)


def test_zone_of_lon():
    assert list(zone_of_lon(np.array([-180, -177.1, 0.0, 5.99, 6.0, 179.9]))) == [1, 1, 31, 31, 32, 60]
