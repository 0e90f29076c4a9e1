from __future__ import annotations

import math

import pytest
import torch

from tessera_model import barlow_twins_loss, cross_correlation, mix_regulariser
from tessera_model.losses import STANDARDISE_EPS


def _naive_cc(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Plain-Python cross-correlation with biased std (+eps in the variance)."""
    n, d = len(a), len(a[0])

    def std_cols(z: list[list[float]]) -> list[list[float]]:
        cols = []
        for j in range(d):
            col = [z[i][j] for i in range(n)]
            m = sum(col) / n
            v = sum((c - m) ** 2 for c in col) / n
            cols.append([(c - m) / math.sqrt(v + STANDARDISE_EPS) for c in col])
        return cols

    ca, cb = std_cols(a), std_cols(b)
    return [[sum(ca[i][k] * cb[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]


def test_barlow_hand_value() -> None:
    # Standardised, both inputs are [[-1, 1], [1, -1]] -> C = [[1, -1], [-1, 1]]:
    # on-diagonal term 0, off-diagonal 2 * 1**2 -> loss = 2 * lambda.
    z1 = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    z2 = torch.tensor([[0.0, 5.0], [2.0, 1.0]])
    torch.testing.assert_close(
        cross_correlation(z1, z2), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-4, rtol=0
    )
    assert barlow_twins_loss(z1, z2, lambd=5e-3).item() == pytest.approx(0.01, rel=1e-4)


def test_barlow_matches_naive() -> None:
    a = [[0.3, -1.2, 2.0], [1.5, 0.4, -0.7], [-0.9, 2.2, 0.1], [0.0, -0.5, 1.1]]
    b = [[1.0, 0.2, -0.3], [0.7, -1.1, 0.9], [-1.4, 0.6, 0.2], [0.5, 0.5, -2.0]]
    c = _naive_cc(a, b)
    expected = sum((1 - c[i][i]) ** 2 for i in range(3)) + 5e-3 * sum(
        c[i][j] ** 2 for i in range(3) for j in range(3) if i != j
    )
    got = barlow_twins_loss(torch.tensor(a), torch.tensor(b))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_mix_regulariser_matches_naive() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2, zm = (torch.randn(5, 3, generator=g) for _ in range(3))
    perm = torch.tensor([2, 0, 4, 1, 3])
    alpha = 0.3
    l1, l2, lm, l2p = z1.tolist(), z2.tolist(), zm.tolist(), z2[perm].tolist()

    def fro2(x: list[list[float]], y: list[list[float]], w: list[list[float]]) -> float:
        return sum((x[i][j] - alpha * y[i][j] - (1 - alpha) * w[i][j]) ** 2
                   for i in range(3) for j in range(3))  # fmt: skip

    expected = (
        1.0
        * 5e-3
        * (
            fro2(_naive_cc(lm, l1), _naive_cc(l1, l1), _naive_cc(l2p, l1))
            + fro2(_naive_cc(lm, l2), _naive_cc(l1, l2), _naive_cc(l2p, l2))
        )
    )
    got = mix_regulariser(zm, z1, z2, perm, alpha, 5e-3, 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mix_regulariser_zero_for_pure_samples(alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    perm = torch.randperm(6, generator=g)
    zm = z1 if alpha == 1.0 else z2[perm]
    assert mix_regulariser(zm, z1, z2, perm, alpha).item() == pytest.approx(0.0, abs=1e-9)
