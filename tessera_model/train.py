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


class TrainingArrays(BaseModel):
    """Pixels to train on; each pixel has its own DOY axis (pixels come from many tiles).

    Shapes: s2 uint16 (N, Tmax, C2) DN with the offset removed, s2_doy uint16 (N, Tmax),
    s2_valid bool (N, Tmax), s1 int16 (N, T1max, C1), s1_doy (N, T1max), s1_valid bool
    (N, T1max). Padding steps are simply not valid.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    s2: np.ndarray
    s2_doy: np.ndarray
    s2_valid: np.ndarray
    s1: np.ndarray
    s1_doy: np.ndarray
    s1_valid: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> TrainingArrays:
        n = self.s2.shape[0]
        checks = {
            "s2": (self.s2, 3, np.uint16),
            "s2_doy": (self.s2_doy, 2, None),
            "s2_valid": (self.s2_valid, 2, np.bool_),
            "s1": (self.s1, 3, np.int16),
            "s1_doy": (self.s1_doy, 2, None),
            "s1_valid": (self.s1_valid, 2, np.bool_),
        }
        for name, (arr, ndim, dtype) in checks.items():
            if arr.ndim != ndim or arr.shape[0] != n:
                raise InputShapeError(
                    f"Expected {name} with {ndim} dims and N={n}. Got {arr.shape}."
                )
            if dtype is not None and arr.dtype != dtype:
                raise InputShapeError(
                    f"Expected {name} of dtype {np.dtype(dtype)}. Got {arr.dtype}."
                )
        if self.s2.shape[:2] != self.s2_doy.shape or self.s2_doy.shape != self.s2_valid.shape:
            raise InputShapeError(
                f"Expected s2, s2_doy, s2_valid to share (N, Tmax). Got {self.s2.shape}, "
                f"{self.s2_doy.shape}, {self.s2_valid.shape}."
            )
        if self.s1.shape[:2] != self.s1_doy.shape or self.s1_doy.shape != self.s1_valid.shape:
            raise InputShapeError(
                f"Expected s1, s1_doy, s1_valid to share (N, T1max). Got {self.s1.shape}, "
                f"{self.s1_doy.shape}, {self.s1_valid.shape}."
            )
        return self

    @property
    def n_pixels(self) -> int:
        """Number of pixels N."""
        return int(self.s2.shape[0])


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


class _Batcher:
    """Seeded per-epoch permutations of the usable pixels; batch ``s`` is a pure function."""

    def __init__(self, pixels: npt.NDArray[np.int64], batch_size: int, seed: int) -> None:
        self.pixels, self.batch_size, self.seed = pixels, batch_size, seed
        self.per_epoch = len(pixels) // batch_size
        self._epoch = -1
        self._perm = pixels

    def batch(self, step: int) -> tuple[int, npt.NDArray[np.int64]]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._perm = self.pixels[
                np.random.default_rng([self.seed, epoch]).permutation(len(self.pixels))
            ]
            self._epoch = epoch
        return epoch, np.sort(self._perm[i * self.batch_size : (i + 1) * self.batch_size])


def _view(
    data: TrainingArrays, idx: npt.NDArray[np.int64], k: int, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = idx.astype(np.uint64)
    v2, v1 = data.s2_valid[idx], data.s1_valid[idx]
    i2 = sample_indices(v2, k, ids, seed, 2 * stream, np.arange(v2.shape[1], dtype=np.int64))
    i1 = sample_indices(v1, k, ids, seed, 2 * stream + 1, np.arange(v1.shape[1], dtype=np.int64))
    x2 = gather_inputs(data.s2[idx], data.s2_doy[idx], i2, "s2")
    x1 = gather_inputs(data.s1[idx], data.s1_doy[idx], i1, "s1")
    return torch.from_numpy(x2), torch.from_numpy(x1)


def _rng_state(gen: torch.Generator, dev: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "mix": gen.get_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def fit(
    spec: ModelSpec,
    data: TrainingArrays,
    settings: TrainSettings,
    checkpoint_path: str,
    resume: bool = True,
    log_fn: Callable[[int, float, float], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a :class:`TesseraModel` from scratch or resume it from ``checkpoint_path``.

    Args:
        spec: model to build.
        data: training pixels; pixels with no valid S2 or no valid S1 step are skipped.
        settings: optimisation settings.
        checkpoint_path: local file written every ``checkpoint_every`` steps and at the end
            (atomically); read on start when ``resume`` and it exists.
        resume: continue from an existing checkpoint (same spec and settings required).
        log_fn: called as ``log_fn(step, loss, lr)`` after every step.
        stop_after: stop (with a checkpoint) once this many steps are done in total, e.g.
            to fit a time budget; the LR schedule still spans ``settings.steps``.

    Returns:
        :class:`TrainResult` with the losses of the steps run in this call and before.

    Raises:
        CheckpointError: the checkpoint to resume from has another spec or settings.
        ValueError: fewer usable pixels than one batch.
    """
    dev = resolve_device(settings.device)
    usable = np.nonzero(data.s2_valid.any(axis=1) & data.s1_valid.any(axis=1))[0]
    if len(usable) < settings.batch_size:
        raise ValueError(
            f"Expected at least batch_size={settings.batch_size} usable pixels. Got {len(usable)}."
        )
    torch.manual_seed(settings.seed)
    model = TesseraModel(spec, with_projector=True).to(dev)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, settings.lr, settings.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, settings.steps, settings.warmup_fraction)
    )
    gen = torch.Generator().manual_seed(settings.seed)
    start, losses = 0, []
    path = Path(checkpoint_path)
    if resume and path.exists():
        ck = read_checkpoint(path, map_location=dev)
        if ck.get("model_spec") != spec.model_dump():
            raise CheckpointError(
                f"Expected a checkpoint of spec {spec.model_dump()}. Got {ck.get('model_spec')}."
            )
        old = {k: v for k, v in ck.get("train_settings", {}).items() if k not in _RESUMABLE_CHANGES}
        new = {k: v for k, v in settings.model_dump().items() if k not in _RESUMABLE_CHANGES}
        if old != new:
            raise CheckpointError(f"Expected train settings {new} to resume. Got {old}.")
        model.load_state_dict(ck["model_state_dict"])
        opt.load_state_dict(ck["optimizer_state_dict"])
        sched.load_state_dict(ck["scheduler_state_dict"])
        torch.set_rng_state(ck["rng_state"]["torch"].cpu())
        gen.set_state(ck["rng_state"]["mix"].cpu())
        if dev.type == "cuda" and "cuda" in ck["rng_state"]:
            torch.cuda.set_rng_state(ck["rng_state"]["cuda"].cpu(), dev)
        start, losses = int(ck["step"]), list(ck["losses"])

    def save(step: int) -> None:
        obj = build_checkpoint(
            model,
            inference_only=False,
            optimizer_state_dict=opt.state_dict(),
            scheduler_state_dict=sched.state_dict(),
            step=step,
            rng_state=_rng_state(gen, dev),
            train_settings=settings.model_dump(),
            losses=losses,
        )
        save_checkpoint(obj, path)

    batcher = _Batcher(usable.astype(np.int64), settings.batch_size, settings.seed)
    k = spec.sample_steps
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and settings.amp
        else contextlib.nullcontext()
    )
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    step = start
    for step in range(start, end):
        epoch, idx = batcher.batch(step)
        s2a, s1a = (t.to(dev) for t in _view(data, idx, k, settings.seed, 4 * epoch + 2))
        s2b, s1b = (t.to(dev) for t in _view(data, idx, k, settings.seed, 4 * epoch + 3))
        alpha = float(torch.rand((), generator=gen))  # Beta(1, 1) = U(0, 1)
        perm = torch.randperm(len(idx), generator=gen).to(dev)
        s2m = alpha * s2a + (1 - alpha) * s2b[perm]
        s1m = alpha * s1a + (1 - alpha) * s1b[perm]
        with autocast:
            _, z1 = model(s2a, s1a)
            _, z2 = model(s2b, s1b)
            _, zm = model(s2m, s1m)
        z1, z2, zm = z1.float(), z2.float(), zm.float()
        loss = barlow_twins_loss(z1, z2, settings.barlow_lambda) + mix_regulariser(
            zm, z1, z2, perm, alpha, settings.barlow_lambda, settings.mix_lambda
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_fn is not None:
            log_fn(step + 1, losses[-1], sched.get_last_lr()[0])
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == end:
            save(done)
    if start >= end and not path.exists():
        save(start)
    return TrainResult(
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        steps=max(start, end),
        checkpoint_path=str(path),
    )
