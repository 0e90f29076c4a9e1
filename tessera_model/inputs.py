"""Model input assembly shared by training and inference (one source of truth).

Gathers the sampled timesteps of each pixel, normalises them with the v1.0 constants and
appends the raw day of year as the last column, giving the ``(B, k, C + 1)`` backbone input.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from tessera_model.constants import normalisation_arrays
from tessera_model.errors import InputShapeError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gather_inputs(
    bands: npt.NDArray,
    doy: npt.NDArray,
    idx: npt.NDArray[np.int64],
    modality: str,
) -> npt.NDArray[np.float32]:
    """Build normalised backbone inputs from sampled timesteps.

    Args:
        bands: (B, T, C) d-pixel values (S2 DN with the offset removed, or S1 int16 codes).
        doy: (T,) or (B, T) day of year.
        idx: (B, k) sampled indices into T (from :func:`sample_indices`).
        modality: ``"s2"`` or ``"s1"`` (selects the normalisation constants).

    Returns:
        (B, k, C + 1) float32: normalised bands then the raw DOY.
    """
    mean, std = normalisation_arrays(modality)
    if bands.ndim != 3 or bands.shape[-1] != mean.shape[0]:
        raise InputShapeError(
            f"Expected {modality} bands of shape (B, T, {mean.shape[0]}). Got {bands.shape}."
        )
    b, k = idx.shape
    out = np.empty((b, k, mean.shape[0] + 1), dtype=np.float32)
    picked = np.take_along_axis(bands, idx[:, :, None], axis=1).astype(np.float32)
    out[..., :-1] = (picked - mean) / std
    doy = np.asarray(doy)
    out[..., -1] = doy[idx] if doy.ndim == 1 else np.take_along_axis(doy, idx, axis=1)
    return out
