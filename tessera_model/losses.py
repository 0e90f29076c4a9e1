"""Training losses: Barlow Twins and the mixed-sample regulariser of TESSERA.

Barlow Twins (Zbontar et al. 2021): standardise each dimension over the batch,
``C = z1^T z2 / B``, ``L = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``.

Mix regulariser (Bandara et al. 2023, "Mixed Barlow Twins"), with
``x_m = alpha * x1 + (1 - alpha) * x2[pi]`` embedded as ``z_m``::

    L_mix = lambda_mix * lambda_BT * (
        ||C(z_m, z1) - [alpha C(z1, z1) + (1 - alpha) C(z2[pi], z1)]||_F^2
      + ||C(z_m, z2) - [alpha C(z1, z2) + (1 - alpha) C(z2[pi], z2)]||_F^2 )
"""

from __future__ import annotations

import torch
from torch import Tensor

STANDARDISE_EPS = 1e-5


def standardise(z: Tensor, eps: float = STANDARDISE_EPS) -> Tensor:
    """(B, D) -> (B, D): zero mean, unit (biased) variance per dimension over the batch.

    ``(z - mean) / sqrt(var + eps)``, as a non-affine BatchNorm in training mode.
    """
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: Tensor, z2: Tensor) -> Tensor:
    """(B, D), (B, D) -> (D, D) cross-correlation of the standardised inputs, ``z1n^T z2n / B``."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"Expected two (B, D) tensors of equal shape. Got {z1.shape}, {z2.shape}.")
    return standardise(z1).T @ standardise(z2) / z1.shape[0]


def _off_diagonal_sq_sum(c: Tensor) -> Tensor:
    return c.pow(2).sum() - torch.diagonal(c).pow(2).sum()


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 5e-3) -> Tensor:
    """Barlow Twins loss of two views' projections (B, D) -> scalar."""
    c = cross_correlation(z1, z2)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    return on_diag + lambd * _off_diagonal_sq_sum(c)


def mix_regulariser(
    z_mix: Tensor,
    z1: Tensor,
    z2: Tensor,
    perm: Tensor,
    alpha: float | Tensor,
    barlow_lambda: float = 5e-3,
    mix_lambda: float = 1.0,
) -> Tensor:
    """Mixed-sample regulariser (see the module docstring).

    Args:
        z_mix: (B, D) projections of ``alpha * x1 + (1 - alpha) * x2[perm]``.
        z1: (B, D) projections of view 1.
        z2: (B, D) projections of view 2.
        perm: (B,) permutation used to build the mix.
        alpha: mixing coefficient in [0, 1].
        barlow_lambda: the Barlow Twins off-diagonal weight (lambda_BT).
        mix_lambda: lambda_mix.

    Returns:
        scalar loss.
    """
    z2p = z2[perm]
    target1 = alpha * cross_correlation(z1, z1) + (1 - alpha) * cross_correlation(z2p, z1)
    target2 = alpha * cross_correlation(z1, z2) + (1 - alpha) * cross_correlation(z2p, z2)
    err1 = (cross_correlation(z_mix, z1) - target1).pow(2).sum()
    err2 = (cross_correlation(z_mix, z2) - target2).pow(2).sum()
    return mix_lambda * barlow_lambda * (err1 + err2)
