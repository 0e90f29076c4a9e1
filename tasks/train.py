"""Training inside a build: a globally shuffled training set, then self-supervised fitting.

The training-set builder samples pixels with enough valid S2 observations from every tile
(each tile contributes up to ``pixels_per_tile``), pads their time series to a common length
with a validity mask and a per-pixel day of year, and shuffles them across tiles into
sharded Zarr groups (TESSERA's global shuffling), so a batch never comes from one
neighbourhood. ``validation_tiles`` whole tiles are held out of it: a sample of their pixels
is the validation set, whose loss is measured every ``validate_every`` steps and ends the
run once it has flattened (``patience``, ``min_delta``; ``steps`` is the cap). The trainer streams the shards (two in memory at most) and fits the network
with Barlow Twins plus the mix regulariser, in one process or data parallel under torchrun,
and writes a checkpoint carrying its model spec; a re-run with the same inputs resumes from
the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict, Field

from tasks.acquire import ORBITS
from tasks.config import ModelConfig, StorageConfig, TrainingConfig
from tasks.errors import StopRequested
from tasks.refs import CheckpointRef, DPixelRef, TrainingSetRef
from tasks.stop import arm_worker, check_stop, install_stop_handlers, stop_requested, watch_parent
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    get_fs,
    join,
    normalise,
    zarr_store,
)
from tessera_model import (
    ModelSpec,
    TrainingArrays,
    TrainResult,
    TrainSettings,
    fit,
    read_checkpoint,
)
from tessera_model.data import concat_arrays

CODE = ("tasks.train", "tasks.checkpoints", "tessera_model")
_FIELDS = ("s2", "s2_doy", "s2_valid", "s1", "s1_doy", "s1_valid")
TRAINSET_FORMAT = "tessera-factory-trainset-2"
"""Root attribute ``format`` of a sharded training set (version 1 was one unsharded group)."""
_STAGING_CHUNK = 4096
_SHARD_CHUNK = 4096
JOB_ENV = "TESSERA_TRAIN_JOB"
"""Environment variable that hands a training job (JSON, no secret) to torchrun ranks."""
PARENT_ENV = "TESSERA_TRAIN_PARENT"
"""Environment variable naming the process that launched torchrun; ranks stop if it ends."""
PROGRESS_MARK = "TESSERA_PROGRESS "
"""Prefix of the progress lines rank 0 prints for the launching process."""
PROGRESS_EVERY_S = 5.0
"""Progress is reported at least this often (and every tenth of the run, first and last step)."""
STOPPED_EXIT = 3
"""Exit status of a rank that stopped on request (its checkpoint holds the steps done)."""
TORCHRUN_GRACE_S = 20.0
"""Seconds torchrun gets to stop its ranks (which checkpoint) before it is killed."""

log = logging.getLogger("tasks.train")


def _tile_samples(dp: DPixelRef, cfg: TrainingConfig, seed: int, storage: StorageConfig,
                  t2: int, t1: int, n_pick: int | None = None) -> dict[str, np.ndarray]:
    """Pick eligible pixels of one tile and gather their padded series."""
    g = zarr.open_group(zarr_store(dp.uri, storage, read_only=True), mode="r")
    masks = g["masks"][:] > 0                      # (T, H, W)
    sar = [g[f"sar_{o}"] for o in ORBITS]
    s1_any = sum(((a[:] != 0).any(-1).sum(0) for a in sar), start=np.zeros(masks.shape[1:], int))
    ok = (masks.sum(0) >= cfg.min_valid_s2) & (s1_any >= 1)
    flat = np.flatnonzero(ok.ravel())
    rng = np.random.default_rng([seed, zlib.crc32(dp.tile.id.encode())])
    want = cfg.pixels_per_tile if n_pick is None else n_pick
    pick = np.sort(rng.choice(flat, size=min(want, flat.size), replace=False))
    yy, xx = np.unravel_index(pick, ok.shape)
    n = pick.size
    out = {
        "s2": np.zeros((n, t2, 10), np.uint16), "s2_doy": np.zeros((n, t2), np.uint16),
        "s2_valid": np.zeros((n, t2), bool), "s1": np.zeros((n, t1, 2), np.int16),
        "s1_doy": np.zeros((n, t1), np.uint16), "s1_valid": np.zeros((n, t1), bool),
    }
    t = masks.shape[0]
    out["s2"][:, :t] = g["bands"][:][:, yy, xx].transpose(1, 0, 2)
    out["s2_valid"][:, :t] = masks[:, yy, xx].T
    out["s2_doy"][:, :t] = g["doys"][:][None, :]
    off = 0
    for o, a in zip(ORBITS, sar, strict=True):
        vals = a[:][:, yy, xx].transpose(1, 0, 2)     # (n, Ta, 2)
        ta = vals.shape[1]
        out["s1"][:, off : off + ta] = vals
        out["s1_valid"][:, off : off + ta] = (vals != 0).any(-1)
        out["s1_doy"][:, off : off + ta] = g[f"sar_{o}_doy"][:][None, :]
        off += ta
    return out


def _tile_arrays(dp: DPixelRef, cfg: TrainingConfig, seed: int, storage: StorageConfig,
                 t2: int, t1: int, n_pick: int | None = None) -> TrainingArrays:
    return TrainingArrays(**_tile_samples(dp, cfg, seed, storage, t2, t1, n_pick))


def validation_tiles(dpixels: list[DPixelRef], cfg: TrainingConfig, seed: int) -> list[DPixelRef]:
    """The tiles held out of the training set for validation: ``cfg.validation_tiles`` of
    them (at most all but one; none for a one-tile build), chosen by a seeded hash of the
    tile id (the same tiles whatever the order of ``dpixels``)."""
    n = min(cfg.validation_tiles, len(dpixels) - 1)
    if n <= 0:
        return []
    ranked = sorted(dpixels, key=lambda d: (zlib.crc32(f"{seed}:{d.tile.id}".encode()), d.tile.id))
    return sorted(ranked[:n], key=lambda d: d.tile.id)


def _n_shards(dpixels: list[DPixelRef], cfg: TrainingConfig) -> int:
    """Shards for the largest possible set; actual shards average ``<= shard_pixels``."""
    return max(1, -(-len(dpixels) * cfg.pixels_per_tile // cfg.shard_pixels))


def build_training_set(dpixels: list[DPixelRef], cfg: TrainingConfig, seed: int,
                       storage: StorageConfig) -> TrainingSetRef:
    """Sample pixels from every tile and write them globally shuffled into sharded Zarr groups.

    Two passes, memory bounded by one tile's samples plus one shard: (1) each tile's
    samples are scattered to ``S`` staging buckets by a seeded uniform draw and appended
    there; (2) each bucket is shuffled and written as ``shards/<i>``. Each shard is thus a
    uniform random subset of all pixels in random order, and every batch mixes tiles
    (TESSERA's global shuffling). The root group's attributes list the shard sizes; the
    trainer streams the shards (:class:`ZarrShards`).

    Layout: ``<work>/training/<key>.zarr/shards/<00000..>/{s2, s2_doy, s2_valid, s1,
    s1_doy, s1_valid}`` with the shapes of :class:`tessera_model.TrainingArrays`. The tiles
    of :func:`validation_tiles` are not in the shards: up to ``cfg.validation_pixels`` of
    their pixels (shared equally, shuffled) are in ``validation/`` (same arrays), and the
    root attributes name them (``validation_tiles``, ``validation_size``).
    """
    key = content_key("trainset", code_version(*CODE), sorted(d.key for d in dpixels),
                      cfg.pixels_per_tile, cfg.min_valid_s2, cfg.shard_pixels, seed,
                      [d.tile.id for d in validation_tiles(dpixels, cfg, seed)],
                      cfg.validation_pixels)
    uri = join(normalise(storage.work_uri), "training", f"{key}.zarr")
    return commit_stage(uri, storage, TrainingSetRef,
                        lambda: _write_training_set(dpixels, cfg, seed, storage, uri, key))


def _write_training_set(dpixels: list[DPixelRef], cfg: TrainingConfig, seed: int,
                        storage: StorageConfig, uri: str, key: str) -> TrainingSetRef:
    t2 = max(d.n_s2 for d in dpixels)
    t1 = max(d.n_s1_ascending + d.n_s1_descending for d in dpixels)
    held = validation_tiles(dpixels, cfg, seed)
    held_ids = {d.tile.id for d in held}
    train_dps = [d for d in dpixels if d.tile.id not in held_ids]
    n_buckets = _n_shards(train_dps, cfg)
    root = zarr.open_group(zarr_store(uri, storage), mode="w")
    n_val = 0
    if held:
        per_tile = -(-cfg.validation_pixels // len(held))
        parts = [_tile_arrays(dp, cfg, seed, storage, t2, t1, per_tile) for dp in held]
        val = concat_arrays(parts)
        val = val.take(np.random.default_rng([seed, 3]).permutation(val.n_pixels)
                       [: cfg.validation_pixels])
        vg = root.create_group("validation")
        for k in _FIELDS:
            arr = getattr(val, k)
            vg.create_array(k, data=arr, chunks=(max(1, min(arr.shape[0], _SHARD_CHUNK)),)
                            + arr.shape[1:])
        n_val = val.n_pixels
    staging = root.create_group("staging")
    buckets: dict[int, zarr.Group] = {}
    for dp in sorted(train_dps, key=lambda d: d.tile.id):
        check_stop("the training set")
        arrays = _tile_arrays(dp, cfg, seed, storage, t2, t1)
        rng = np.random.default_rng([seed, zlib.crc32(dp.tile.id.encode()), 1])
        bucket = rng.integers(0, n_buckets, arrays.n_pixels)
        for b in np.unique(bucket):
            part = {k: getattr(arrays, k)[bucket == b] for k in _FIELDS}
            if b not in buckets:
                g = buckets[b] = staging.create_group(f"{b:05d}")
                for k, v in part.items():
                    g.create_array(k, shape=(0,) + v.shape[1:], dtype=v.dtype,
                                   chunks=(_STAGING_CHUNK,) + v.shape[1:])
            for k, v in part.items():
                buckets[b][k].append(v)
    sizes: list[int] = []
    shards = root.create_group("shards")
    for b in sorted(buckets):
        check_stop("the training set")
        g = buckets[b]
        n = g["s2"].shape[0]
        perm = np.random.default_rng([seed, int(b), 2]).permutation(n)
        out = shards.create_group(f"{len(sizes):05d}")
        for k in _FIELDS:
            arr = g[k][:][perm]
            out.create_array(k, data=arr, chunks=(min(n, _SHARD_CHUNK),) + arr.shape[1:])
        sizes.append(int(n))
    del root["staging"]
    n_total = sum(sizes)
    if n_total == 0:
        raise ValueError(
            f"Expected pixels with at least training.min_valid_s2={cfg.min_valid_s2} valid S2 "
            "observations. Got none in any tile."
        )
    root.attrs.update({"format": TRAINSET_FORMAT, "shard_sizes": sizes, "seed": seed,
                       "validation_tiles": sorted(held_ids), "validation_size": n_val})
    return TrainingSetRef(uri=uri, key=key, n_pixels=n_total, n_tiles=len(dpixels))


class ZarrShards:
    """The shards of a training set written by :func:`build_training_set` (a ``PixelShards``).

    Only the root attributes are read on construction; :meth:`read_shard` reads one shard.
    """

    def __init__(self, ts: TrainingSetRef, storage: StorageConfig) -> None:
        self._group = zarr.open_group(zarr_store(ts.uri, storage, read_only=True), mode="r")
        fmt = self._group.attrs.get("format")
        if fmt != TRAINSET_FORMAT:
            raise ValueError(
                f"Expected a training set of format {TRAINSET_FORMAT!r} at {ts.uri}. Got {fmt!r}."
            )
        self._sizes = [int(n) for n in self._group.attrs["shard_sizes"]]  # type: ignore[union-attr]

    @property
    def shard_sizes(self) -> list[int]:
        """Number of pixels in each shard."""
        return self._sizes

    def read_shard(self, index: int) -> TrainingArrays:
        """All pixels of shard ``index``."""
        g = self._group["shards"][f"{index:05d}"]
        return TrainingArrays(**{k: g[k][:] for k in _FIELDS})  # type: ignore[index]

    def validation(self) -> TrainingArrays | None:
        """The held-out tiles' pixels (``validation/``), or None when there are none."""
        if not int(self._group.attrs.get("validation_size", 0) or 0):  # type: ignore[arg-type]
            return None
        g = self._group["validation"]
        return TrainingArrays(**{k: g[k][:] for k in _FIELDS})  # type: ignore[index]


def load_training_set(ts: TrainingSetRef, storage: StorageConfig) -> TrainingArrays:
    """All pixels of a training set in memory (small sets and tests; training streams)."""
    shards = ZarrShards(ts, storage)
    return concat_arrays([shards.read_shard(i) for i in range(len(shards.shard_sizes))])


def _settings(model: ModelConfig, cfg: TrainingConfig, seed: int) -> tuple[ModelSpec, TrainSettings]:
    spec = ModelSpec.preset(model.preset)
    settings = TrainSettings(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
        checkpoint_every=cfg.checkpoint_every, seed=seed, device=cfg.device,
        validate_every=cfg.validate_every if cfg.validation_tiles else 0,
        patience=cfg.patience if cfg.validation_tiles else 0, min_delta=cfg.min_delta,
        view_fraction=cfg.view_fraction,
    )
    return spec, settings


class TrainProgress(BaseModel):
    """Where a training run stands (reported to :func:`train_model`'s ``progress``)."""

    model_config = ConfigDict(frozen=True)

    step: int = Field(description="Optimiser steps done (resumed ones included).")
    steps: int = Field(description="Steps of the whole run (the cap when a plateau stop may "
                       "end it sooner).")
    loss: float = Field(description="Loss of the last step.")
    validation_loss: float | None = Field(
        default=None, description="The latest loss on the held-out tiles' pixels (None "
        "before the first validation or without validation).")
    validation_step: int | None = Field(default=None, description="Step of validation_loss.")
    best_validation_loss: float | None = Field(default=None,
                                               description="Lowest validation loss so far.")
    converged: bool = Field(default=False, description="The validation loss has flattened: "
                            "training ends at this step.")
    seconds: float = Field(description="Seconds since this call started training.")
    seconds_left: float | None = Field(
        description="Estimated seconds to the last step, from this call's pace (None before "
        "the first step).")

    @property
    def fraction(self) -> float:
        """Share of the run done, 0..1."""
        return self.step / self.steps if self.steps else 1.0


ProgressFn = Callable[[TrainProgress], None]


def log_progress(p: TrainProgress) -> None:
    """The default progress report: one line on the ``tasks.train`` logger."""
    left = "?" if p.seconds_left is None else f"{p.seconds_left:.0f} s"
    log.info("training step %d/%d (%.0f%%), loss %.4f, %.0f s elapsed, about %s left%s",
             p.step, p.steps, 100 * p.fraction, p.loss, p.seconds, left, validation_text(p))


def progress_description(p: TrainProgress) -> str:
    """The training-progress artifact's description: steps, loss, validation."""
    out = f"Training step {p.step} of at most {p.steps}, loss {p.loss:.4f}"
    if p.validation_loss is not None:
        out += (f"; validation loss (held-out tiles) {p.validation_loss:.4f} at step "
                f"{p.validation_step}, best {p.best_validation_loss:.4f}")
    return out + ("; flattened: stopped" if p.converged else "")


def validation_text(p: TrainProgress) -> str:
    """``", validation loss X (best Y)"`` and ``"; flattened: stopping"``, or ``""``."""
    if p.validation_loss is None:
        return ""
    out = f", validation loss {p.validation_loss:.4f} (best {p.best_validation_loss:.4f})"
    return out + ("; flattened: stopping" if p.converged else "")


class _Reporter:
    """Turns fit's per-step ``log_fn(step, loss, lr)`` into throttled :class:`TrainProgress`.

    Reports the first step of the call, the last of the run, every tenth of the run and at
    least every ``PROGRESS_EVERY_S`` seconds.
    """

    def __init__(self, steps: int, report: ProgressFn, patience: int = 0,
                 min_delta: float = 0.0) -> None:
        self._steps, self._report = steps, report
        self._patience, self._min_delta = patience, min_delta
        self._every = max(1, steps // 10)
        self._t0 = time.monotonic()
        self._first: int | None = None
        self._last_t = 0.0
        self._loss = float("nan")
        self._val: list[tuple[int, float]] = []

    def validated(self, step: int, loss: float) -> None:
        """``on_validation`` of :func:`tessera_model.fit`: reported at once."""
        self._val.append((step, float(loss)))
        self._emit(step, self._loss, time.monotonic())

    def __call__(self, step: int, loss: float, lr: float = 0.0) -> None:
        now = time.monotonic()
        self._loss = float(loss)
        if self._first is None:
            self._first = step - 1
        due = (step == self._first + 1 or step == self._steps or step % self._every == 0
               or now - self._last_t >= PROGRESS_EVERY_S)
        if not due:
            return
        self._emit(step, loss, now)

    def _emit(self, step: int, loss: float, now: float) -> None:
        from tessera_model.train import best_validation, plateaued

        if self._first is None:
            self._first = step - 1
        self._last_t = now
        elapsed = now - self._t0
        done = step - self._first
        left = elapsed / done * (self._steps - step) if done > 0 else None
        last = self._val[-1] if self._val else (None, None)
        self._report(TrainProgress(step=step, steps=self._steps, loss=float(loss),
                                   seconds=round(elapsed, 1),
                                   seconds_left=None if left is None else round(left, 1),
                                   validation_step=last[0], validation_loss=last[1],
                                   best_validation_loss=best_validation(self._val)[1],
                                   converged=plateaued(self._val, self._patience,
                                                       self._min_delta)))


def fit_training_set(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                     storage: StorageConfig, checkpoint_path: str,
                     progress: ProgressFn | None = None,
                     on_checkpoint: Callable[[str, int], None] | None = None) -> TrainResult:
    """Fit on a training set, streaming its shards; data parallel under ``torchrun``.

    Every rank of an initialised process group calls this with the same arguments. Stops
    (with a checkpoint, ``stopped=True``) when this process is asked to
    (:func:`tasks.stop.stop_requested`).
    """
    spec, settings = _settings(model, cfg, seed)
    shards = ZarrShards(ts, storage)
    reporter = (_Reporter(settings.steps, progress, settings.patience, settings.min_delta)
                if progress is not None else None)
    return fit(spec, shards, settings, checkpoint_path, resume=True,
               log_fn=reporter, should_stop=stop_requested, on_checkpoint=on_checkpoint,
               validation=shards.validation() if settings.validate_every else None,
               on_validation=None if reporter is None else reporter.validated)


def _scratch_dir(root: str, key: str) -> Path:
    """Where the running checkpoint lives while training: the work root itself (local
    paths), else a local folder keyed by the training's content key (so a retry or a
    re-run on this machine finds it; it holds no secret)."""
    if "://" not in root:
        return Path(root)
    return Path(tempfile.gettempdir()) / "tessera-train" / key


def _uploader(remote: str, storage: StorageConfig) -> Callable[[str, int], None]:
    """``on_checkpoint`` that copies the running checkpoint to shared storage (one PUT,
    atomic on object stores), so any machine can resume the training."""

    def upload(path: str, step: int) -> None:
        fs, rpath = get_fs(remote, storage)
        fs.put_file(path, rpath)
        log.debug("running checkpoint (step %d) copied to %s", step, remote)

    return upload


def train_model(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                storage: StorageConfig, progress: ProgressFn | None = None) -> CheckpointRef:
    """Fit the network on a training set and store its checkpoint in work storage.

    Resumable wherever the work root is: the running checkpoint is saved every
    ``cfg.checkpoint_every`` steps, and when the process is asked to stop
    (:mod:`tasks.stop`), in ``{work}/checkpoints/{key}/running.pt`` (local work roots), or in
    a local scratch folder keyed by the content key and copied to that same URI after each
    save (object stores; downloaded at the start when present, so another machine resumes
    it). With ``cfg.processes > 1`` the fit runs in that many data-parallel processes
    launched with torchrun (``python -m tasks.train``; NCCL on GPUs, gloo on CPU) and this
    call waits, stopping them when this process is asked to stop.

    Args:
        ts: the training set.
        model: model preset.
        cfg: training settings.
        seed: seed of init, batches, views and mixing.
        storage: storage roots and S3 settings.
        progress: called with a :class:`TrainProgress` on the first step, every tenth of
            the run, at least every ``PROGRESS_EVERY_S`` seconds and on the last step, in
            the calling thread; default :func:`log_progress`.

    Raises:
        StopRequested: asked to stop; the steps done are checkpointed (resumable).
    """
    arm_worker()
    spec, settings = _settings(model, cfg, seed)
    key = content_key("train", code_version(*CODE), ts.key, spec, settings)
    root = join(normalise(storage.work_uri), "checkpoints", key)
    return commit_stage(root, storage, CheckpointRef,
                        lambda: _train(ts, model, cfg, seed, storage, progress or log_progress,
                                       root, key), clear=False)


def _train(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
           storage: StorageConfig, progress: ProgressFn, root: str, key: str) -> CheckpointRef:
    spec, _ = _settings(model, cfg, seed)
    uri = join(root, "model.pt")
    local = "://" not in root
    scratch = _scratch_dir(root, key)
    scratch.mkdir(parents=True, exist_ok=True)
    running = str(scratch / "running.pt")
    remote = None if local else join(root, "running.pt")
    if remote is not None:
        fs, rpath = get_fs(remote, storage)
        if fs.exists(rpath):
            fs.get_file(rpath, running)
            log.info("resuming training from %s", remote)
    check_stop("training")
    if cfg.processes > 1:
        run_torchrun(ts, model, cfg, seed, storage, running, progress=progress,
                     upload_to=remote)
        final_loss = float(read_checkpoint(running)["losses"][-1])
    else:
        result = fit_training_set(ts, model, cfg, seed, storage, running, progress=progress,
                                  on_checkpoint=None if remote is None else _uploader(remote, storage))
        if result.stopped:
            check_stop("training")
            raise StopRequested(f"Expected training to reach step {cfg.steps}. Got a stop at "
                                f"step {result.steps}.")
        final_loss = float(result.final_loss)
    fs, path = get_fs(uri, storage)
    if local:
        Path(running).replace(path)
    else:
        fs.put_file(running, path)
        rfs, rpath = get_fs(join(root, "running.pt"), storage)
        if rfs.exists(rpath):
            rfs.rm(rpath)
        shutil.rmtree(scratch, ignore_errors=True)
    return CheckpointRef(uri=uri, key=key, preset=model.preset,
                         model_version=f"{spec.version}-{key[:8]}", final_loss=final_loss)


def run_torchrun(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                 storage: StorageConfig, checkpoint_path: str,
                 progress: ProgressFn | None = None, upload_to: str | None = None) -> None:
    """Run :func:`fit_training_set` in ``cfg.processes`` local processes under torchrun.

    The job goes to the ranks in the ``TESSERA_TRAIN_JOB`` environment variable: configs
    and references only (configs hold no secret; each rank resolves its own credentials),
    and no file that could outlive a ``kill -9``. Rank 0 prints progress lines that are
    passed to ``progress`` here. When this process is asked to stop, torchrun gets SIGTERM
    (it stops its ranks, which checkpoint) and ``TORCHRUN_GRACE_S`` seconds before it is
    killed; ranks also stop if this process dies.

    Raises:
        ValueError: a ``memory://`` work store (not shared between processes).
        StopRequested: this process, or the ranks, were asked to stop.
        RuntimeError: the launcher failed (its exit status is named).
    """
    if storage.work_uri.startswith("memory://"):
        raise ValueError("Expected a work_uri shared between processes for training.processes "
                         f"> 1. Got {storage.work_uri!r}.")
    job = {"training_set": ts.model_dump(mode="json"), "model": model.model_dump(mode="json"),
           "training": cfg.model_dump(mode="json"), "seed": seed,
           "storage": storage.model_dump(mode="json"), "checkpoint": checkpoint_path,
           "upload_to": upload_to}
    from tasks.threads import child_env  # ranks share this task's torch threads

    env = {**os.environ, **child_env(torch.get_num_threads(), cfg.processes),
           JOB_ENV: json.dumps(job), PARENT_ENV: str(os.getpid())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={cfg.processes}", "-m", "tasks.train"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    reports: queue.Queue[TrainProgress] = queue.Queue()

    def read() -> None:
        if proc.stdout is None:
            return
        for line in proc.stdout:
            if line.startswith(PROGRESS_MARK):
                reports.put(TrainProgress.model_validate_json(line[len(PROGRESS_MARK):]))
            else:
                sys.stdout.write(line)

    reader = threading.Thread(target=read, name="tessera-torchrun-out", daemon=True)
    reader.start()
    stopping_since: float | None = None
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        while not reports.empty() and progress is not None:
            progress(reports.get_nowait())
        if stop_requested() and stopping_since is None:
            stopping_since = time.monotonic()
            proc.terminate()
        elif stopping_since is not None and time.monotonic() - stopping_since > TORCHRUN_GRACE_S:
            proc.kill()
    reader.join(timeout=5)
    while not reports.empty() and progress is not None:
        progress(reports.get_nowait())
    if stopping_since is not None or rc == STOPPED_EXIT:
        check_stop("training")
        raise StopRequested("Expected the training ranks to finish. Got a stop request in a rank.")
    if rc != 0:
        raise RuntimeError(f"Expected torchrun to exit with 0. Got {rc} from: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of one training rank under torchrun: ``python -m tasks.train``.

    The job (JSON) comes in ``TESSERA_TRAIN_JOB``. Multi-node: set it on every node and run
    ``torchrun --nnodes N --nproc_per_node G --rdzv_endpoint HOST:PORT -m tasks.train``,
    with a work store all nodes can read (e.g. S3). A rank stops (checkpointing the steps
    done) on SIGINT/SIGTERM or when the process in ``TESSERA_TRAIN_PARENT`` ends, and then
    exits with ``STOPPED_EXIT``.
    """
    import torch.distributed as dist

    raw = os.environ.get(JOB_ENV)
    if not raw:
        print(f"usage: {JOB_ENV}='{{...}}' python -m tasks.train (under torchrun)",
              file=sys.stderr)
        return 2
    job = json.loads(raw)
    install_stop_handlers(interrupt_main=False)
    if os.environ.get(PARENT_ENV):
        watch_parent(int(os.environ[PARENT_ENV]))
    cfg = TrainingConfig.model_validate(job["training"])
    storage = StorageConfig.model_validate(job["storage"])
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")

    def emit(p: TrainProgress) -> None:
        print(PROGRESS_MARK + p.model_dump_json(), flush=True)

    try:
        result = fit_training_set(
            TrainingSetRef.model_validate(job["training_set"]),
            ModelConfig.model_validate(job["model"]), cfg, int(job["seed"]), storage,
            job["checkpoint"], progress=emit,
            on_checkpoint=_uploader(job["upload_to"], storage) if job.get("upload_to") else None,
        )
    finally:
        dist.destroy_process_group()
    return STOPPED_EXIT if result.stopped else 0


def given_checkpoint(uri: str, model: ModelConfig, storage: StorageConfig) -> CheckpointRef:
    """A reference to an existing checkpoint (ours or official; local, s3:// or hf://), keyed
    by its bytes' SHA-256, verified and strictly loaded once (:mod:`tasks.checkpoints`)."""
    from tasks.checkpoints import given_checkpoint_ref

    return given_checkpoint_ref(uri, model, storage)


if __name__ == "__main__":
    raise SystemExit(main())
