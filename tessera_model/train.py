"""Self-supervised training (Barlow Twins + mix regulariser), streamed from pixel shards.

One step: take the step's global batch from a seeded shard and pixel order
(:class:`~tessera_model.data.BatchOrder`; a pure function of the step), sample two views of
``spec.sample_steps`` steps per modality per pixel (independent hash streams), build the
mixed sample ``x_m = alpha x1 + (1 - alpha) x2[pi]`` (alpha ~ Beta(1, 1), DOY column
included), project all three and minimise ``L_BT(z1, z2) + L_mix``. AdamW with two parameter
groups (ndim > 1 at 0.2 x LR, ndim == 1 at 0.0048 x LR), linear warm-up then cosine to 0,
gradient clipping, bf16 autocast on CUDA. Checkpoints are atomic and hold everything needed
to resume bit-exactly on CPU.

Validation (optional): every ``validate_every`` steps (and at the last step) the same loss is
computed, without gradients, on held-out pixels (e.g. pixels of tiles the training set does
not hold) with fixed views and a fixed mix, dropout off and batch statistics in the
projector's BatchNorm (its running statistics are left untouched), so the validation never
changes the training trajectory. With ``patience > 0`` training stops once ``patience``
validations in a row fail to lower the best validation loss by ``min_delta`` (relative):
the loss has flattened; ``steps`` is then only the cap (the LR schedule spans it). Data parallel over ``torch.distributed`` when a process
group is initialised (see :mod:`tessera_model.distributed`).
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
from pydantic import BaseModel, ConfigDict, Field

from tessera_model.checkpoint import build_checkpoint, read_checkpoint, save_checkpoint
from tessera_model.data import ArrayShards, BatchOrder, PixelShards, ShardReader, TrainingArrays
from tessera_model.distributed import (
    World,
    all_gather_rows,
    average_gradients,
    barrier,
    broadcast_parameters,
    current_world,
    gather_objects,
    use_global_batchnorm,
)
from tessera_model.errors import CheckpointError
from tessera_model.inputs import gather_inputs, resolve_device
from tessera_model.losses import barlow_twins_loss, mix_regulariser
from tessera_model.model import TesseraModel
from tessera_model.sampling import hash_keys, sample_indices
from tessera_model.spec import ModelSpec

MATRIX_LR_FACTOR = 0.2
VECTOR_LR_FACTOR = 0.0048
# Settings that may change between a run and its resumption.
_RESUMABLE_CHANGES = frozenset({"checkpoint_every", "device"})
_RANK_SEED_STRIDE = 1_000_003


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
    validate_every: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Steps between validation losses on the held-out pixels given to fit "
        "(also at the last step); 0: no validation.",
    )
    patience: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Stop once this many validations in a row did not lower the best "
        "validation loss by min_delta (the loss has flattened); 0: run every step.",
    )
    min_delta: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Relative decrease of the best validation loss that counts as progress.",
    )
    view_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Share of a pixel's valid observations each training view draws its "
        "steps from (a seeded random subset per view and epoch, at least one step): below 1 "
        "the two views see different dates (sparse random temporal subsets); 1: every "
        "valid step.",
    )


class TrainResult(BaseModel):
    """Outcome of :func:`fit`."""

    final_loss: float
    losses: list[float]
    steps: int = Field(description="Steps completed in total (including resumed ones).")
    checkpoint_path: str
    stopped: bool = Field(default=False, description="Ended early by ``should_stop`` (the "
                          "checkpoint holds the steps done; a re-run resumes from it).")
    validation: list[tuple[int, float]] = Field(
        default_factory=list, description="(step, validation loss) of every validation."
    )
    converged: bool = Field(
        default=False,
        description="Ended before the step cap because "
        "the validation loss stopped improving (patience).",
    )
    best_step: int | None = Field(default=None, description="Step of the lowest validation loss.")
    best_validation_loss: float | None = Field(
        default=None, description="The lowest validation loss."
    )


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction * total`` steps, then cosine to 0 at ``total``."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def plateaued(history: list[tuple[int, float]], patience: int, min_delta: float) -> bool:
    """Whether the last ``patience`` validations all failed to lower the best loss before
    them by more than ``min_delta`` (relative); False while there are fewer."""
    if patience <= 0 or len(history) <= patience:
        return False
    losses = [v for _, v in history]
    best = min(losses[:-patience])
    return not any(v < best - min_delta * abs(best) for v in losses[-patience:])


def best_validation(history: list[tuple[int, float]]) -> tuple[int | None, float | None]:
    """(step, loss) of the lowest validation loss (the first of equals); (None, None) if none."""
    if not history:
        return None, None
    step, loss = min(history, key=lambda sv: sv[1])
    return int(step), float(loss)


def _param_groups(model: torch.nn.Module, lr: float, wd: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "lr": lr * MATRIX_LR_FACTOR,
         "weight_decay": wd},
        {"params": [p for p in params if p.ndim <= 1], "lr": lr * VECTOR_LR_FACTOR,
         "weight_decay": wd},
    ]  # fmt: skip


_SUBSET_DOMAIN = 3  # hash domain of the view subsets (sampling uses 1 and 2)


def view_subset(
    valid: npt.NDArray[np.bool_],
    ids: npt.NDArray[np.uint64],
    fraction: float,
    seed: int,
    stream: int,
) -> npt.NDArray[np.bool_]:
    """A seeded random subset of each pixel's valid steps (each kept with probability
    ``fraction``; a pixel left with none keeps all); a pure function of the pixel id."""
    if fraction >= 1.0:
        return valid
    u = hash_keys(seed, stream, ids, _SUBSET_DOMAIN, np.arange(valid.shape[1], dtype=np.int64))
    keep = valid & ((u >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction)
    return np.where(keep.any(axis=1, keepdims=True), keep, valid)



def _view(
    data: TrainingArrays,
    rows: npt.NDArray[np.int64],
    ids: npt.NDArray[np.uint64],
    k: int,
    seed: int,
    stream: int,
    fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of the given batch rows: (b, k, C2 + 1) and (b, k, C1 + 1) float32 inputs."""
    v2, v1 = data.s2_valid[rows], data.s1_valid[rows]
    ids = ids[rows]
    v2 = view_subset(v2, ids, fraction, seed, 2 * stream + 1_000_001)
    v1 = view_subset(v1, ids, fraction, seed, 2 * stream + 1_000_002)
    i2 = sample_indices(v2, k, ids, seed, 2 * stream, np.arange(v2.shape[1], dtype=np.int64))
    i1 = sample_indices(v1, k, ids, seed, 2 * stream + 1, np.arange(v1.shape[1], dtype=np.int64))
    x2 = gather_inputs(data.s2[rows], data.s2_doy[rows], i2, "s2")
    x1 = gather_inputs(data.s1[rows], data.s1_doy[rows], i1, "s1")
    return torch.from_numpy(x2), torch.from_numpy(x1)


_VAL_STREAM = 1 << 30  # hash streams of the validation views (training uses 4 * epoch + 2, 3)


def validation_loss(
    model: TesseraModel,
    data: TrainingArrays,
    settings: TrainSettings,
    world: World | None = None,
    dev: torch.device | None = None,
) -> float:
    """The training loss (Barlow Twins + mix) of held-out pixels, without gradients.

    Fixed for given pixels and settings: views from dedicated hash streams of the pixel's
    position in ``data``, mix ``alpha = 0.5`` with a seeded permutation per batch. Dropout is
    off; the projector's BatchNorm normalises with the batch's statistics, as in training,
    and its running statistics are restored afterwards. Batches of ``settings.batch_size``
    pixels (one smaller batch when there are fewer; the tail is dropped); the mean over
    batches. Under ``torch.distributed`` every rank encodes its slice of each batch and gets
    the same value.
    """
    world = world or current_world()
    dev = dev or next(model.parameters()).device
    n = data.n_pixels
    bsz = min(settings.batch_size, n - n % world.size)
    if bsz < 2:
        raise ValueError(f"Expected at least 2 validation pixels. Got {n}.")
    k = model.spec.sample_steps
    bl = bsz // world.size
    local = np.arange(world.rank * bl, (world.rank + 1) * bl, dtype=np.int64)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.eval()
    for m in model.modules():  # batch statistics, as the loss is defined in training
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(n // bsz):
                rows = np.arange(i * bsz, (i + 1) * bsz, dtype=np.int64)
                batch = data.take(rows)
                ids = rows.astype(np.uint64)
                perm = torch.from_numpy(
                    np.random.default_rng([settings.seed, 7, i]).permutation(bsz)
                )
                s2a, s1a = (t.to(dev) for t in
                            _view(batch, local, ids, k, settings.seed, _VAL_STREAM))  # fmt: skip
                s2b, s1b = (t.to(dev) for t in
                            _view(batch, local, ids, k, settings.seed, _VAL_STREAM + 1))  # fmt: skip
                if world.size == 1:
                    s2p, s1p = s2b[perm.to(dev)], s1b[perm.to(dev)]
                else:
                    partners = perm[local].numpy().astype(np.int64)
                    s2p, s1p = (t.to(dev) for t in
                                _view(batch, partners, ids, k, settings.seed, _VAL_STREAM + 1))  # fmt: skip
                s2m, s1m = 0.5 * s2a + 0.5 * s2p, 0.5 * s1a + 0.5 * s1p
                _, z1 = model(s2a, s1a)
                _, z2 = model(s2b, s1b)
                _, zm = model(s2m, s1m)
                z1, z2, zm = (all_gather_rows(z.float()) for z in (z1, z2, zm))
                loss = barlow_twins_loss(z1, z2, settings.barlow_lambda) + mix_regulariser(
                    zm, z1, z2, perm.to(dev), 0.5, settings.barlow_lambda, settings.mix_lambda
                )
                total += float(loss)
                count += 1
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    return total / count


def _rng_state(gen: torch.Generator, dev: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "mix": gen.get_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator, dev: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["mix"].cpu())
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), dev)


def _any_rank(flag: bool, world: World, dev: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a scalar all-reduce; ``flag`` in one process)."""
    if world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _rank_device(settings: TrainSettings, world: World) -> torch.device:
    dev = resolve_device(settings.device)
    if dev.type == "cuda" and dev.index is None and world.size > 1:
        dev = torch.device("cuda", world.rank % torch.cuda.device_count())
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def fit(
    spec: ModelSpec,
    data: TrainingArrays | PixelShards,
    settings: TrainSettings,
    checkpoint_path: str,
    resume: bool = True,
    log_fn: Callable[[int, float, float], None] | None = None,
    stop_after: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[str, int], None] | None = None,
    validation: TrainingArrays | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a :class:`TesseraModel` from scratch or resume it from ``checkpoint_path``.

    Data parallel when a ``torch.distributed`` process group is initialised (e.g. under
    ``torchrun``): every rank calls ``fit`` with the same arguments; the global batch
    ``settings.batch_size`` is split evenly over the ranks and the result equals the
    single-process run up to float rounding (and dropout masks, which differ per rank). On
    CUDA each rank uses ``cuda:<rank % device_count>`` unless the device names an index.
    Only rank 0 writes the checkpoint.

    Args:
        spec: model to build.
        data: training pixels, in memory (:class:`TrainingArrays`; pixels with no valid S2
            or no valid S1 step are skipped) or as shards streamed from storage
            (:class:`PixelShards`; at most two shards are held in memory).
        settings: optimisation settings.
        checkpoint_path: local file written every ``checkpoint_every`` steps and at the end
            (atomically); read on start when ``resume`` and it exists.
        resume: continue from an existing checkpoint (same spec and settings required).
        log_fn: called on rank 0 as ``log_fn(step, loss, lr)`` after every step.
        stop_after: stop (with a checkpoint) once this many steps are done in total, e.g.
            to fit a time budget; the LR schedule still spans ``settings.steps``.
        should_stop: polled before every step (on every rank; under ``torch.distributed``
            the ranks agree: any rank's request stops all). When it returns True the steps
            done so far are checkpointed and ``fit`` returns with ``stopped=True``, so a
            later call resumes exactly there. E.g. ``tasks.stop.stop_requested``.
        on_checkpoint: called on rank 0 as ``on_checkpoint(path, step)`` after every
            checkpoint write (e.g. to copy the running checkpoint to shared storage).
        validation: held-out pixels (e.g. of tiles not in ``data``); their loss
            (:func:`validation_loss`) is computed every ``settings.validate_every`` steps and
            at the last step, kept in the checkpoint (``validation``: [step, loss] pairs) and
            drives the plateau stop (``settings.patience``). Pixels without a valid S2 or S1
            step are dropped.
        on_validation: called on rank 0 as ``on_validation(step, loss)`` after each validation.

    Returns:
        :class:`TrainResult` with the losses of the steps run in this call and before, the
        validation losses, and ``converged`` when the plateau stop ended the run.

    Raises:
        CheckpointError: the checkpoint to resume from has another spec or settings.
        ValueError: fewer usable pixels than one batch, or a global batch that does not
            split evenly over the ranks.
    """
    world = current_world()
    if settings.batch_size % world.size:
        raise ValueError(
            f"Expected a batch_size divisible by the {world.size} ranks. "
            f"Got {settings.batch_size}."
        )
    shards = ArrayShards(data) if isinstance(data, TrainingArrays) else data
    order = BatchOrder(shards.shard_sizes, settings.batch_size, settings.seed)
    reader = ShardReader(shards)
    dev = _rank_device(settings, world)
    torch.manual_seed(settings.seed)
    model = TesseraModel(spec, with_projector=True)
    if world.size > 1:
        use_global_batchnorm(model)
        broadcast_parameters(model)
        if world.rank:  # dropout masks differ per rank; rank 0 keeps the single-process stream
            torch.manual_seed(settings.seed + _RANK_SEED_STRIDE * world.rank)
    model.to(dev).train()
    opt = torch.optim.AdamW(_param_groups(model, settings.lr, settings.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, settings.steps, settings.warmup_fraction)
    )
    gen = torch.Generator().manual_seed(settings.seed)
    start, losses = 0, []
    val_hist: list[tuple[int, float]] = []
    converged = False
    if validation is not None:
        validation = validation.take(np.flatnonzero(validation.usable()))
        if validation.n_pixels < 2:
            validation = None
    validate = validation is not None and settings.validate_every > 0
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
        ranks = ck["rng_state"].get("ranks", [ck["rng_state"]])
        rank_state = ranks[world.rank] if len(ranks) == world.size else ranks[0]
        _set_rng_state(rank_state, gen, dev)
        start, losses = int(ck["step"]), list(ck["losses"])
        val_hist = [(int(a), float(b)) for a, b in ck.get("validation", [])]
        converged = bool(ck.get("converged", False))

    def save(step: int) -> None:
        states = gather_objects(_rng_state(gen, dev))
        if world.is_main:
            obj = build_checkpoint(
                model,
                inference_only=False,
                optimizer_state_dict=opt.state_dict(),
                scheduler_state_dict=sched.state_dict(),
                step=step,
                rng_state={**states[0], "ranks": states},
                train_settings=settings.model_dump(),
                losses=losses,
                world_size=world.size,
                validation=[[s_, v_] for s_, v_ in val_hist],
                converged=converged,
                best_validation=list(best_validation(val_hist)),
            )
            save_checkpoint(obj, path)
            if on_checkpoint is not None:
                on_checkpoint(str(path), step)
        barrier()

    k = spec.sample_steps
    b = settings.batch_size // world.size
    local = np.arange(world.rank * b, (world.rank + 1) * b, dtype=np.int64)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and settings.amp
        else contextlib.nullcontext()
    )
    end = settings.steps if stop_after is None else min(settings.steps, stop_after)
    if converged:  # a finished run (plateau stop) resumed: nothing left to do
        end = start
    saved = start if path.exists() else -1
    for step in range(start, end):
        if _any_rank(should_stop is not None and should_stop(), world, dev):
            if saved != step:
                save(step)
            best_step, best_loss = best_validation(val_hist)
            return TrainResult(
                final_loss=losses[-1] if losses else float("nan"),
                losses=losses,
                steps=step,
                checkpoint_path=str(path),
                stopped=True,
                validation=val_hist,
                best_step=best_step,
                best_validation_loss=best_loss,
            )
        epoch, shard, row = order.batch(step)
        batch = reader.read(shard, row)
        ids = order.pixel_ids(shard, row)
        alpha = float(torch.rand((), generator=gen))  # Beta(1, 1) = U(0, 1)
        perm = torch.randperm(settings.batch_size, generator=gen)
        frac = settings.view_fraction
        s2a, s1a = (t.to(dev) for t in
                    _view(batch, local, ids, k, settings.seed, 4 * epoch + 2, frac))  # fmt: skip
        s2b, s1b = (t.to(dev) for t in
                    _view(batch, local, ids, k, settings.seed, 4 * epoch + 3, frac))  # fmt: skip
        if world.size == 1:
            s2p, s1p = s2b[perm.to(dev)], s1b[perm.to(dev)]
        else:  # the partners x2[pi] of this rank's rows live in any rank's slice: resample
            partners = perm[local].numpy().astype(np.int64)
            s2p, s1p = (t.to(dev) for t in
                        _view(batch, partners, ids, k, settings.seed, 4 * epoch + 3,
                              frac))  # fmt: skip
        s2m = alpha * s2a + (1 - alpha) * s2p
        s1m = alpha * s1a + (1 - alpha) * s1p
        with autocast:
            _, z1 = model(s2a, s1a)
            _, z2 = model(s2b, s1b)
            _, zm = model(s2m, s1m)
        z1, z2, zm = (all_gather_rows(z.float()) for z in (z1, z2, zm))
        loss = barlow_twins_loss(z1, z2, settings.barlow_lambda) + mix_regulariser(
            zm, z1, z2, perm.to(dev), alpha, settings.barlow_lambda, settings.mix_lambda
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_fn is not None and world.is_main:
            log_fn(step + 1, losses[-1], sched.get_last_lr()[0])
        done = step + 1
        if validate and (done % settings.validate_every == 0 or done == settings.steps):
            v = validation_loss(model, validation, settings, world, dev)  # type: ignore[arg-type]
            val_hist.append((done, v))
            if on_validation is not None and world.is_main:
                on_validation(done, v)
            converged = plateaued(val_hist, settings.patience, settings.min_delta)
        if done % settings.checkpoint_every == 0 or done == end or converged:
            save(done)
            saved = done
        if converged:
            end = done
            break
    if start >= end and not path.exists():
        save(start)
    best_step, best_loss = best_validation(val_hist)
    return TrainResult(
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        steps=max(start, end),
        checkpoint_path=str(path),
        validation=val_hist,
        converged=converged,
        best_step=best_step,
        best_validation_loss=best_loss,
    )
