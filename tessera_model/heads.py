"""Fusion heads (``dim_reducer``): the pooled S2 and S1 vectors (B, 2d) to the embedding.

- v1.0 (``shared/reference/tessera.md`` section 1): ``Sequential(Linear(2d, L))``.
- v1.1 and v2 (``tessera-v2.md`` sections 1 and 6): ``Linear(2d, 4d) -> LayerNorm(4d) -> ReLU
  -> Dropout(0.2) -> Linear(4d, L)`` (state-dict indices 0, 1, 4); v2 adds a final
  ``LayerNorm(L)`` without weight or bias (index 5, no parameters). eps 1e-5 everywhere.

:func:`fusion_head_cpu` is the CPU inference form of the same head (training and autograd keep
the ``nn.Sequential``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tessera_model import cpu_kernels
from tessera_model.int8 import PackedWeight, QuantisedWeight, linear
from tessera_model.spec import ModelSpec

HEAD_DROPOUT = 0.2
"""Dropout of the v1.1/v2 MLP head (inert at inference)."""
HEAD_KEYS = ("head_0", "head_4")
""":func:`tessera_model.int8.cpu_weights` key suffixes (under ``dim_reducer.``) of the head's
first and last Linear (state-dict indices 0 and 4; the one Linear of v1.0 is ``head_0``)."""


def fusion_head(spec: ModelSpec) -> nn.Sequential:
    """Build the ``dim_reducer`` of ``spec.family``: (B, 2 d_model) -> (B, latent_dim)."""
    fused = 2 * spec.d_model
    if spec.family == "v1.0":
        return nn.Sequential(nn.Linear(fused, spec.latent_dim))
    layers: list[nn.Module] = [
        nn.Linear(fused, 2 * fused),
        nn.LayerNorm(2 * fused),
        nn.ReLU(),
        nn.Dropout(HEAD_DROPOUT),
        nn.Linear(2 * fused, spec.latent_dim),
    ]
    if spec.family == "v2":
        layers.append(nn.LayerNorm(spec.latent_dim, elementwise_affine=False))
    return nn.Sequential(*layers)


def head_linears(head: nn.Sequential) -> dict[str, nn.Linear]:
    """The head's Linears by :data:`HEAD_KEYS` suffix (v1.0: only ``head_0``)."""
    out = {HEAD_KEYS[0]: head[0]}
    if len(head) > 1:
        out[HEAD_KEYS[1]] = head[4]
    return out  # type: ignore[return-value]


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` of (B, n) float32 rows, in place through the compiled kernel where available."""
    if x.dtype == torch.float32 and x.is_contiguous() and cpu_kernels.available():
        return cpu_kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def fusion_head_cpu(
    head: nn.Sequential, x: Tensor,
    weights: dict[str, QuantisedWeight | PackedWeight] | None = None,
    prefix: str = "dim_reducer",
) -> Tensor:  # fmt: skip
    """CPU inference form of ``head(x)`` (eval mode, no autograd; same values to float32 rounding).

    The Linears run through :func:`tessera_model.int8.linear` (oneDNN with the packed weights
    of ``weights`` under ``<prefix>.head_0`` / ``<prefix>.head_4``, or ``addmm`` without
    them), the LayerNorms through :func:`tessera_model.cpu_kernels.layer_norm` in place where
    the kernels are available (else torch's), the ReLU in place; Dropout is skipped (inert in
    eval mode). Row ``m`` of the result depends only on row ``m`` of ``x`` for a given shape.

    Args:
        head: a :func:`fusion_head`.
        x: (B, 2 d_model) float32, the pooled S2 and S1 vectors side by side.
        weights: :func:`tessera_model.int8.cpu_weights` of the model (``None``: plain float32).
        prefix: the head's key prefix in ``weights``.

    Returns:
        (B, latent_dim) float32.
    """
    qw = weights or {}
    lins = head_linears(head)
    first = lins[HEAD_KEYS[0]]
    h = linear(x.contiguous(), first.weight, first.bias, qw.get(f"{prefix}.{HEAD_KEYS[0]}"))
    if len(head) == 1:
        return h
    h = _layer_norm(h, head[1]).relu_()  # type: ignore[arg-type]
    last = lins[HEAD_KEYS[1]]
    h = linear(h, last.weight, last.bias, qw.get(f"{prefix}.{HEAD_KEYS[1]}"))
    if len(head) > 5:
        h = _layer_norm(h, head[5])  # type: ignore[arg-type]
    return h
