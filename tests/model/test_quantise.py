from __future__ import annotations

import numpy as np

from tessera_model import dequantise, quantise


def test_hand_values() -> None:
    e = np.array([[1.27, -0.635, 0.0, 0.006]], np.float32)
    q, s = quantise(e)
    np.testing.assert_allclose(s, [0.01], rtol=1e-6)
    np.testing.assert_array_equal(q, [[127, -64, 0, 1]])  # -63.5 rounds half to even


def test_error_bound_and_cosine() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(500, 128)).astype(np.float32)
    q, s = quantise(e)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (500,)
    d = dequantise(q, s)
    assert (np.abs(e - d) <= s[:, None] / 2 + 1e-7).all()
    cos = (e * d).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(d, axis=1)
    assert cos.min() >= 0.9999


def test_zero_row_uses_min_scale() -> None:
    q, s = quantise(np.zeros((1, 4), np.float32))
    np.testing.assert_array_equal(q, 0)
    assert s[0] == np.float32(1e-8)


def test_nodata_rows() -> None:
    e = np.ones((3, 4), np.float32)
    e[1, 2] = np.nan
    q, s = quantise(e)
    np.testing.assert_array_equal(q[1], 0)
    assert np.isnan(s[1]) and np.isfinite(s[[0, 2]]).all()
    d = dequantise(q, s)
    assert np.isnan(d[1]).all() and np.isfinite(d[0]).all()


def test_legacy_per_band_scales() -> None:
    q = np.array([[10, -20]], np.int8)
    np.testing.assert_allclose(dequantise(q, np.array([[0.5, 0.25]], np.float32)), [[5.0, -5.0]])
