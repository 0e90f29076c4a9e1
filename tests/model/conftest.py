"""Fixtures for tessera_model tests: a tiny spec and tiny seeded synthetic d-pixels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tessera_model import ModelSpec, TrainingArrays


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(
        version="test",
        latent_dim=16,
        d_model=16,
        n_layers=1,
        n_heads=2,
        ffn_dim=32,
        dropout=0.1,
        projector_dim=32,
        projector_layers=2,
        sample_steps=8,
    )


@dataclass
class TilePixels:
    s2: np.ndarray
    s2_valid: np.ndarray
    s2_doy: np.ndarray
    s1: np.ndarray
    s1_valid: np.ndarray
    s1_doy: np.ndarray
    s1_keys: np.ndarray
    pixel_ids: np.ndarray


def make_tile_pixels(n: int = 40, t2: int = 20, t1: int = 12, seed: int = 0) -> TilePixels:
    rng = np.random.default_rng(seed)
    s2_valid = rng.random((n, t2)) < 0.6
    s2_valid[0] = False  # no S2 at all
    s2_valid[1, 3:] = False  # fewer valid than sample_steps
    s1_valid = rng.random((n, t1)) < 0.7
    s1_valid[2] = False  # no S1 at all
    half = t1 // 2
    s1_doy = np.concatenate([np.linspace(5, 360, half), np.linspace(5, 360, t1 - half)])
    return TilePixels(
        s2=rng.integers(0, 6000, (n, t2, 10)).astype(np.uint16),
        s2_valid=s2_valid,
        s2_doy=np.linspace(3, 363, t2).astype(np.uint16),
        s1=rng.integers(1, 12000, (n, t1, 2)).astype(np.int16),
        s1_valid=s1_valid,
        s1_doy=s1_doy.astype(np.uint16),
        # asc and desc share DOYs: keys tell them apart
        s1_keys=np.concatenate([np.arange(half), 1000 + np.arange(t1 - half)]).astype(np.int64),
        pixel_ids=(np.arange(n, dtype=np.uint64) * np.uint64(7919) + np.uint64(11)),
    )


def make_training_arrays(n: int = 96, t2: int = 16, t1: int = 10, seed: int = 0) -> TrainingArrays:
    """Pixels of four classes with distinct spectra and seasonal curves, plus noise."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 4, n)
    doy2 = np.sort(rng.integers(1, 366, (n, t2)), axis=1)
    doy1 = np.sort(rng.integers(1, 366, (n, t1)), axis=1)
    base = rng.uniform(500, 4000, (4, 10))
    season = np.sin(2 * np.pi * doy2 / 365 + cls[:, None])[..., None] * 800
    s2 = base[cls][:, None, :] + season + rng.normal(0, 150, (n, t2, 10))
    s1 = 4000 + 1500 * cls[:, None, None] + rng.normal(0, 300, (n, t1, 2))
    return TrainingArrays(
        s2=np.clip(s2, 0, 10000).astype(np.uint16),
        s2_doy=doy2.astype(np.uint16),
        s2_valid=rng.random((n, t2)) < 0.8,
        s1=s1.astype(np.int16),
        s1_doy=doy1.astype(np.uint16),
        s1_valid=rng.random((n, t1)) < 0.9,
    )


@pytest.fixture
def training_arrays_factory() -> Callable[..., TrainingArrays]:
    return make_training_arrays


@pytest.fixture
def tile_pixels() -> TilePixels:
    return make_tile_pixels()


@pytest.fixture(autouse=True)
def _single_thread() -> object:
    """Tiny tensors run fastest on one thread (and do not stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
