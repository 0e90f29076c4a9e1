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


STEP_ROWS = 512
"""Pixels quantised per step: 256 KiB of float32 scratch at 128 dims, so every pass over a
step stays in the core's cache and no full-size temporary is made."""


def quantise(
    embeddings: npt.NDArray[np.floating],
    rule: QuantRule = "v1",
    out: tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]] | None = None,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Quantise embeddings per pixel, streaming over :data:`STEP_ROWS` pixels at a time.

    The input is read in steps of pixels into one small float32 scratch buffer (absolute
    value, per-pixel maximum, division by the scale, round half to even, clip, cast), so
    memory beyond the outputs is a few hundred KiB whatever the size of the input, and the
    passes run from cache. The arithmetic is the rule's, operation for operation in float32,
    so the bytes equal those of the plain full-array formula (pinned by the tests).

    Args:
        embeddings: (..., D) float array (any float dtype; cast to float32 step by step). A
            strided view such as a Matryoshka prefix ``e[..., :K]`` is read in place when
            its pixels can be addressed as rows (the usual case); otherwise it is copied.
        rule: ``"v1"`` or ``"v2"`` (module docstring).
        out: ``(q, s)`` to fill instead of new arrays (a caller reusing its buffers):
            C-contiguous int8 (..., D) and float32 (...), the input's shape.

    Returns:
        ``(q, s)``: q int8 (..., D), s float32 (...); NaN rows give q = 0, s = NaN.

    Raises:
        ValueError: an unknown rule, or ``out`` of the wrong shape, dtype or layout.
    """
    if rule not in ("v1", "v2"):
        raise ValueError(f"Expected rule 'v1' or 'v2'. Got {rule!r}.")
    e = np.asarray(embeddings)
    if not np.issubdtype(e.dtype, np.floating):
        e = e.astype(np.float32)
    lead, d = e.shape[:-1], e.shape[-1]
    rows = _as_rows(e)
    n = rows.shape[0]
    if out is None:
        q, s = np.empty((n, d), np.int8), np.empty(n, np.float32)
    else:
        oq, os_ = out
        if (
            oq.shape != e.shape or os_.shape != lead or oq.dtype != np.int8
            or os_.dtype != np.float32 or not (oq.flags.c_contiguous and os_.flags.c_contiguous)
        ):
            raise ValueError(
                f"Expected out C-contiguous int8 {e.shape} and float32 {lead}. Got "
                f"{oq.dtype} {oq.shape} and {os_.dtype} {os_.shape}."
            )
        q, s = oq.reshape(n, d), os_.reshape(n)  # views of contiguous arrays
    step = max(1, min(STEP_ROWS, n))
    buf = np.empty((step, d), np.float32)
    for i in range(0, n, step):
        k = min(step, n - i)
        x, b, si, qi = rows[i : i + k], buf[:k], s[i : i + k], q[i : i + k]
        if x.dtype != np.float32:
            np.copyto(b, x, casting="same_kind")
            x = b.copy()  # the float32 values the rule works on (one step, not the input)
        _quantise_step(x, b, si, qi, rule)
    if out is not None:
        return out
    return q.reshape(*lead, d), s.reshape(lead)


def _as_rows(e: np.ndarray) -> np.ndarray:
    """(N, D) view of a (..., D) array without copying when its strides allow."""
    rows = e.view()
    try:
        rows.shape = (-1, e.shape[-1])  # raises instead of copying
    except AttributeError:
        rows = np.ascontiguousarray(e).reshape(-1, e.shape[-1])
    return rows


def _quantise_step(
    x: np.ndarray, b: np.ndarray, s: np.ndarray, q: np.ndarray, rule: QuantRule
) -> None:
    """One step: x (k, D) float32 in, scratch b (k, D), scales s (k,) and q (k, D) out."""
    # max |e| per pixel on the int32 bit patterns with the sign bit cleared: for
    # non-negative floats their order is the values' order (a NaN's pattern is above
    # inf's, so a no-data pixel still gets a NaN maximum), and numpy's integer row maximum
    # runs ~1.8x faster than its float one; the result is the same float32 value
    np.bitwise_and(x.view(np.int32), np.int32(0x7FFFFFFF), out=b.view(np.int32))
    np.max(b.view(np.int32), axis=1, out=s.view(np.int32))
    nodata = np.isnan(s)
    gaps = bool(nodata.any())
    if gaps:
        s[nodata] = 0
    if rule == "v1":
        np.divide(s, np.float32(QMAX), out=s)
        np.maximum(s, np.float32(MIN_SCALE), out=s)
    else:
        np.maximum(s, np.float32(MIN_ABSMAX_V2), out=s)
        np.divide(s, np.float32(QMAX), out=s)
    np.divide(x, s[:, None], out=b)
    np.rint(b, out=b)  # round half to even, as np.round
    np.clip(b, -QMAX, QMAX, out=b)
    if gaps:
        b[nodata] = 0
        s[nodata] = np.nan
    np.copyto(q, b, casting="unsafe")  # integral values in [-127, 127]: exact


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
