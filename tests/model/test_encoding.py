from __future__ import annotations

import math

import pytest
import torch

from tessera_model.encoding import doy_encoding


def test_hand_values() -> None:
    pe = doy_encoding(torch.tensor([1.0, 200.0]), 4)
    div1 = math.exp(-2 * math.log(10000) / 4)  # 0.01
    expected = torch.tensor(
        [
            [math.sin(1), math.cos(1), math.sin(div1), math.cos(div1)],
            [math.sin(200), math.cos(200), math.sin(200 * div1), math.cos(200 * div1)],
        ]
    )
    torch.testing.assert_close(pe, expected)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4)])
def test_shapes(shape: tuple[int, ...]) -> None:
    doy = torch.randint(1, 367, shape, dtype=torch.int64)
    assert doy_encoding(doy, 8).shape == (*shape, 8)


def test_odd_width_rejected() -> None:
    with pytest.raises(ValueError):
        doy_encoding(torch.ones(3), 5)
