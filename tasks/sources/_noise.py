"""Counter-based hashing and lattice value noise at absolute coordinates (private).

Everything here is a pure function of integer keys and absolute coordinates, never of an
array's extent, so any window of the world computed alone agrees bit for bit with the same
window cut out of a larger computation. Only element-wise arithmetic is used on pixel arrays
(no reductions across pixels), which keeps results independent of the array shape.

References: splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014); value noise and fBm (Perlin 1985; Musgrave in Ebert et al.,
"Texturing and Modeling", 2003).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SEED0 = np.uint64(0x6A09E667F3BCC909)
_SH30, _SH27, _SH31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SH11, _SH16 = np.uint64(11), np.uint64(16)
_MASK16 = np.uint64(0xFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> _SH30)) * _MIX1
        z = (z ^ (z >> _SH27)) * _MIX2
        return z ^ (z >> _SH31)


def _as_u64(key: np.ndarray | int) -> np.ndarray:
    a = np.asarray(key)
    if a.dtype == np.uint64:
        return a
    return a.astype(np.int64).view(np.uint64)


@cache
def tag(name: str) -> int:
    """A stable 63-bit integer for a stream name (so streams never share keys)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def hash_keys(*keys: np.ndarray | int) -> np.ndarray:
    """Hash integer keys (broadcast together) to uint64; put scalar keys first for speed."""
    h = np.asarray(_SEED0)
    for k in keys:
        h = splitmix64(h ^ _as_u64(k))
    return h


def uniform(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from uint64 hashes (53 high bits)."""
    return (h >> _SH11).astype(np.float64) * (2.0**-53)


def uniform16(h: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..3) 16-bit lane of uint64 hashes as float32 in (0, 1)."""
    lane = (h >> np.uint64(16 * k)) & _MASK16
    return (lane.astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 65536.0)


def _smooth(f: np.ndarray) -> np.ndarray:
    return f * f * (3.0 - 2.0 * f)


def lattice_grid(
    x: np.ndarray,
    y: np.ndarray,
    spacing: float,
    nodes: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Smoothstep-bilinear interpolation of lattice values onto a pixel grid.

    Args:
        x: Absolute pixel-centre x (easting), metres, shape (W,).
        y: Absolute pixel-centre y (northing), metres, shape (H,).
        spacing: Lattice spacing, metres.
        nodes: ``nodes(ix (nx,), iy (ny,)) -> (ny, nx)`` values at integer lattice nodes.

    Returns:
        float32 (H, W). Each pixel depends only on its coordinates and the node values.
    """
    gx = x / spacing
    gy = y / spacing
    ix = np.floor(gx)
    iy = np.floor(gy)
    ux = _smooth(gx - ix)
    uy = _smooth(gy - iy).astype(np.float32)[:, None]
    ix = ix.astype(np.int64)
    iy = iy.astype(np.int64)
    lx = np.arange(ix.min(), ix.max() + 2)
    ly = np.arange(iy.min(), iy.max() + 2)
    v = np.asarray(nodes(lx, ly), dtype=np.float64)
    cx = ix - lx[0]
    rows = (v[:, cx] * (1.0 - ux) + v[:, cx + 1] * ux).astype(np.float32)  # (ny, W)
    cy = iy - ly[0]
    r0 = rows[cy]
    return r0 + (rows[cy + 1] - r0) * uy


def value_noise_grid(
    x: np.ndarray, y: np.ndarray, spacing: float, key: tuple[int, ...]
) -> np.ndarray:
    """Value noise in [0, 1) on a pixel grid, float32 (H, W); lattice values hashed from key."""
    return lattice_grid(
        x, y, spacing, lambda lx, ly: uniform(hash_keys(*key, lx[None, :], ly[:, None]))
    )


def fbm_grid(
    x: np.ndarray,
    y: np.ndarray,
    spacing: float,
    octaves: int,
    key: tuple[int, ...],
    gain: float = 0.5,
) -> np.ndarray:
    """Fractal sum of value-noise octaves (halving spacing), normalised to [0, 1], (H, W)."""
    total = np.zeros((y.size, x.size), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += np.float32(amp) * value_noise_grid(x, y, spacing / 2**o, (*key, o))
        norm += amp
        amp *= gain
    return total / np.float32(norm)


def value_noise_points(
    x: np.ndarray, y: np.ndarray, spacing: float, key: tuple[int, ...]
) -> np.ndarray:
    """Value noise in [0, 1) at scattered points (same field law as the grid version), float64."""
    gx = np.asarray(x, np.float64) / spacing
    gy = np.asarray(y, np.float64) / spacing
    ix = np.floor(gx)
    iy = np.floor(gy)
    ux = _smooth(gx - ix)
    uy = _smooth(gy - iy)
    ix = ix.astype(np.int64)
    iy = iy.astype(np.int64)

    def node(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return uniform(hash_keys(*key, i, j))

    top = node(ix, iy) * (1 - ux) + node(ix + 1, iy) * ux
    bot = node(ix, iy + 1) * (1 - ux) + node(ix + 1, iy + 1) * ux
    return top * (1 - uy) + bot * uy


def fbm_points(
    x: np.ndarray,
    y: np.ndarray,
    spacing: float,
    octaves: int,
    key: tuple[int, ...],
    gain: float = 0.5,
) -> np.ndarray:
    """Fractal value noise at scattered points, normalised to [0, 1], float64."""
    total = np.zeros(np.broadcast(x, y).shape)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * value_noise_points(x, y, spacing / 2**o, (*key, o))
        norm += amp
        amp *= gain
    return total / norm


@cache
def _fbm_quantiles(octaves: int, gain: float) -> np.ndarray:
    """Quantiles (1025 levels) of the fBm marginal, from a fixed sample of the field itself."""
    i = np.arange(200_000)
    h = hash_keys(tag("quantiles"), i)
    px = uniform(h) * 1000.0  # scattered over 1000 x 1000 base cells
    py = uniform(splitmix64(h)) * 1000.0
    v = fbm_points(px, py, 1.0, octaves, (tag("quantiles"),), gain)
    return np.quantile(v, np.linspace(0.0, 1.0, 1025))


def fbm_to_uniform(v: np.ndarray, octaves: int, gain: float = 0.5) -> np.ndarray:
    """Map fBm values to approximately uniform [0, 1] through the field's own marginal CDF."""
    q = _fbm_quantiles(octaves, gain)
    return np.interp(v, q, np.linspace(0.0, 1.0, q.size)).astype(np.float32)
