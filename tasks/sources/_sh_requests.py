"""Evalscripts, request splitting, response decoding and processing-unit arithmetic.

Pure functions (no HTTP): the Sentinel Hub source builds its requests from these, and the
local endpoint reads the same band lists, so both agree on what a response holds.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import tifffile

from tasks.errors import DataError
from tasks.sources.base import S1_BANDS, S2_BANDS

S2_INPUT_BANDS: tuple[str, ...] = (*S2_BANDS, "SCL", "dataMask")
"""Bands of one S2 response, in this order: the 10 bands in TESSERA order, SCL, dataMask."""
S1_INPUT_BANDS: tuple[str, ...] = (*S1_BANDS, "dataMask")
"""Bands of one S1 response: VV, VH (linear power), dataMask."""
S2_SCL = S2_INPUT_BANDS.index("SCL")
S2_MASK = S2_INPUT_BANDS.index("dataMask")
S1_MASK = S1_INPUT_BANDS.index("dataMask")


def _evalscript(bands: tuple[str, ...], units: str, sample_type: str) -> str:
    names = ", ".join(f'"{b}"' for b in bands)
    values = ", ".join(f"s.{b}" for b in bands)
    return (
        "//VERSION=3\n"
        "function setup() {\n"
        f'  return {{input: [{{bands: [{names}], units: "{units}"}}],\n'
        f'          output: {{bands: {len(bands)}, sampleType: "{sample_type}"}}}};\n'
        "}\n"
        f"function evaluatePixel(s) {{ return [{values}]; }}\n"
    )


S2_EVALSCRIPT = _evalscript(S2_INPUT_BANDS, "DN", "UINT16")
"""S2 L2A: 10 bands as digital numbers, SCL and dataMask, one UINT16 sample each."""
S1_EVALSCRIPT = _evalscript(S1_INPUT_BANDS, "LINEAR_POWER", "FLOAT32")
"""S1 GRD: VV and VH as linear power (backscatter coefficient per the processing options)."""


@dataclass(frozen=True)
class Window:
    """One Process request's part of a tile: pixel offsets and size (row, col, height, width)."""

    row: int
    col: int
    height: int
    width: int


def split_tile(size_px: int, max_px: int) -> list[Window]:
    """Split a square tile into request windows of at most ``max_px`` per side.

    Args:
        size_px: Tile side, pixels.
        max_px: Largest request side (Sentinel Hub: 2500).

    Returns:
        Windows in row-major order covering the tile exactly once; sides differ by <= 1 px.
    """
    n = math.ceil(size_px / max_px)
    edges = [round(i * size_px / n) for i in range(n + 1)]
    return [
        Window(r0, c0, r1 - r0, c1 - c0)
        for r0, r1 in zip(edges[:-1], edges[1:], strict=True)
        for c0, c1 in zip(edges[:-1], edges[1:], strict=True)
    ]


PU_MIN_PER_REQUEST = 0.005
"""Sentinel Hub bills at least this many processing units per request."""


def request_pu(width: int, height: int, n_bands: int, bits: int, orthorectify: bool = False) -> float:
    """Processing units of one Process request (Sentinel Hub's published rule).

    1 PU = 512 x 512 px x 3 bands x 1 sample at <= 16 bit; 32-bit output counts twice;
    orthorectified S1 counts twice (Sentinel Hub PU docs (?)); at least 0.005 PU.
    """
    pu = (width * height) / (512 * 512) * (n_bands / 3) * (2 if bits > 16 else 1)
    if orthorectify:
        pu *= 2
    return max(pu, PU_MIN_PER_REQUEST)


def tile_pu(size_px: int, max_px: int, n_s2: int, n_s1: int, orthorectify: bool) -> float:
    """Processing units to fetch one tile: ``n_s2`` S2 and ``n_s1`` S1 dates (both orbits)."""
    wins = split_tile(size_px, max_px)
    s2 = sum(request_pu(w.width, w.height, len(S2_INPUT_BANDS), 16) for w in wins)
    s1 = sum(request_pu(w.width, w.height, len(S1_INPUT_BANDS), 32, orthorectify) for w in wins)
    return n_s2 * s2 + n_s1 * s1


def decode_tiff(body: bytes, height: int, width: int, n_bands: int, dtype: str) -> np.ndarray:
    """Decode a Process API TIFF body into (H, W, C), checking shape and dtype.

    Raises:
        DataError: The body is not a TIFF of the expected shape and dtype (truncated or
            corrupt bodies included).
    """
    try:
        arr = tifffile.imread(io.BytesIO(body))
    except Exception as exc:  # tifffile raises several types on malformed input
        raise DataError(
            f"Expected a TIFF body. Got {len(body)} bytes that do not decode "
            f"({type(exc).__name__})."
        ) from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape != (height, width, n_bands) or arr.dtype != np.dtype(dtype):
        raise DataError(
            f"Expected a {dtype} TIFF of shape {(height, width, n_bands)}. "
            f"Got {arr.dtype} {arr.shape}."
        )
    return arr
