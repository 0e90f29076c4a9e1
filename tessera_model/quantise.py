"""Per-pixel symmetric int8 quantisation of embeddings (the published TESSERA product).

Two rules, named by the version that defines them:

- ``"v1"`` (v1.0 and v1.1; ``shared/reference/tessera.md`` section 4): ``s = max|e| / 127``
  clamped to >= 1e-8, ``q = clamp(round(e / s), -127, 127)``. (v1.1 clamps at -128, which no
  value reaches: ``|e / s| <= 127``.)
- ``"v2"`` (``tessera-v2.md`` section 4): ``a = max(max|e|, 1e-12)``, ``s = a / 127``,
  ``q = clip(round_half_even(e / s), -127, 127)``; applied to the K-dim prefix when a
  Matryoshka prefix is published (slice first, then quantise).

Dequantise ``e ~= q * s``. Rows containing NaN (no data) give ``q = 0`` and ``s = NaN`` under
both rules (the v2 reference has no no-data convention; ours marks no-data explicitly).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

QMAX = 127
MIN_SCALE = 1e-8
"""v1 rule: floor of the scale."""
MIN_ABSMAX_V2 = 1e-12
"""v2 rule: floor of the absolute maximum (not of the scale)."""
QuantRule = Literal["v1", "v2"]


def quantise(
    embeddings: npt.NDArray[np.floating], rule: QuantRule = "v1"
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Quantise embeddings per pixel.

    Args:
        embeddings: (..., D) float array.
        rule: ``"v1"`` or ``"v2"`` (module docstring).

    Returns:
        ``(q, s)``: q int8 (..., D), s float32 (...); NaN rows give q = 0, s = NaN.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    nodata = np.isnan(e).any(axis=-1)
    e = np.where(nodata[..., None], np.float32(0), e)
    absmax = np.abs(e).max(axis=-1)
    if rule == "v1":
        s = np.maximum(absmax / np.float32(QMAX), np.float32(MIN_SCALE))
    elif rule == "v2":
        s = np.maximum(absmax, np.float32(MIN_ABSMAX_V2)) / np.float32(QMAX)
    else:
        raise ValueError(f"Expected rule 'v1' or 'v2'. Got {rule!r}.")
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
