from __future__ import annotations

import numpy as np
import pytest

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


# ---- pinned output: the streaming quantiser writes what the full-array one wrote -------------


def _reference_quantise(e: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """The full-array implementation this module had before streaming (kept as the oracle)."""
    e = np.asarray(e, dtype=np.float32)
    nodata = np.isnan(e).any(axis=-1)
    e = np.where(nodata[..., None], np.float32(0), e)
    absmax = np.abs(e).max(axis=-1)
    if rule == "v1":
        s = np.maximum(absmax / np.float32(127), np.float32(1e-8))
    else:
        s = np.maximum(absmax, np.float32(1e-12)) / np.float32(127)
    q = np.clip(np.round(e / s[..., None]), -127, 127).astype(np.int8)
    q[nodata] = 0
    s = np.where(nodata, np.float32(np.nan), s).astype(np.float32)
    return q, s


def _portable(h: int, w: int, d: int, seed: int) -> np.ndarray:
    from tests.tasks.test_publish_bytes import portable_embedding

    return portable_embedding(h, w, d, seed)


def _digest(q: np.ndarray, s: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(q.tobytes() + s.tobytes()).hexdigest()[:16]


# Recorded from the full-array implementation (tessera_model/quantise.py at 3d5858e).
PINNED_QUANTISE = {
    ("v1", 128): "61a9fe47ffc6f21d",
    ("v2", 128): "b59e7e39519fe10b",
    ("v2", 64): "be3327efeb74b197",
    ("v2", 32): "e88b72d734673051",
    ("v2", 16): "e2caf96f74673dd5",
}


@pytest.mark.parametrize(("rule", "k"), list(PINNED_QUANTISE))
def test_quantised_bytes_are_pinned(rule: str, k: int) -> None:
    e = _portable(96, 97, 128, seed=7)[..., :k]  # slice first, then quantise (Matryoshka)
    q, s = quantise(e, rule=rule)  # type: ignore[arg-type]
    assert _digest(q, s) == PINNED_QUANTISE[(rule, k)]


@pytest.mark.parametrize("rule", ["v1", "v2"])
def test_out_buffers_are_filled_with_the_same_values(rule: str) -> None:
    """``out=``: a caller's reused buffers get exactly what new arrays would (prefix views
    of the input too), and wrong buffers are refused before anything is written."""
    rng = np.random.default_rng(5)
    e = rng.normal(size=(3, 700, 32)).astype(np.float32)
    e[0, 3] = np.nan
    want_q, want_s = quantise(e[..., :16], rule=rule)
    q = np.full((3, 700, 16), 99, np.int8)
    s = np.full((3, 700), -1, np.float32)
    got = quantise(e[..., :16], rule=rule, out=(q, s))
    assert got[0] is q and got[1] is s
    assert np.array_equal(q, want_q) and np.array_equal(s, want_s, equal_nan=True)
    with pytest.raises(ValueError, match="out"):
        quantise(e[..., :16], rule=rule, out=(q[:, :, :8], s))
    with pytest.raises(ValueError, match="out"):
        quantise(e[..., :16], rule=rule, out=(q.astype(np.int16), s))  # type: ignore[arg-type]
    big = np.zeros((3, 700, 32), np.int8)
    with pytest.raises(ValueError, match="out"):
        quantise(e[..., :16], rule=rule, out=(big[..., :16], s))  # not contiguous
