"""Self-supervised training (Barlow Twins + mix regulariser) on in-memory arrays of d-pixels.

One step: draw a batch from a seeded permutation of the pixels, sample two views of
``spec.sample_steps`` steps per modality per pixel (independent hash streams), build the
mixed sample ``x_m = alpha x1 + (1 - alpha) x2[pi]`` (alpha ~ Beta(1, 1), DOY column
included), project all three and minimise ``L_BT(z1, z2) + L_mix``. AdamW with two parameter
groups (ndim > 1 at 0.2 x LR, ndim == 1 at 0.0048 x LR), linear warm-up then cosine to 0,
gradient clipping, bf16 autocast on CUDA. Checkpoints are atomic and hold everything needed
to resume bit-exactly on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tessera_model.checkpoint import build_checkpoint, read_checkpoint, save_checkpoint
from tessera_model.errors import CheckpointError, InputShapeError
from tessera_model.inputs import gather_inputs, resolve_device
from tessera_model.losses import barlow_twins_loss, mix_regulariser
from tessera_model.model import TesseraModel
from tessera_model.sampling import sample_indices
from tessera_model.spec import ModelSpec

MATRIX_LR_FACTOR = 0.2
VECTOR_LR_FACTOR = 0.0048
# Settings that may change between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({"checkpoint_every", "device"})


class TrainSettings(BaseModel):
    """Optimisation settings of one training run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(ge=1, description="Total optimiser steps (sets the LR schedule).")
    batch_size: int = Field(ge=2, description="Pixels per batch (Barlow Twins needs >= 2).")
    lr: float = Field(gt=0, description="Peak learning rate before the group factors.")
    warmup_fraction: float = Field(default=0.1, ge=0, le=1, description="Linear warm-up share.")
    weight_decay: float = Field(default=1e-6, ge=0, description="AdamW weight decay.")
    barlow_lambda: float = Field(default=5e-3, ge=0, description="Barlow Twins off-diag weight.")
    mix_lambda: float = Field(default=1.0, ge=0, description="Mix regulariser weight.")
    grad_clip: float = Field(default=2.0, gt=0, description="Max global gradient norm.")
    amp: bool = Field(default=True, description="bf16 autocast (CUDA only; ignored on CPU).")
    checkpoint_every: int = Field(default=1000, ge=1, description="Steps between checkpoints.")
    seed: int = Field(default=0, ge=0, description="Seed of init, batches, views and mixing.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Device.")


class TrainResult(BaseModel):
    """Outcome of :func:`fit`."""

    final_loss: float
    losses: list[float]
    steps: int = Field(description="Steps completed in total (including resumed ones).")
    checkpoint_path: str


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction * total`` steps, then cosine to 0 at ``total``."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _param_groups(model: torch.nn.Module, lr: float, wd: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "lr": lr * MATRIX_LR_FACTOR,
         "weight_decay": wd},
        {"params": [p for p in params if p.ndim <= 1], "lr": lr * VECTOR_LR_FACTOR,
         "weight_decay": wd},
    ]  # fmt: skip


