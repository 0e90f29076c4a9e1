"""Attention pooling of the TESSERA v2 students: a learned query, softmax over time.

``w = softmax_T(Linear(d, 1)(x))``, ``pooled = sum_T w * x``; no GRU and no LayerNorm (unlike
v1.0/v1.1, :mod:`tessera_model.pooling`). Facts: ``shared/reference/tessera-v2.md``
section 1 ("Per-backbone computation", step 4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QueryAttentionPooling(nn.Module):
    """(B, T, D) -> (B, D). State-dict keys: ``query.weight`` (1, D), ``query.bias`` (1,)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Pool transformer outputs.

        Args:
            x: (B, T, D).

        Returns:
            (B, D) softmax-weighted sum over T (for T = 1 the single token: same value).
        """
        weights = torch.softmax(self.query(x).float(), dim=1).to(x.dtype)  # (B, T, 1)
        return (weights * x).sum(dim=1)
