"""Deterministic observation selection of TESSERA v1.1 and v2: bins, padding, subsampling.

Per pixel and stream (S2; merged S1 ascending-then-descending), with n valid steps listed in
input order, the stream becomes a sequence of exactly B tokens, B the pixel's *bin*. Facts:
``shared/reference/tessera-v2.md`` section 3 (v2) and section 6 (v1.1). The two versions pad
and subsample differently and bin n = 0 differently (trap 5 of section 8), so each has its
own functions here; nothing is shared between them but the final gather.

v2 (``bin_size_v2`` / ``positions_v2``):
    B = 0 for n = 0, else the smallest multiple of 8 >= n, capped at ``max_steps`` (256).
    n = B: 0..n-1. n > B: ``floor(i * ((n-1)/(B-1)))`` for i < B-1 (float64), then n-1 (NumPy's
    integer ``linspace``). n < B: 0..n-1, then r = B - n extras: the middle element
    (offset ``len // 2``) of each of ``array_split(0..n-1, r)`` if r <= n, else ``i mod n``.
v1.1 (``bin_size_v11`` / ``positions_v11``):
    B = the smallest multiple of 8 >= n (n = 0 gives 8), capped at 256.
    n = B: identity. n > B: the middle element of each of ``array_split(0..n-1, B)``.
    n < B: 0..n-1, then e = B - n extras ``clip(rint(k * ((n-1)/(e+1))), 0, n-1)``, k = 1..e
    (float64, round half to even).

An empty stream (n = 0) is one all-zero token in v2 and eight in v1.1; both give the same
result (the pooled vector of identical tokens is the token's encoding).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

from tessera_model.errors import InputShapeError

BIN_STEP = 8
"""Bins are multiples of 8 observations (tessera-v2.md sections 3 and 6)."""


def _round_up(n: npt.NDArray[np.int64], max_steps: int) -> npt.NDArray[np.int64]:
    return np.minimum(-(-n // BIN_STEP) * BIN_STEP, max_steps)


def bin_size_v2(n_valid: npt.ArrayLike, max_steps: int = 256) -> npt.NDArray[np.int64]:
    """v2 bin per pixel: 0 for no valid step, else n rounded up to 8, at most ``max_steps``.

    Args:
        n_valid: (N,) valid-step counts.

    Returns:
        (N,) int64 bins.
    """
    n = np.asarray(n_valid, dtype=np.int64)
    return np.where(n <= 0, 0, _round_up(n, max_steps))


def bin_size_v11(n_valid: npt.ArrayLike, max_steps: int = 256) -> npt.NDArray[np.int64]:
    """v1.1 bin per pixel: n rounded up to 8 (n = 0 gives 8), at most ``max_steps``.

    Args:
        n_valid: (N,) valid-step counts.

    Returns:
        (N,) int64 bins.
    """
    n = np.asarray(n_valid, dtype=np.int64)
    return _round_up(np.maximum(n, 1), max_steps)


def _middles(n: int, parts: int) -> npt.NDArray[np.int64]:
    """Middle element of each of ``np.array_split(arange(n), parts)`` (first n % parts longer)."""
    size, extra = divmod(n, parts)
    lengths = np.full(parts, size, dtype=np.int64)
    lengths[:extra] += 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts + lengths // 2


@lru_cache(maxsize=4096)
def positions_v2(n: int, b: int) -> npt.NDArray[np.int64]:
    """v2 positions (B,) into a pixel's list of n >= 1 valid steps (module docstring)."""
    if n < 1 or b < 1:
        raise ValueError(f"Expected n >= 1 and b >= 1. Got n={n}, b={b}.")
    if n >= b:
        if n == b:
            return np.arange(n, dtype=np.int64)
        step = (n - 1) / (b - 1)
        pos = np.floor(np.arange(b, dtype=np.float64) * step).astype(np.int64)
        pos[-1] = n - 1
        return pos
    r = b - n
    fill = _middles(n, r) if r <= n else np.arange(r, dtype=np.int64) % n
    return np.concatenate([np.arange(n, dtype=np.int64), fill])


@lru_cache(maxsize=4096)
def positions_v11(n: int, b: int) -> npt.NDArray[np.int64]:
    """v1.1 positions (B,) into a pixel's list of n >= 1 valid steps (module docstring)."""
    if n < 1 or b < 1:
        raise ValueError(f"Expected n >= 1 and b >= 1. Got n={n}, b={b}.")
    if n == b:
        return np.arange(n, dtype=np.int64)
    if n > b:
        return _middles(n, b)
    e = b - n
    anchors = np.arange(1, e + 1, dtype=np.float64) * ((n - 1) / (e + 1))
    extras = np.clip(np.rint(anchors).astype(np.int64), 0, n - 1)
    return np.concatenate([np.arange(n, dtype=np.int64), extras])


def gather_positions(valid: npt.NDArray[np.bool_], b: int, family: str) -> npt.NDArray[np.int64]:
    """Time indices (G, B) of the tokens of pixels that share one bin ``b``.

    Loops over the distinct valid counts of the group (at most 8, or the few counts above
    256), never over pixels. Rows with no valid step get index 0 (the caller feeds a zero
    token instead).

    Args:
        valid: (G, T) bool valid steps of the group's pixels, in input order.
        b: the group's bin (>= 1).
        family: ``"v1.1"`` or ``"v2"`` (selects the rule).

    Returns:
        (G, b) int64 indices into T.
    """
    if valid.ndim != 2:
        raise InputShapeError(f"Expected valid of shape (G, T). Got {valid.shape}.")
    rule = {"v1.1": positions_v11, "v2": positions_v2}.get(family)
    if rule is None:
        raise ValueError(f"Expected family 'v1.1' or 'v2'. Got {family!r}.")
    g = valid.shape[0]
    out = np.zeros((g, b), dtype=np.int64)
    if g == 0 or valid.shape[1] == 0:
        return out
    n = valid.sum(axis=1)
    order = np.argsort(~valid, axis=1, kind="stable")  # valid steps first, in input order
    for count in np.unique(n):
        if count == 0:
            continue
        rows = np.flatnonzero(n == count)
        out[rows] = order[rows][:, rule(int(count), b)]
    return out
