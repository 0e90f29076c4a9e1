"""Training inside a build: a globally shuffled training set, then self-supervised fitting.

The training-set builder samples pixels with enough valid S2 observations from every tile
(each tile contributes up to ``pixels_per_tile``), pads their time series to a common length
with a validity mask and a per-pixel day of year, and shuffles them across tiles into
sharded Zarr groups (TESSERA's global shuffling), so a batch never comes from one
neighbourhood. The trainer streams the shards (two in memory at most) and fits the network
with Barlow Twins plus the mix regulariser, in one process or data parallel under torchrun,
and writes a checkpoint carrying its model spec; a re-run with the same inputs resumes from
the last checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from pydantic import BaseModel, SecretStr

from tasks.acquire import ORBITS
from tasks.config import ModelConfig, StorageConfig, TrainingConfig
from tasks.refs import CheckpointRef, DPixelRef, TrainingSetRef
from tasks.storage import (
    code_version,
    content_key,
    get_fs,
    is_done,
    join,
    mark_done,
    normalise,
    remove,
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

CODE = ("tasks.train", "tessera_model")
_FIELDS = ("s2", "s2_doy", "s2_valid", "s1", "s1_doy", "s1_valid")
TRAINSET_FORMAT = "tessera-factory-trainset-2"
"""Root attribute ``format`` of a sharded training set (version 1 was one unsharded group)."""
_STAGING_CHUNK = 4096
_SHARD_CHUNK = 4096


def _tile_samples(dp: DPixelRef, cfg: TrainingConfig, seed: int, storage: StorageConfig,
                  t2: int, t1: int) -> dict[str, np.ndarray]:
    """Pick eligible pixels of one tile and gather their padded series."""
    g = zarr.open_group(zarr_store(dp.uri, storage, read_only=True), mode="r")
    masks = g["masks"][:] > 0                      # (T, H, W)
    sar = [g[f"sar_{o}"] for o in ORBITS]
    s1_any = sum(((a[:] != 0).any(-1).sum(0) for a in sar), start=np.zeros(masks.shape[1:], int))
    ok = (masks.sum(0) >= cfg.min_valid_s2) & (s1_any >= 1)
    flat = np.flatnonzero(ok.ravel())
    rng = np.random.default_rng([seed, zlib.crc32(dp.tile.id.encode())])
    pick = np.sort(rng.choice(flat, size=min(cfg.pixels_per_tile, flat.size), replace=False))
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
                 t2: int, t1: int) -> TrainingArrays:
    return TrainingArrays(**_tile_samples(dp, cfg, seed, storage, t2, t1))


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
    s1_doy, s1_valid}`` with the shapes of :class:`tessera_model.TrainingArrays`.
    """
    key = content_key("trainset", code_version(*CODE), sorted(d.key for d in dpixels),
                      cfg.pixels_per_tile, cfg.min_valid_s2, cfg.shard_pixels, seed)
    uri = join(normalise(storage.work_uri), "training", f"{key}.zarr")
    if (done := is_done(uri, storage)) is not None:
        return TrainingSetRef.model_validate(done)
    remove(uri, storage)
    t2 = max(d.n_s2 for d in dpixels)
    t1 = max(d.n_s1_ascending + d.n_s1_descending for d in dpixels)
    n_buckets = _n_shards(dpixels, cfg)
    root = zarr.open_group(zarr_store(uri, storage), mode="w")
    staging = root.create_group("staging")
    buckets: dict[int, zarr.Group] = {}
    for dp in sorted(dpixels, key=lambda d: d.tile.id):
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
    root.attrs.update({"format": TRAINSET_FORMAT, "shard_sizes": sizes, "seed": seed})
    ref = TrainingSetRef(uri=uri, key=key, n_pixels=n_total, n_tiles=len(dpixels))
    mark_done(uri, storage, ref)
    return ref


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


def load_training_set(ts: TrainingSetRef, storage: StorageConfig) -> TrainingArrays:
    """All pixels of a training set in memory (small sets and tests; training streams)."""
    shards = ZarrShards(ts, storage)
    return concat_arrays([shards.read_shard(i) for i in range(len(shards.shard_sizes))])


def _settings(model: ModelConfig, cfg: TrainingConfig, seed: int) -> tuple[ModelSpec, TrainSettings]:
    spec = ModelSpec.preset(model.preset)
    settings = TrainSettings(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
        checkpoint_every=cfg.checkpoint_every, seed=seed, device=cfg.device,
    )
    return spec, settings


def fit_training_set(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                     storage: StorageConfig, checkpoint_path: str) -> TrainResult:
    """Fit on a training set, streaming its shards; data parallel under ``torchrun``.

    Every rank of an initialised process group calls this with the same arguments.
    """
    spec, settings = _settings(model, cfg, seed)
    return fit(spec, ZarrShards(ts, storage), settings, checkpoint_path, resume=True)


def train_model(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                storage: StorageConfig) -> CheckpointRef:
    """Fit the network on a training set and store its checkpoint in work storage.

    The running checkpoint lives in the work root (local paths) or a local scratch folder
    (object stores), so a killed or retried run resumes from its last saved step. With
    ``cfg.processes > 1`` the fit runs in that many data-parallel processes launched with
    torchrun (``python -m tasks.train``; NCCL on GPUs, gloo on CPU) and this call waits.
    """
    spec, settings = _settings(model, cfg, seed)
    key = content_key("train", code_version(*CODE), ts.key, spec, settings)
    root = join(normalise(storage.work_uri), "checkpoints", key)
    uri = join(root, "model.pt")
    if (done := is_done(root, storage)) is not None:
        return CheckpointRef.model_validate(done)
    local = "://" not in root
    scratch = Path(root if local else tempfile.mkdtemp(prefix="tessera-train-"))
    scratch.mkdir(parents=True, exist_ok=True)
    running = str(scratch / "running.pt")
    if cfg.processes > 1:
        run_torchrun(ts, model, cfg, seed, storage, running)
        final_loss = float(read_checkpoint(running)["losses"][-1])
    else:
        final_loss = float(fit_training_set(ts, model, cfg, seed, storage, running).final_loss)
    fs, path = get_fs(uri, storage)
    if local:
        Path(running).replace(path)
    else:
        fs.put_file(running, path)
    ref = CheckpointRef(uri=uri, key=key, preset=model.preset,
                        model_version=f"{spec.version}-{key[:8]}", final_loss=final_loss)
    mark_done(root, storage, ref)
    return ref


def _plain(cfg: BaseModel) -> dict[str, Any]:
    """A config as JSON-able data with secrets revealed (for a private 0600 file only)."""
    out = cfg.model_dump(mode="python")
    for name, value in out.items():
        if isinstance(value, SecretStr):
            out[name] = value.get_secret_value()
    return json.loads(json.dumps(out, default=str))


def run_torchrun(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                 storage: StorageConfig, checkpoint_path: str) -> None:
    """Run :func:`fit_training_set` in ``cfg.processes`` local processes under torchrun.

    The job is handed over in a private (0600) JSON file, deleted afterwards.

    Raises:
        ValueError: a ``memory://`` work store (not shared between processes).
        RuntimeError: the launcher failed (its exit status is named).
    """
    if storage.work_uri.startswith("memory://"):
        raise ValueError("Expected a work_uri shared between processes for training.processes "
                         f"> 1. Got {storage.work_uri!r}.")
    job = {"training_set": ts.model_dump(mode="json"), "model": model.model_dump(mode="json"),
           "training": cfg.model_dump(mode="json"), "seed": seed, "storage": _plain(storage),
           "checkpoint": checkpoint_path}
    fd, job_path = tempfile.mkstemp(prefix="tessera-train-job-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(job, fh)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.processes}", "-m", "tasks.train", job_path]
        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            raise RuntimeError(f"Expected torchrun to exit with 0. Got {rc} from: {' '.join(cmd)}")
    finally:
        Path(job_path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one training rank: ``python -m tasks.train JOB.json`` under torchrun.

    Multi-node: ``torchrun --nnodes N --nproc_per_node G --rdzv_endpoint HOST:PORT -m
    tasks.train JOB.json`` on every node, with a work store all nodes can read (e.g. S3).
    """
    import torch.distributed as dist

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.train JOB.json (under torchrun)", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    cfg = TrainingConfig.model_validate(job["training"])
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        fit_training_set(TrainingSetRef.model_validate(job["training_set"]),
                         ModelConfig.model_validate(job["model"]), cfg, int(job["seed"]),
                         StorageConfig.model_validate(job["storage"]), job["checkpoint"])
    finally:
        dist.destroy_process_group()
    return 0


def given_checkpoint(uri: str, model: ModelConfig, storage: StorageConfig) -> CheckpointRef:
    """A reference to an existing checkpoint (ours or official), keyed by its bytes' hash."""
    import hashlib

    fs, path = get_fs(uri, storage)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()[:20]
    return CheckpointRef(uri=uri, key=digest, preset=model.preset, model_version=f"{model.preset}-{digest[:8]}")



if __name__ == "__main__":
    raise SystemExit(main())
