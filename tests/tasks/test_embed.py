"""Embedding stage: global pixel ids, region and no-data rules, given checkpoints."""

from __future__ import annotations

from pathlib import Path

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
TINY = ModelSpec(version="tiny-embed", latent_dim=128, d_model=16, n_layers=1, n_heads=2,
                 ffn_dim=32, dropout=0.0, projector_dim=32, projector_layers=1, sample_steps=8)


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
    model = TesseraModel(TINY)  # the rules under test do not depend on the model's size
    ck_path = tmp_path / "model.pt"
    save_checkpoint(build_checkpoint(model), ck_path)
    ckpt = given_checkpoint(str(ck_path), ModelConfig(), storage)
    strict = EmbeddingConfig(min_valid_s2=2, min_valid_s1=1)
    emb = embed_tile(dp, ckpt, strict, 0, storage)
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
    again = embed_tile(dp, ckpt, strict, 0, storage)
    assert again == emb
    # default: the v1.0 reference's coverage. A pixel without S1 samples the S1 steps it
    # has (all zero), one with 1 valid S2 date is embedded; the strict pixels are unchanged.
    ref = embed_tile(dp, ckpt, EmbeddingConfig(), 0, storage)
    group = zarr.open_group(ref.uri, mode="r")
    assert group.attrs["coverage_rule"] == "v1.0-reference;min_valid_s2=0;min_valid_s1=0"
    assert group.attrs["inference"] == "fp32"
    r = group["embedding"][:]
    rvalid = np.isfinite(r).all(-1)
    assert rvalid[0, 0] and rvalid[10:20, 10:20].all() and not rvalid[east].any()
    assert np.array_equal(r[valid], e[valid])
    assert ref.n_valid == rvalid.sum() > emb.n_valid


@pytest.fixture(scope="module")
def tile_dpixels(tmp_path_factory):
    """The d-pixels of one tile on local disk, and a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("embed")
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    tile = Tile(zone=31, south=False, x0=296960, y0=5788160, size_px=256)
    sc = acquire(tile, 2022, SourceConfig(), storage, scene_source=FakeSource())
    dp = extract_dpixels(sc, cloud_mask(sc, MaskConfig(), storage), DPixelConfig(), storage)
    torch.manual_seed(0)
    ck = root / "tiny.pt"
    save_checkpoint(build_checkpoint(TesseraModel(TINY)), ck)
    return dp, storage, ck


@pytest.mark.integration
def test_embed_from_an_s3_checkpoint_replaced_in_place(tile_dpixels, tmp_path, monkeypatch):
    """An s3:// checkpoint (storage options hold a dict) embeds; replaced at the same URI it
    gets a new content key and the new model is used, not a cached one."""
    from tests.s3support import MotoServer, s3fs_for

    pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-EMBEDTEST-0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "embed-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    dp, local, ck = tile_dpixels
    server = MotoServer().start()
    try:
        fs = s3fs_for(server.url)
        fs.mkdir("ckpts")
        fs.put_file(str(ck), "ckpts/model.pt")
        storage = local.model_copy(update={"s3_endpoint_url": server.url,
                                           "work_uri": str(tmp_path / "work")})
        ref = given_checkpoint("s3://ckpts/model.pt", ModelConfig(), storage)
        first = embed_tile(dp, ref, EmbeddingConfig(min_valid_s2=2), 0, storage)
        a = zarr.open_group(first.uri, mode="r")["embedding"][:]
        assert first.n_valid > 0 and np.isfinite(a).any()
        torch.manual_seed(1)
        spec = ModelSpec.model_validate(torch.load(ck, weights_only=False)["model_spec"])
        other = TesseraModel(spec)
        replaced = tmp_path / "other.pt"
        save_checkpoint(build_checkpoint(other), replaced)
        fs.put_file(str(replaced), "ckpts/model.pt")
        ref2 = given_checkpoint("s3://ckpts/model.pt", ModelConfig(), storage)
        assert ref2.key != ref.key
        second = embed_tile(dp, ref2, EmbeddingConfig(min_valid_s2=2), 0, storage)
        b = zarr.open_group(second.uri, mode="r")["embedding"][:]
        assert second.uri != first.uri and not np.array_equal(a, b, equal_nan=True)
    finally:
        server.stop()


def test_int8_precision_config_cache_key_and_attr(tile_dpixels):
    """embedding.precision: fp32 by default, int8-dynamic refused on CUDA, part of the embed
    cache key (toggling it re-embeds), recorded as the 'inference' attribute; the int8
    embeddings agree with fp32 to cosine >= 0.999 on every embedded pixel."""
    from pydantic import ValidationError

    assert EmbeddingConfig().precision == "fp32"
    with pytest.raises(ValidationError, match="precision"):
        EmbeddingConfig(precision="int8-dynamic", device="cuda")
    with pytest.raises(ValidationError, match="precision"):
        EmbeddingConfig(precision="int4")
    dp, storage, ck = tile_dpixels
    ckpt = given_checkpoint(str(ck), ModelConfig(), storage)
    cpu = EmbeddingConfig(device="cpu", min_valid_s2=2)
    q_cfg = cpu.model_copy(update={"precision": "int8-dynamic"})
    fp = embed_tile(dp, ckpt, cpu, 0, storage)
    q = embed_tile(dp, ckpt, q_cfg, 0, storage)
    assert q.key != fp.key and q.uri != fp.uri and q.n_valid == fp.n_valid > 0
    gq = zarr.open_group(q.uri, mode="r")
    assert gq.attrs["inference"] == "int8-dynamic"
    assert zarr.open_group(fp.uri, mode="r").attrs["inference"] == "fp32"
    a = zarr.open_group(fp.uri, mode="r")["embedding"][:].reshape(-1, 128)
    b = gq["embedding"][:].reshape(-1, 128)
    ok = np.isfinite(a).all(1)
    assert np.array_equal(ok, np.isfinite(b).all(1))
    cos = (a[ok] * b[ok]).sum(1) / np.linalg.norm(a[ok], axis=1) / np.linalg.norm(b[ok], axis=1)
    assert cos.min() >= 0.999


def test_stop_request_leaves_no_committed_embedding(tile_dpixels, tmp_path, monkeypatch):
    """A stop request mid-tile raises StopRequested and commits nothing; the next call
    embeds the tile in full, identical to an uninterrupted run."""
    import tasks.embed as embed_mod
    from tasks.errors import StopRequested
    from tasks.stop import clear_stop, request_stop
    from tasks.storage import done_uri

    dp, local, ck = tile_dpixels
    storage = local.model_copy(update={"work_uri": str(tmp_path / "work")})
    ref = given_checkpoint(str(ck), ModelConfig(), storage)
    cfg = EmbeddingConfig(batch_size=256, min_valid_s2=2)
    calls = []
    real = embed_mod.embed_pixels

    def stop_in_second_batch(*args, **kw):
        def before():
            calls.append(1)
            if len(calls) == 2:
                request_stop("test")
            kw_before()

        kw_before = kw["before_batch"]
        return real(*args, **{**kw, "before_batch": before})

    monkeypatch.setattr(embed_mod, "embed_pixels", stop_in_second_batch)
    try:
        with pytest.raises(StopRequested, match="tile"):
            embed_tile(dp, ref, cfg, 0, storage)
    finally:
        clear_stop()
    uri, _ = embed_mod.embedding_uri(dp, ref, cfg, 0, storage)
    assert len(calls) == 2 and not Path(done_uri(uri)).exists()
    monkeypatch.setattr(embed_mod, "embed_pixels", real)
    resumed = embed_tile(dp, ref, cfg, 0, storage)
    whole = embed_tile(dp, ref, cfg, 0, local)  # another work root: uninterrupted
    a = zarr.open_group(resumed.uri, mode="r")["embedding"][:]
    b = zarr.open_group(whole.uri, mode="r")["embedding"][:]
    assert np.array_equal(a, b, equal_nan=True) and resumed.n_valid == whole.n_valid


def test_embedding_carries_its_content_hash_and_is_stored_uncompressed(tile_dpixels):
    """The embed stage hashes what it produces (tasks/publish/digest.py), so publishing never
    hashes by reading the floats again: the attribute equals the hash of the stored array.
    The float intermediate is stored without a codec (publishing reads it ~4x faster)."""
    from tasks.publish.digest import ATTR, content_sha256

    dp, storage, ck = tile_dpixels
    ckpt = given_checkpoint(str(ck), ModelConfig(), storage)
    emb = embed_tile(dp, ckpt, EmbeddingConfig(device="cpu", min_valid_s2=2), 0, storage)
    g = zarr.open_group(emb.uri, mode="r")
    arr = g["embedding"]
    assert g.attrs[ATTR] == content_sha256(arr[:])
    assert not arr.compressors
