"""Fusion heads (``dim_reducer``): the pooled S2 and S1 vectors (B, 2d) to the embedding.

- v1.0 (``shared/reference/tessera.md`` section 1): ``Sequential(Linear(2d, L))``.
- v1.1 and v2 (``tessera-v2.md`` sections 1 and 6): ``Linear(2d, 4d) -> LayerNorm(4d) -> ReLU
  -> Dropout(0.2) -> Linear(4d, L)`` (state-dict indices 0, 1, 4); v2 adds a final
  ``LayerNorm(L)`` without weight or bias (index 5, no parameters). eps 1e-5 everywhere.
"""

from __future__ import annotations

from torch import nn

from tessera_model.spec import ModelSpec

HEAD_DROPOUT = 0.2
"""Dropout of the v1.1/v2 MLP head (inert at inference)."""


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
