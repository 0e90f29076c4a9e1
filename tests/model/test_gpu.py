from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera_model import (
    ModelSpec,
    TesseraModel,
    TrainingArrays,
    TrainSettings,
    embed_pixels,
    fit,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_bf16_close_to_cpu(tile_pixels: object) -> None:
    p = tile_pixels
    torch.manual_seed(0)
    model = TesseraModel(ModelSpec.preset("small"), with_projector=False)
    args = (p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy, p.s1_keys, p.pixel_ids)  # type: ignore[attr-defined]
    cpu = embed_pixels(model, *args, seed=1, batch_size=16, device="cpu")
    gpu = embed_pixels(model, *args, seed=1, batch_size=16, device="auto")
    ok = np.isfinite(cpu[:, 0])
    np.testing.assert_array_equal(np.isfinite(gpu[:, 0]), ok)
    cos = (
        (cpu[ok] * gpu[ok]).sum(1)
        / np.linalg.norm(cpu[ok], axis=1)
        / np.linalg.norm(gpu[ok], axis=1)
    )
    assert cos.min() > 0.99


def test_cuda_amp_training_step(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    settings = TrainSettings(steps=3, batch_size=32, lr=1e-2, device="cuda", amp=True)
    result = fit(tiny_spec, training_arrays_factory(), settings, str(tmp_path / "ck.pt"))
    assert np.isfinite(result.losses).all() and result.steps == 3


def test_cuda_compile_auto_batch_matches_eager(tile_pixels: object) -> None:
    p = tile_pixels
    torch.manual_seed(0)
    model = TesseraModel(ModelSpec.preset("small"), with_projector=False)
    args = (p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy, p.s1_keys, p.pixel_ids)  # type: ignore[attr-defined]
    eager = embed_pixels(model, *args, seed=1, batch_size=0, device="cuda")
    compiled = embed_pixels(model, *args, seed=1, batch_size=16, device="cuda", compile=True)
    ok = np.isfinite(eager[:, 0])
    np.testing.assert_array_equal(np.isfinite(compiled[:, 0]), ok)
    np.testing.assert_allclose(compiled[ok], eager[ok], atol=0.05, rtol=0.05)
