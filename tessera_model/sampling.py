"""Seeded, per-pixel temporal sampling without per-pixel Python loops.

All randomness comes from a counter-based hash of ``(seed, stream, pixel_id, counter)``,
where the counter is a timestep key (sampling without replacement) or a draw number (with
replacement). A pixel's sample therefore depends only on its own id and valid mask, never
on the batch it is processed in, its position in it, or the number of workers.

The hash is SplitMix64's finaliser (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
number generators"), chained over the inputs: ``h <- mix64(h ^ mix64(v + GOLDEN))``. It is
computed in numpy ``uint64``, whose array arithmetic wraps modulo 2**64 like the C original
(overflow is the intended behaviour, so overflow warnings are silenced).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tessera_model.errors import InputShapeError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
# Domain-separation tags for the two counters hashed after the pixel id.
_DOMAIN_STEP = 1
_DOMAIN_DRAW = 2


def _mix64(z: npt.NDArray[np.uint64], inplace: bool = False) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser (a bijection on uint64), elementwise.

    ``inplace``: overwrite ``z`` (a uint64 array the caller owns) instead of allocating a
    temporary per operation (the same values).
    """
    z = np.asarray(z, dtype=np.uint64)
    if not inplace or z.ndim == 0:
        z = z.copy()
    tmp = np.empty_like(z)
    with np.errstate(over="ignore"):
        z ^= np.right_shift(z, np.uint64(30), out=tmp)
        z *= _M1
        z ^= np.right_shift(z, np.uint64(27), out=tmp)
        z *= _M2
        z ^= np.right_shift(z, np.uint64(31), out=tmp)
    return z


def _absorb(h: npt.NDArray[np.uint64], v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Chain one more 64-bit input ``v`` into the hash state ``h`` (broadcasting)."""
    with np.errstate(over="ignore"):
        return _mix64(np.bitwise_xor(h, _mix64(v + _GOLDEN, inplace=True)), inplace=True)


def _u64(value: int) -> npt.NDArray[np.uint64]:
    return np.asarray(value & _MASK64, dtype=np.uint64)


def hash_keys(
    seed: int, stream: int, pixel_ids: npt.NDArray[np.uint64], domain: int, counters: npt.NDArray
) -> npt.NDArray[np.uint64]:
    """Hash ``(seed, stream, pixel_id, domain, counter)`` to uint64.

    Args:
        seed: any Python int (taken modulo 2**64).
        stream: independent stream number (e.g. 0 = S2, 1 = S1).
        pixel_ids: (N,) uint64.
        domain: counter kind tag.
        counters: (T,) or (N, T) integers (int64 values are reinterpreted as uint64).

    Returns:
        (N, T) uint64 keys.
    """
    base = _absorb(_absorb(_u64(seed), _u64(stream)), pixel_ids.astype(np.uint64)[:, None])
    base = _absorb(base, _u64(domain))
    c = np.ascontiguousarray(counters, dtype=np.int64).view(np.uint64)
    if c.ndim == 1:
        c = c[None, :]
    return _absorb(base, c)


def sample_indices(
    valid: npt.NDArray[np.bool_],
    k: int,
    pixel_ids: npt.NDArray[np.uint64],
    seed: int,
    stream: int,
    step_keys: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Pick ``k`` valid timesteps per pixel, reproducibly and independently of the batch.

    - ``n_valid >= k``: ``k`` distinct valid steps, the ones with the smallest hash keys
      ``hash(seed, stream, pixel_id, step_key)`` (uniform without replacement).
    - ``0 < n_valid < k``: ``k`` uniform draws with replacement from the valid steps, draw
      ``j`` from ``hash(seed, stream, pixel_id, j)``.
    - ``n_valid == 0``: all indices 0; the caller must mask such pixels.

    Chosen indices are sorted by time (ascending index) in every case.

    Args:
        valid: (N, T) bool, True where the timestep is usable.
        k: number of steps to draw (>= 1).
        pixel_ids: (N,) uint64 stable pixel identifiers.
        seed: run seed.
        stream: stream number separating independent uses (modality, view, epoch).
        step_keys: (T,) or (N, T) int64 stable keys of the timesteps (e.g. day of year), so a
            step keeps its key when the time axis is cropped or reordered.

    Returns:
        (N, k) int64 indices into the T axis.
    """
    valid = np.asarray(valid, dtype=bool)
    if valid.ndim != 2:
        raise InputShapeError(f"Expected valid of shape (N, T). Got {valid.shape}.")
    n, t = valid.shape
    pixel_ids = np.asarray(pixel_ids)
    if pixel_ids.shape != (n,):
        raise InputShapeError(f"Expected pixel_ids of shape ({n},). Got {pixel_ids.shape}.")
    step_keys = np.asarray(step_keys)
    if step_keys.shape not in ((t,), (n, t)):
        raise InputShapeError(
            f"Expected step_keys of shape ({t},) or ({n}, {t}). Got {step_keys.shape}."
        )
    if k < 1:
        raise ValueError(f"Expected k >= 1. Got {k}.")
    out = np.zeros((n, k), dtype=np.int64)
    if n == 0 or t == 0:
        return out
    n_valid = np.count_nonzero(valid, axis=1)

    full = n_valid >= k
    every = bool(full.all())  # the common case: no row selection (no copies)
    if every or full.any():
        keys = hash_keys(
            seed,
            stream,
            pixel_ids if every else pixel_ids[full],
            _DOMAIN_STEP,
            step_keys[full] if step_keys.ndim == 2 and not every else step_keys,
        )
        keys >>= np.uint64(1)  # valid keys < 2**63 ...
        np.putmask(keys, ~(valid if every else valid[full]), np.uint64(_MASK64))  # ... so
        # invalid steps are never chosen
        chosen = keys.argsort(axis=1)[:, :k] if t <= k else np.argpartition(keys, k - 1, 1)[:, :k]
        chosen.sort(axis=1)
        if every:
            return chosen.astype(np.int64, copy=False)
        out[full] = chosen

    partial = (n_valid > 0) & ~full
    if partial.any():
        sub_valid = valid[partial]
        # Valid step indices first, in time order.
        order = np.argsort(~sub_valid, axis=1, kind="stable")
        u = hash_keys(seed, stream, pixel_ids[partial], _DOMAIN_DRAW, np.arange(k))
        nv = n_valid[partial].astype(np.uint64)[:, None]
        # Lemire-style range reduction on the high 32 bits: exact, < n_valid.
        r = (((u >> np.uint64(32)) * nv) >> np.uint64(32)).astype(np.int64)
        out[partial] = np.sort(np.take_along_axis(order, r, axis=1), axis=1)
    return out
