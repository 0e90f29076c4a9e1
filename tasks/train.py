"""Training inside a build: a globally shuffled training set, then self-supervised fitting.

The training-set builder samples pixels with enough valid S2 observations from every tile
(each tile contributes up to ``pixels_per_tile``), pads their time series to a common length
with a validity mask and a per-pixel day of year, and shuffles them across tiles (TESSERA's
global shuffling), so a batch never comes from one neighbourhood. The trainer fits the
network with Barlow Twins plus the mix regulariser and writes a checkpoint carrying its
model spec; a re-run with the same inputs resumes from the last checkpoint.
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import numpy as np
import zarr

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
from tessera_model import ModelSpec, TrainingArrays, TrainSettings, fit

CODE = ("tasks.train", "tessera_model")
_FIELDS = ("s2", "s2_doy", "s2_valid", "s1", "s1_doy", "s1_valid")


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


def build_training_set(dpixels: list[DPixelRef], cfg: TrainingConfig, seed: int,
                       storage: StorageConfig) -> TrainingSetRef:
    """Sample pixels from every tile and write them globally shuffled to one Zarr group."""
    key = content_key("trainset", code_version(*CODE), sorted(d.key for d in dpixels),
                      cfg.pixels_per_tile, cfg.min_valid_s2, seed)
    uri = join(normalise(storage.work_uri), "training", f"{key}.zarr")
    if (done := is_done(uri, storage)) is not None:
        return TrainingSetRef.model_validate(done)
    remove(uri, storage)
    t2 = max(d.n_s2 for d in dpixels)
    t1 = max(d.n_s1_ascending + d.n_s1_descending for d in dpixels)
    parts = [_tile_samples(d, cfg, seed, storage, t2, t1) for d in sorted(dpixels, key=lambda d: d.tile.id)]
    data = {k: np.concatenate([p[k] for p in parts]) for k in _FIELDS}
    n = data["s2"].shape[0]
    if n == 0:
        raise ValueError(
            f"Expected pixels with at least training.min_valid_s2={cfg.min_valid_s2} valid S2 "
            "observations. Got none in any tile."
        )
    perm = np.random.default_rng(seed).permutation(n)
    out = zarr.open_group(zarr_store(uri, storage), mode="w")
    for k in _FIELDS:
        arr = data[k][perm]
        out.create_array(k, data=arr, chunks=(min(n, 4096),) + arr.shape[1:])
    ref = TrainingSetRef(uri=uri, key=key, n_pixels=n, n_tiles=len(dpixels))
    mark_done(uri, storage, ref)
    return ref


def load_training_set(ts: TrainingSetRef, storage: StorageConfig) -> TrainingArrays:
    g = zarr.open_group(zarr_store(ts.uri, storage, read_only=True), mode="r")
    return TrainingArrays(**{k: g[k][:] for k in _FIELDS})


def train_model(ts: TrainingSetRef, model: ModelConfig, cfg: TrainingConfig, seed: int,
                storage: StorageConfig) -> CheckpointRef:
    """Fit the network on a training set and store its checkpoint in work storage.

    The running checkpoint lives in the work root (local paths) or a local scratch folder
    (object stores), so a killed or retried run resumes from its last saved step.
    """
    spec = ModelSpec.preset(model.preset)
    settings = TrainSettings(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
        checkpoint_every=cfg.checkpoint_every, seed=seed, device=cfg.device,
    )
    key = content_key("train", code_version(*CODE), ts.key, spec, settings)
    root = join(normalise(storage.work_uri), "checkpoints", key)
    uri = join(root, "model.pt")
    if (done := is_done(root, storage)) is not None:
        return CheckpointRef.model_validate(done)
    local = "://" not in root
    scratch = Path(root if local else tempfile.mkdtemp(prefix="tessera-train-"))
    scratch.mkdir(parents=True, exist_ok=True)
    result = fit(spec, load_training_set(ts, storage), settings, str(scratch / "running.pt"), resume=True)
    fs, path = get_fs(uri, storage)
    if local:
        Path(result.checkpoint_path).replace(path)
    else:
        fs.put_file(result.checkpoint_path, path)
    ref = CheckpointRef(uri=uri, key=key, preset=model.preset,
                        model_version=f"{spec.version}-{key[:8]}", final_loss=float(result.final_loss))
    mark_done(root, storage, ref)
    return ref


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

