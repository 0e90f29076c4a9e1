"""Fixed sin/cos day-of-year encoding (TESSERA v1.0; Vaswani et al. 2017 with DOY as position).

``div = exp(arange(0, d, 2) * -(ln 10000 / d))``; ``pe[..., 0::2] = sin(doy * div)``,
``pe[..., 1::2] = cos(doy * div)``; ``doy`` is the raw day of year (1..366) as float.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DOY_BASE = 10000.0


def doy_encoding(doy: Tensor, d_model: int) -> Tensor:
    """Encode raw days of year.

    Args:
        doy: (..., T) raw day of year, any numeric dtype (used as float32).
        d_model: even encoding width.

    Returns:
        (..., T, d_model) float32 encoding; no parameters.
    """
    if d_model % 2:
        raise ValueError(f"Expected an even d_model. Got {d_model}.")
    pos = doy.float().unsqueeze(-1)
    div = torch.exp(
        torch.arange(0, d_model, 2, device=doy.device, dtype=torch.float32)
        * -(math.log(DOY_BASE) / d_model)
    )
    angle = pos * div
    pe = torch.empty(*doy.shape, d_model, device=doy.device, dtype=torch.float32)
    pe[..., 0::2] = torch.sin(angle)
    pe[..., 1::2] = torch.cos(angle)
    return pe
