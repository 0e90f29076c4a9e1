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
        scores = self.query(x)  # (B, T, 1); softmax in at least float32 (bf16 autocast)
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=1)
        weights = weights.to(x.dtype)
        return (weights * x).sum(dim=1)
