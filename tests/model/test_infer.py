from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tessera_model import InputShapeError, ModelSpec, TesseraModel, embed_pixels

TilePixels = Any  # the tile_pixels fixture's dataclass (tests/model/conftest.py)


def _embed(model: TesseraModel, p: TilePixels, sl: slice | np.ndarray, bs: int, seed: int = 5):
    return embed_pixels(
        model, p.s2[sl], p.s2_valid[sl], p.s2_doy, p.s1[sl], p.s1_valid[sl], p.s1_doy,
        p.s1_keys, p.pixel_ids[sl], seed=seed, batch_size=bs, device="cpu",
    )  # fmt: skip


@pytest.fixture
def model(tiny_spec: ModelSpec) -> TesseraModel:
    torch.manual_seed(0)
    return TesseraModel(tiny_spec, with_projector=False)


def test_batch_size_and_split_invariance(model: TesseraModel, tile_pixels: TilePixels) -> None:
    """Bit-identical (not just close): published int8 bytes must not depend on batching."""
    ref = _embed(model, tile_pixels, slice(None), 512)
    assert ref.dtype == np.float32 and ref.shape == (40, 16)
    for bs in (1, 7):
        np.testing.assert_array_equal(_embed(model, tile_pixels, slice(None), bs), ref)
    first = _embed(model, tile_pixels, slice(0, 17), 7)
    second = _embed(model, tile_pixels, slice(17, None), 7)
    np.testing.assert_array_equal(np.concatenate([first, second]), ref)
    order = np.random.default_rng(0).permutation(40)
    np.testing.assert_array_equal(_embed(model, tile_pixels, order, 9), ref[order])


def test_nodata_rows_and_seed(model: TesseraModel, tile_pixels: TilePixels) -> None:
    out = _embed(model, tile_pixels, slice(None), 16)
    assert np.isnan(out[[0, 2]]).all()
    assert np.isfinite(out[[1] + list(range(3, 40))]).all()
    other = _embed(model, tile_pixels, slice(None), 16, seed=6)
    assert not np.allclose(other[3:], out[3:], atol=1e-4)


def test_pixel_result_depends_on_its_id(model: TesseraModel, tile_pixels: TilePixels) -> None:
    out = _embed(model, tile_pixels, slice(None), 16)
    tile_pixels.pixel_ids[3] += np.uint64(1)
    moved = _embed(model, tile_pixels, slice(None), 16)
    assert not np.allclose(moved[3], out[3], atol=1e-4)
    np.testing.assert_allclose(moved[4:], out[4:], atol=1e-5)


def test_bad_shape_raises(model: TesseraModel, tile_pixels: TilePixels) -> None:
    p = tile_pixels
    with pytest.raises(InputShapeError, match="s1_keys"):
        embed_pixels(model, p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy,
                     p.s1_keys[:-1], p.pixel_ids, seed=0, batch_size=8, device="cpu")  # fmt: skip


def test_auto_batch_and_prefetch_are_bit_identical(
    model: TesseraModel, tile_pixels: TilePixels
) -> None:
    ref = _embed(model, tile_pixels, slice(None), 7)
    np.testing.assert_array_equal(_embed(model, tile_pixels, slice(None), 0), ref)
    p = tile_pixels
    threaded = embed_pixels(
        model, p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy, p.s1_keys, p.pixel_ids,
        seed=5, batch_size=3, device="cpu", prefetch=True,
    )  # fmt: skip
    np.testing.assert_array_equal(threaded, ref)
    with pytest.raises(ValueError, match="batch_size >= 0"):
        _embed(model, tile_pixels, slice(None), -1)


def test_auto_batch_size_follows_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera_model import infer

    v1, small = ModelSpec.preset("v1"), ModelSpec.preset("small")
    assert infer.activation_bytes_per_pixel(v1) == 2 * 40 * (4096 + 8 * 512 + 4 * 40) * 4
    cpu_v1, cpu_small = infer.auto_batch_size(v1, "cpu"), infer.auto_batch_size(small, "cpu")
    assert cpu_v1 == 256 and cpu_small == 2048  # 1 GiB budget, rounded down to powers of 2
    # CUDA: a fraction of the free memory (mem_get_info faked: no GPU needed)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (8 << 30, 80 << 30))
    got = infer.auto_batch_size(v1, torch.device("cuda"))
    per_px = infer.activation_bytes_per_pixel(v1)
    assert got <= infer.CUDA_FREE_FRACTION * (8 << 30) / per_px < 2 * got
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (120 << 30, 140 << 30))
    assert infer.auto_batch_size(v1, torch.device("cuda")) == infer.AUTO_BATCH_MAX
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1 << 20, 80 << 30))
    assert infer.auto_batch_size(v1, torch.device("cuda")) == infer.AUTO_BATCH_MIN


def test_v1_reference_coverage_samples_all_steps_of_an_empty_stream(
    model: TesseraModel, tile_pixels: TilePixels
) -> None:
    """v1.0 reference: no valid S2 (or S1) -> sample from all its steps; none at all: no-data."""
    p = tile_pixels
    p.s1_valid[5] = False
    p.s2_valid[5] = False  # pixel 5: no observation at all
    args = (p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy, p.s1_keys, p.pixel_ids)
    strict = embed_pixels(model, *args, seed=5, batch_size=8, device="cpu")
    cover = embed_pixels(model, *args, seed=5, batch_size=8, device="cpu",
                         all_steps_fallback=True)  # fmt: skip
    assert np.isnan(strict[[0, 2, 5]]).all() and np.isnan(cover[5]).all()
    assert np.isfinite(cover[[0, 2]]).all()
    both = p.s2_valid.any(1) & p.s1_valid.any(1)
    np.testing.assert_array_equal(cover[both], strict[both])  # covered pixels unchanged
    s2v, s1v = p.s2_valid.copy(), p.s1_valid.copy()
    s2v[0], s1v[2] = True, True  # the fallback is exactly "every step is a candidate"
    forced = embed_pixels(model, p.s2, s2v, p.s2_doy, p.s1, s1v, p.s1_doy, p.s1_keys,
                          p.pixel_ids, seed=5, batch_size=8, device="cpu")  # fmt: skip
    np.testing.assert_array_equal(cover[[0, 2]], forced[[0, 2]])
