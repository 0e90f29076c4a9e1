"""Per-pixel symmetric int8 quantisation of embeddings (the published TESSERA product).

``s = max|e| / 127`` (clamped to >= 1e-8), ``q = clamp(round(e / s), -127, 127)``;
dequantise ``e ~= q * s``. Rows containing NaN (no data) give ``q = 0`` and ``s = NaN``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

QMAX = 127
MIN_SCALE = 1e-8


def quantise(
    embeddings: npt.NDArray[np.floating],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Quantise embeddings per pixel.

    Args:
        embeddings: (..., D) float array.

    Returns:
        ``(q, s)``: q int8 (..., D), s float32 (...); NaN rows give q = 0, s = NaN.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    nodata = np.isnan(e).any(axis=-1)
    e = np.where(nodata[..., None], np.float32(0), e)
    s = np.maximum(np.abs(e).max(axis=-1) / np.float32(QMAX), np.float32(MIN_SCALE))
    q = np.clip(np.round(e / s[..., None]), -QMAX, QMAX).astype(np.int8)
    q[nodata] = 0
    s = np.where(nodata, np.float32(np.nan), s).astype(np.float32)
    return q, s


def dequantise(
    q: npt.NDArray[np.int8], scales: npt.NDArray[np.floating]
) -> npt.NDArray[np.float32]:
    """Reconstruct ``q * s``.

    Args:
        q: (..., D) int8.
        scales: (...) per-pixel scale, or (..., D) (legacy tiles); non-finite scales give NaN.

    Returns:
        (..., D) float32.
    """
    s = np.asarray(scales, dtype=np.float32)
    if s.shape != q.shape:
        s = s[..., None]
    s = np.where(np.isfinite(s), s, np.float32(np.nan))
    return (q.astype(np.float32) * s).astype(np.float32)
