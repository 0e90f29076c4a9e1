from __future__ import annotations

import math

import torch

from tessera_model.pooling import GRUCell, TemporalAttentionPooling


def test_gru_cell_hand_computed_scalar() -> None:
    cell = GRUCell(1, 1)
    with torch.no_grad():
        for name, v in dict(W_ir=0.5, W_iz=-0.3, W_ih=0.8, W_hr=0.2, W_hz=0.7, W_hh=-0.6).items():
            getattr(cell, name).weight.fill_(v)
        cell.b_r.fill_(0.1)
        cell.b_z.fill_(-0.2)
        cell.b_h.fill_(0.05)
    x, h = 2.0, 0.4

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    r = sig(0.5 * x + 0.2 * h + 0.1)
    z = sig(-0.3 * x + 0.7 * h - 0.2)
    ht = math.tanh(0.8 * x - 0.6 * (r * h) + 0.05)
    expected = (1 - z) * h + z * ht
    got = cell(torch.tensor([[x]]), torch.tensor([[h]]))
    assert abs(got.item() - expected) < 1e-6


def test_scan_matches_stepwise() -> None:
    torch.manual_seed(0)
    cell = GRUCell(6, 6)
    with torch.no_grad():
        for b in (cell.b_r, cell.b_z, cell.b_h):
            b.normal_()
    x = torch.randn(3, 5, 6)
    h = torch.zeros(3, 6)
    outs = []
    for t in range(5):
        h = cell(x[:, t], h)
        outs.append(h)
    torch.testing.assert_close(cell.scan(x), torch.stack(outs, 1), atol=1e-6, rtol=1e-5)


def test_pooling_weights_apply_to_inputs() -> None:
    torch.manual_seed(1)
    pool = TemporalAttentionPooling(8)
    x = torch.randn(4, 6, 8)
    ctx = pool.temporal_context.gru_cell.scan(x)
    w = torch.softmax(pool.query(pool.layer_norm(ctx)), dim=1)
    torch.testing.assert_close(pool(x), (w * x).sum(1))
    assert pool(x).shape == (4, 8)


def test_single_step_returns_input() -> None:
    pool = TemporalAttentionPooling(8)
    x = torch.randn(3, 1, 8)
    torch.testing.assert_close(pool(x), x[:, 0])
