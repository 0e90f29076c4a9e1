"""Embedding stage: global pixel ids, region and no-data rules, given checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from pyproj import Transformer

from tasks.acquire import acquire
from tasks.config import (
    DPixelConfig,
    EmbeddingConfig,
    MaskConfig,
    ModelConfig,
    SourceConfig,
    StorageConfig,
)
from tasks.dpixels import extract_dpixels
from tasks.embed import embed_tile, pixel_ids
from tasks.grid import Tile
from tasks.mask import cloud_mask
from tasks.train import given_checkpoint
from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint

from .fakes import FakeSource

BIG = Tile(zone=31, south=False, x0=296960, y0=5788160, size_px=512)


def test_pixel_ids_do_not_depend_on_tiling():
    whole = pixel_ids(BIG, slice(0, 512), slice(0, 512)).reshape(512, 512)
    for dy in (0, 256):
        for dx in (0, 256):
            sub = Tile(zone=31, south=False, x0=BIG.x0 + dx * 10, y0=BIG.y0 - dy * 10, size_px=256)
            ids = pixel_ids(sub, slice(0, 256), slice(0, 256)).reshape(256, 256)
            assert np.array_equal(ids, whole[dy : dy + 256, dx : dx + 256])
    assert np.unique(whole).size == whole.size
    south = Tile(zone=31, south=True, x0=BIG.x0, y0=BIG.y0, size_px=256)
    assert not np.intersect1d(pixel_ids(south, slice(0, 256), slice(0, 256)), whole).size


@pytest.fixture
def storage(tmp_path):
    return StorageConfig(output_uri=str(tmp_path / "out"), work_uri=str(tmp_path / "work"))


def test_embed_tile_native_zone_and_nodata(tmp_path, storage):
    """A tile that crosses 6 E (zone 31 -> 32): pixels east of it are no-data in zone 31."""
    from shapely.geometry import box

    from tasks.grid import plan_tiles

    tile = next(t for t in plan_tiles(box(5.995, 52.2, 6.005, 52.205)) if t.zone == 31)
    sc = acquire(tile, 2022, SourceConfig(), storage, scene_source=FakeSource())
    mk = cloud_mask(sc, MaskConfig(), storage)
    dp = extract_dpixels(sc, mk, DPixelConfig(), storage)
    torch.manual_seed(0)
    model = TesseraModel(ModelSpec.preset("small"))
    ck_path = tmp_path / "model.pt"
    save_checkpoint(build_checkpoint(model), ck_path)
    ckpt = given_checkpoint(str(ck_path), ModelConfig(), storage)
    emb = embed_tile(dp, ckpt, EmbeddingConfig(min_valid_s2=2), 0, storage)
    e = zarr.open_group(emb.uri, mode="r")["embedding"][:]
    assert e.shape == (256, 256, 128) and e.dtype == np.float32
    valid = np.isfinite(e).all(-1)
    inv = Transformer.from_crs(tile.crs, "EPSG:4326", always_xy=True)
    ee, nn = np.meshgrid(tile.eastings(), tile.northings())
    lon, _ = inv.transform(ee, nn)
    east = lon >= 6.0
    assert east.any() and (~east).any()
    assert not valid[east].any()  # beyond the zone band: the neighbouring zone's pixels
    assert not valid[0, 0]  # no S1 data at this pixel
    assert not valid[10:20, 10:20].any()  # clouded on one of the 2 kept dates: 1 obs < 2
    expect = ~east
    expect[0, 0] = False
    expect[10:20, 10:20] = False
    assert np.array_equal(valid, expect)
    assert emb.n_valid == valid.sum() and emb.n_valid + emb.n_nodata == 256 * 256
    # fewer valid S2 observations than the minimum -> no data everywhere (2 scenes kept)
    none = embed_tile(dp, ckpt, EmbeddingConfig(min_valid_s2=3), 0, storage)
    assert none.n_valid == 0
    # same inputs -> same stored result (served from the commit marker)
    again = embed_tile(dp, ckpt, EmbeddingConfig(min_valid_s2=2), 0, storage)
    assert again == emb
