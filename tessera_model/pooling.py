"""Temporal-aware attention pooling of TESSERA v1.0 (a hand-written GRU + softmax over time).

The GRU here is **not** :class:`torch.nn.GRU`. Per step, with separate bias-free linear maps
and bias vectors (h0 = 0)::

    r  = sigmoid(W_ir x + W_hr h + b_r)
    z  = sigmoid(W_iz x + W_hz h + b_z)
    h~ = tanh(W_ih x + W_hh (r * h) + b_h)
    h' = (1 - z) * h + z * h~

The pooling weights are ``softmax_T(query(LayerNorm(gru_outputs)))`` and are applied to the
transformer outputs ``x`` (not to the GRU outputs). Reference: Feng et al., "TESSERA"
(arXiv 2506.20380) and its v1.0 code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GRUCell(nn.Module):
    """One GRU step with the TESSERA parameterisation (see the module docstring).

    State-dict keys: ``b_r, b_z, b_h`` (H,), ``W_ir, W_iz, W_ih`` (H, D) and
    ``W_hr, W_hz, W_hh`` (H, H) ``.weight``.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.b_r = nn.Parameter(torch.zeros(hidden_dim))
        self.b_z = nn.Parameter(torch.zeros(hidden_dim))
        self.b_h = nn.Parameter(torch.zeros(hidden_dim))
        self.W_ir = nn.Linear(input_dim, hidden_dim, bias=False)
        self.W_iz = nn.Linear(input_dim, hidden_dim, bias=False)
        self.W_ih = nn.Linear(input_dim, hidden_dim, bias=False)
        self.W_hr = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.W_hz = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.W_hh = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step: x (B, D), h (B, H) -> h' (B, H). Reference form, used by tests."""
        r = torch.sigmoid(self.W_ir(x) + self.W_hr(h) + self.b_r)
        z = torch.sigmoid(self.W_iz(x) + self.W_hz(h) + self.b_z)
        h_tilde = torch.tanh(self.W_ih(x) + self.W_hh(r * h) + self.b_h)
        return (1 - z) * h + z * h_tilde

    def scan(self, x: Tensor) -> Tensor:
        """Run the cell over a sequence from h0 = 0.

        The input projections of all T steps are one matmul; the Python loop runs over T
        only (two small matmuls per step, batched over all pixels).

        Args:
            x: (B, T, D).

        Returns:
            (B, T, H) hidden states after each step.
        """
        hd = self.hidden_dim
        w_in = torch.cat([self.W_ir.weight, self.W_iz.weight, self.W_ih.weight], dim=0)
        b_in = torch.cat([self.b_r, self.b_z, self.b_h])
        gi = nn.functional.linear(x, w_in, b_in)  # (B, T, 3H): [r | z | h~] input parts
        w_rz_t = torch.cat([self.W_hr.weight, self.W_hz.weight], dim=0).t()
        w_hh_t = self.W_hh.weight.t()
        # Step 0: h = 0, so every hidden-state matmul vanishes.
        z = torch.sigmoid(gi[:, 0, hd : 2 * hd])
        h = z * torch.tanh(gi[:, 0, 2 * hd :])
        outs = [h]
        # Six fused ops per step (few kernel launches / thread barriers per step).
        for t in range(1, x.shape[1]):
            rz = torch.sigmoid(torch.addmm(gi[:, t, : 2 * hd], h, w_rz_t))
            h_tilde = torch.tanh(torch.addmm(gi[:, t, 2 * hd :], rz[:, :hd] * h, w_hh_t))
            h = torch.lerp(h, h_tilde, rz[:, hd:])  # (1 - z) * h + z * h~
            outs.append(h)
        return torch.stack(outs, dim=1)


class TemporalContext(nn.Module):
    """Wraps :class:`GRUCell` under the key prefix ``temporal_context.gru_cell``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gru_cell = GRUCell(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> GRU outputs (B, T, D)."""
        return self.gru_cell.scan(x)


class TemporalAttentionPooling(nn.Module):
    """Temporal-aware attention pooling: (B, T, D) -> (B, D).

    Keys: ``temporal_context.gru_cell.*``, ``query`` (Linear(D, 1)), ``layer_norm``.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.temporal_context = TemporalContext(d_model)
        self.query = nn.Linear(d_model, 1)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Pool transformer outputs.

        Args:
            x: (B, T, D) transformer outputs.

        Returns:
            (B, D) weighted sum over T; for T = 1 the single step itself.
        """
        if x.shape[1] == 1:
            return x[:, 0]
        context = self.temporal_context(x)
        scores = self.query(self.layer_norm(context))  # (B, T, 1)
        # softmax in at least float32 (bf16 autocast), float64 stays float64
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=1)
        weights = weights.to(x.dtype)
        return (weights * x).sum(dim=1)
