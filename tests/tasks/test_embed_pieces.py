"""The embed and d-pixel stages work a tile in pieces: same bytes whatever the pieces, and a
tile's working set stays a fraction of the tile (the build's peak memory does not grow with
the tiles in flight; BENCHMARKS.md "Scale")."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import zarr

import tasks.embed as embed_mod
from tasks.acquire import acquire
from tasks.config import (
    DPixelConfig,
    EmbeddingConfig,
    MaskConfig,
    ModelConfig,
    SourceConfig,
    StorageConfig,
)
from tasks.dpixels import extract_dpixels, remove_offset
from tasks.grid import Tile
from tasks.mask import cloud_mask
from tasks.publish.digest import ATTR, content_sha256
from tasks.sources.base import S1Stack, S2Stack
from tasks.train import given_checkpoint
from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint
from tessera_model.constants import encode_s1

TILE = Tile(zone=31, south=False, x0=296960, y0=5788160, size_px=256)
TINY = dict(latent_dim=128, d_model=16, n_layers=1, n_heads=2, ffn_dim=32, dropout=0.0,
            projector_dim=32, projector_layers=1, sample_steps=8)  # fmt: skip


class VariedSource:
    """Pixels that differ: hashed DN, scattered clouds, S1 gaps, an all-zero S2 patch, a patch
    with no observation at all; ``sparse``: only a few pixels have any observation."""

    name = "varied"

    def __init__(self, n_s2: int = 9, n_s1: int = 3, sparse: bool = False) -> None:
        self.n_s2, self.n_s1, self.sparse = n_s2, n_s1, sparse

    def s2_dates(self, tile: Tile, year: int) -> np.ndarray:
        return np.datetime64(f"{year}-01-03") + np.arange(self.n_s2) * 11

    def s1_dates(self, tile: Tile, year: int, orbit) -> np.ndarray:  # noqa: ANN001
        return np.datetime64(f"{year}-01-0{5 if orbit == 'ascending' else 6}") + np.arange(self.n_s1) * 12

    @staticmethod
    def _hash(t: int, shape: tuple[int, ...], salt: int) -> np.ndarray:
        i = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
        return (i * np.uint64(2654435761) + np.uint64(t * 97 + salt) * np.uint64(40503)) % np.uint64(9973)

    def read_s2(self, tile: Tile, dates: np.ndarray) -> S2Stack:
        h = w = tile.size_px
        all_dates = list(self.s2_dates(tile, int(str(dates[0])[:4])))
        ts = [all_dates.index(d) for d in dates]
        offset = np.array([1000 if t % 2 else 0 for t in ts], np.int16)
        bands = np.stack([(self._hash(t, (h, w, 10), 1) % 4000 + 1 + o).astype(np.uint16)
                          for t, o in zip(ts, offset, strict=True)])
        bands[:, 100:110, 30:40] = 0  # all-zero S2 (valid SCL): skipped by the v1.0 rule
        scl = np.stack([np.where(self._hash(t, (h, w), 2) % 5 == 0, 9, 4).astype(np.uint8)
                        for t in ts])
        scl[:, 200:210, 50:60] = 9  # never clear
        if self.sparse:
            scl[:, (np.arange(h) % 16) != 3] = 9
        return S2Stack(dates=np.asarray(dates), bands=bands, scl=scl, offset=offset)

    def read_s1(self, tile: Tile, dates: np.ndarray, orbit) -> S1Stack:  # noqa: ANN001
        h = w = tile.size_px
        vals = np.stack([(self._hash(i, (h, w, 2), 3 + len(orbit)) % 1000 + 1).astype(np.float32)
                         / np.float32(3000.0) for i in range(len(dates))])
        vals[:, (self._hash(0, (h, w), 5) % 7 == 0)] = 0.0  # S1 gaps
        vals[:, 200:210, 50:60] = 0.0
        if self.sparse:
            vals[:, (np.arange(h) % 16) != 3] = 0.0
        return S1Stack(dates=np.asarray(dates), values=vals)


def _dpixels(root, src, chunk_px: int):
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    sc = acquire(TILE, 2023, SourceConfig(), storage, scene_source=src)
    mk = cloud_mask(sc, MaskConfig(), storage)
    return sc, mk, extract_dpixels(sc, mk, DPixelConfig(chunk_px=chunk_px), storage), storage


def _checkpoint(path, family: str) -> str:
    torch.manual_seed(0)
    if family == "v1.0":
        model = TesseraModel(ModelSpec(version="tiny-pieces", **TINY))
    else:
        model = TesseraModel(ModelSpec(version="tiny-pieces-v2", family="v2", normalisation="v2",
                                       **TINY), with_projector=False)
    save_checkpoint(build_checkpoint(model), path)
    return str(path)


@pytest.mark.parametrize("family", ["v1.0", "v2"])
def test_embedding_is_the_same_whatever_the_pieces(tmp_path, monkeypatch, family):
    """One 256-px piece (d-pixel chunks of 256: the whole tile in one call), 64-row strips
    (chunks of 64) and 8-row strips (chunks of 8, least rows 8) give the same bytes, the same
    counts and a content hash equal to the stored array's."""
    src = VariedSource(sparse=family == "v2")  # v2 tiny: fewer pixels, the same rules
    ckpt_path = _checkpoint(tmp_path / "m.pt", family)
    got = {}
    for chunk, least in ((256, 64), (64, 64), (8, 8)):
        monkeypatch.setattr(embed_mod, "STRIP_ROWS", least)
        embed_mod._MODELS.clear()
        _, _, dp, storage = _dpixels(tmp_path / f"c{chunk}", src, chunk)
        preset = "small" if family == "v1.0" else "v2-nano"  # (family checked)
        ck = given_checkpoint(ckpt_path, ModelConfig(preset=preset), storage)
        ref = embed_mod.embed_tile(dp, ck, EmbeddingConfig(device="cpu"), 7, storage)
        g = zarr.open_group(ref.uri, mode="r")
        e = g["embedding"][:]
        assert g.attrs[ATTR] == content_sha256(e)
        got[chunk] = (e, ref.n_valid, g.attrs[ATTR])
    e256, n256, h256 = got[256]
    valid = np.isfinite(e256).all(-1)
    assert 0 < n256 == valid.sum() < 256 * 256
    assert not valid[200:210, 50:60].any()  # no observation at all
    if family == "v1.0":
        assert not valid[100:110, 30:40].any()  # all-zero S2
    for chunk in (64, 8):
        e, n, h = got[chunk]
        assert n == n256 and h == h256
        assert e.tobytes() == e256.tobytes()


def test_embed_never_holds_a_whole_tile(tmp_path):
    """The stage's traced peak (numpy and Zarr buffers) for a 256-px tile of 24 dates: 1.6
    times the tile's float32 embedding (32 MB) in 64-row strips, 4.6 times as one 256-px block
    (its inputs, their gathered copies, the model's output and the block's NaN-filled copy)."""
    _, _, dp, storage = _dpixels(tmp_path, VariedSource(n_s2=24, n_s1=6), 64)
    ck = given_checkpoint(_checkpoint(tmp_path / "m.pt", "v1.0"), ModelConfig(), storage)
    embed_mod._MODELS.get(ck, "cpu", storage)  # the model load is not the tile's working set
    tracemalloc.start()
    try:
        embed_mod.embed_tile(dp, ck, EmbeddingConfig(device="cpu"), 0, storage)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = 256 * 256 * 128 * 4
    assert peak < 2.5 * whole, f"traced peak {peak / 2**20:.1f} MB"


def test_dpixels_same_arrays_and_bounded_working_set(tmp_path):
    """The d-pixel arrays are exactly the scenes with the offset removed (kept dates) and S1
    encoded, and the stage's traced peak stays under twice the block's S2 (T x 256 x 256 x 10
    uint16; 1.5 times measured): the offset removed in place, S1 encoded a date at a time,
    output written a chunk row at a time. It was 3.1 times the block (a full-size maximum and
    difference, float64 copies of S1, Zarr's copies of every output chunk at once)."""
    src = VariedSource(n_s2=40, n_s1=20)
    storage = StorageConfig(output_uri=str(tmp_path / "out"), work_uri=str(tmp_path / "work"))
    sc = acquire(TILE, 2023, SourceConfig(), storage, scene_source=src)
    mk = cloud_mask(sc, MaskConfig(), storage)
    tracemalloc.start()
    try:
        dp = extract_dpixels(sc, mk, DPixelConfig(chunk_px=64), storage)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    s, m, g = (zarr.open_group(u, mode="r") for u in (sc.uri, mk.uri, dp.uri))
    keep = np.flatnonzero(m["keep"][:])
    assert keep.size == 40 and g["bands"].chunks == (40, 64, 64, 10)
    want = remove_offset(s["s2_bands"][:][keep], s["s2_offset"][:][keep])
    assert g["bands"][:].tobytes() == want.tobytes()
    assert g["masks"][:].tobytes() == m["valid"][:][keep].tobytes()
    for o in ("ascending", "descending"):
        assert g[f"sar_{o}"][:].tobytes() == encode_s1(s[f"s1_{o}"][:]).tobytes()
    block = 40 * 256 * 256 * 10 * 2
    assert peak < 2 * block, f"traced peak {peak / 2**20:.1f} MB, block {block / 2**20:.0f} MB"


def test_remove_offset_in_place():
    dn = np.array([[1500, 900], [1500, 900]], np.uint16)[:, None, :]
    want = remove_offset(dn.copy(), np.array([1000, 0]))
    out = remove_offset(dn, np.array([1000, 0]), out=dn)
    assert out is dn and dn.tobytes() == want.tobytes()
