"""Attention pooling of the TESSERA v2 students: a learned query, softmax over time.

``w = softmax_T(Linear(d, 1)(x))``, ``pooled = sum_T w * x``; no GRU and no LayerNorm (unlike
v1.0/v1.1, :mod:`tessera_model.pooling`). Facts: ``shared/reference/tessera-v2.md``
section 1 ("Per-backbone computation", step 4). :meth:`QueryAttentionPooling.forward_cpu` is its
CPU inference form.
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

    def forward_cpu(self, x: Tensor) -> Tensor:
        """CPU inference form of :meth:`forward` (no autograd; same values to float32 rounding).

        The scores are one matrix-vector product over all tokens (the bias added in it) and the
        pooled vector one batched ``(1, T) x (T, D)`` product per pixel: no ``(B, T, D)``
        temporary of ``weights * x`` (which the forward writes and then sums); 27 against 56 us
        per call of 16 x 56 x 256 at one thread. A pixel's result depends only on its own tokens
        for a given batch shape.

        Args:
            x: (B, T, D) float32.

        Returns:
            (B, D).
        """
        b, t, d = x.shape
        x = x.contiguous()
        w = self.query.weight.reshape(d)
        scores = torch.addmv(self.query.bias, x.view(b * t, d), w).view(b, 1, t)
        weights = torch.softmax(scores, dim=2)
        return torch.bmm(weights, x).view(b, d)
