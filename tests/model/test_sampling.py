from __future__ import annotations

import numpy as np
import pytest

from tessera_model import InputShapeError, sample_indices


def _data(n: int = 200, t: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = rng.random((n, t)) < 0.5
    ids = rng.integers(0, 2**63, n).astype(np.uint64)
    keys = np.arange(t, dtype=np.int64) * 3 + 5
    return valid, ids, keys


def test_reproducible_and_seed_dependent() -> None:
    valid, ids, keys = _data()
    a = sample_indices(valid, 8, ids, 42, 0, keys)
    np.testing.assert_array_equal(a, sample_indices(valid, 8, ids, 42, 0, keys))
    assert (a != sample_indices(valid, 8, ids, 43, 0, keys)).any()
    assert (a != sample_indices(valid, 8, ids, 42, 1, keys)).any()
    assert a.dtype == np.int64 and a.shape == (200, 8)


def test_independent_of_batch_composition_and_order() -> None:
    valid, ids, keys = _data()
    full = sample_indices(valid, 8, ids, 7, 0, keys)
    sub = np.random.default_rng(1).permutation(200)[:37]
    part = sample_indices(valid[sub], 8, ids[sub], 7, 0, keys)
    np.testing.assert_array_equal(part, full[sub])
    one = sample_indices(valid[5:6], 8, ids[5:6], 7, 0, keys)
    np.testing.assert_array_equal(one, full[5:6])


def test_per_pixel_step_keys() -> None:
    valid, ids, keys = _data()
    a = sample_indices(valid, 8, ids, 7, 0, keys)
    b = sample_indices(valid, 8, ids, 7, 0, np.broadcast_to(keys, valid.shape))
    np.testing.assert_array_equal(a, b)


def test_only_valid_sorted_distinct_when_enough() -> None:
    valid, ids, keys = _data()
    idx = sample_indices(valid, 8, ids, 3, 0, keys)
    enough = valid.sum(1) >= 8
    assert enough.sum() > 50
    assert np.take_along_axis(valid, idx, 1)[valid.sum(1) > 0].all()
    assert (np.diff(idx, axis=1) >= 0).all()
    assert (np.diff(idx[enough], axis=1) > 0).all()  # without replacement


def test_with_replacement_when_few_valid() -> None:
    t = 5
    valid = np.zeros((300, t), bool)
    valid[:, [1, 3]] = True
    ids = np.arange(300, dtype=np.uint64)
    idx = sample_indices(valid, 10, ids, 0, 0, np.arange(t))
    assert set(np.unique(idx)) == {1, 3}
    assert (np.diff(idx, axis=1) >= 0).all()
    share = (idx == 1).mean()
    assert 0.45 < share < 0.55


def test_no_valid_gives_zero() -> None:
    valid = np.zeros((3, 6), bool)
    idx = sample_indices(valid, 4, np.arange(3, dtype=np.uint64), 0, 0, np.arange(6))
    np.testing.assert_array_equal(idx, 0)


def test_roughly_uniform_without_replacement() -> None:
    n, t, k = 20000, 10, 3
    valid = np.ones((n, t), bool)
    idx = sample_indices(valid, k, np.arange(n, dtype=np.uint64), 9, 0, np.arange(t))
    freq = np.bincount(idx.ravel(), minlength=t) / (n * k)
    np.testing.assert_allclose(freq, 1 / t, atol=0.006)


def test_bad_shapes_raise() -> None:
    with pytest.raises(InputShapeError, match="step_keys"):
        sample_indices(np.ones((2, 4), bool), 2, np.arange(2, dtype=np.uint64), 0, 0, np.arange(3))
