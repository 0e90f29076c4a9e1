"""Band orders, normalisation constants and the Sentinel-1 int16 encoding (TESSERA v1.0).

Provenance: the public TESSERA reference (github.com/ucam-eo/tessera, v1.0 inference and
d-pixel code) as recorded in the project's compatibility contract
(``shared/reference/tessera.md`` sections 1 and 3). The v1.0 weights depend on the band order
(not wavelength order) and on these exact means/stds, which are in d-pixel units: S2 L2A DN
with the baseline-04.00 +1000 offset removed, and S1 in the int16 dB encoding below.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

#: Sentinel-2 band order of the v1.0 model input (and of ``bands.npy``).
S2_BANDS: Final[tuple[str, ...]] = (
    "B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12",
)  # fmt: skip
#: Sentinel-1 band order (ascending and descending share it).
S1_BANDS: Final[tuple[str, ...]] = ("VV", "VH")

#: v1.0 S2 normalisation, per band in :data:`S2_BANDS` order (DN, offset removed).
S2_MEAN: Final[tuple[float, ...]] = (
    1711.09, 1308.85, 1546.45, 3010.13, 3106.51, 2068.30, 2685.08, 2931.59, 2514.69, 1899.49,
)  # fmt: skip
S2_STD: Final[tuple[float, ...]] = (
    1926.10, 1862.98, 1803.18, 1741.78, 1677.45, 1888.79, 1736.31, 1715.81, 1514.52, 1398.48,
)  # fmt: skip
#: v1.0 S1 normalisation, per band in :data:`S1_BANDS` order (int16 encoded units).
S1_MEAN: Final[tuple[float, ...]] = (5484.04, 3003.78)
S1_STD: Final[tuple[float, ...]] = (1871.23, 1726.07)

#: Baseline-04.00 Sentinel-2 DN offset; subtract it once, before normalisation.
S2_DN_OFFSET: Final[int] = 1000

#: S1 encoding: ``int16 = clip((20 * log10(x) + S1_DB_OFFSET) * S1_DB_SCALE, 0, 32767)``.
S1_DB_OFFSET: Final[float] = 50.0
S1_DB_SCALE: Final[float] = 200.0
S1_NODATA: Final[int] = 0


def encode_s1(linear: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Encode linear S1 backscatter as the reference int16 dB code.

    ``clip((20*log10(x) + 50) * 200, 0, 32767)``, truncated toward zero like the reference
    cast; ``x <= 0`` or NaN encode as 0 (no data).

    Args:
        linear: linear backscatter, any shape.

    Returns:
        int16 array of the same shape.
    """
    x = np.asarray(linear, dtype=np.float64)
    ok = np.isfinite(x) & (x > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        code = (20.0 * np.log10(np.where(ok, x, 1.0)) + S1_DB_OFFSET) * S1_DB_SCALE
    code = np.clip(code, 0, 32767)
    return np.where(ok, code, S1_NODATA).astype(np.int16)


def decode_s1(code: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Invert :func:`encode_s1` (up to the quantisation step); 0 (no data) decodes as NaN.

    Args:
        code: int16 codes, any shape.

    Returns:
        float32 linear backscatter of the same shape.
    """
    c = np.asarray(code).astype(np.float64)
    db = c / S1_DB_SCALE - S1_DB_OFFSET
    out = np.power(10.0, db / 20.0)
    return np.where(c == S1_NODATA, np.nan, out).astype(np.float32)


def normalisation_arrays(modality: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Return ``(mean, std)`` float32 arrays of shape (C,) for ``"s2"`` or ``"s1"``."""
    if modality == "s2":
        return np.asarray(S2_MEAN, np.float32), np.asarray(S2_STD, np.float32)
    if modality == "s1":
        return np.asarray(S1_MEAN, np.float32), np.asarray(S1_STD, np.float32)
    raise ValueError(f"Expected modality 's2' or 's1'. Got {modality!r}.")
