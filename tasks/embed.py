"""Embedding generation: the frozen encoder over every pixel of a tile.

Reads a tile's d-pixels block by block (every timestep of a square of pixels), draws each
pixel's temporal sample from a counter-based hash of (seed, global pixel id, day of year), so
a pixel's embedding does not depend on batch size, block or tile split, and writes float32
embeddings (H, W, 128) with NaN rows for no-data pixels: outside the tile's own UTM zone
band (native-UTM rule), or with fewer valid observations than configured.

The whole tile is embedded, whatever part of it the build's region covers: the published
unit is the tile, so its content never depends on which region asked for it, and builds of
overlapping regions compose in one store (a re-publish of the same tile is a no-op).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import zarr

from tasks.acquire import ORBITS
from tasks.config import EmbeddingConfig, StorageConfig
from tasks.grid import PIXEL_M, SHARD_PX, Tile, native_mask
from tasks.refs import CheckpointRef, DPixelRef, EmbeddingRef
from tasks.stop import arm_worker, check_stop
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    get_fs,
    join,
    normalise,
    zarr_store,
)
from tessera_model import embed_pixels, load_model

CODE = ("tasks.embed", "tasks.grid", "tessera_model")
_CPU_LOCK = threading.Lock()
S1_ORBIT_KEY = {"ascending": 0, "descending": 1000}
"""Added to an S1 day of year to make the sampling key of a step (asc/desc may share a DOY)."""


def pixel_ids(tile: Tile, rows: slice, cols: slice) -> np.ndarray:
    """Global ids of a window's pixels, uint64 (h*w,), identical whatever the tiling.

    id = ((zone*2 + south) << 40) | (northing index << 20) | easting index, where the
    indices count 10 m pixels from the zone's origin.
    """
    col = (tile.x0 // int(PIXEL_M)) + np.arange(cols.start, cols.stop, dtype=np.uint64)
    row = (tile.y0 // int(PIXEL_M)) - 1 - np.arange(rows.start, rows.stop, dtype=np.int64)
    zone = np.uint64(tile.zone * 2 + int(tile.south))
    rr, cc = np.meshgrid(row.astype(np.uint64), col, indexing="ij")
    return ((zone << np.uint64(40)) | (rr << np.uint64(20)) | cc).ravel()


class _ModelCache:
    """Loaded models of this process, keyed by (checkpoint URI, content key, device).

    The content key is the hash of the checkpoint's bytes (a given checkpoint) or of what
    trained it, so a checkpoint replaced at the same URI is loaded again. Storage options
    (which may hold credentials, and are not hashable) are not part of the key: they are
    resolved when a model is loaded. Holds at most ``size`` models.
    """

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._models: OrderedDict[tuple[str, str, str], tuple[Any, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ckpt: CheckpointRef, device: str, storage: StorageConfig) -> tuple[Any, Any, Any]:
        """``(model, spec, torch.device)`` of a checkpoint, loaded once per process."""
        key = (ckpt.uri, ckpt.key, device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            fs, path = get_fs(ckpt.uri, storage)
            with fs.open(path, "rb") as f:
                model, spec = load_model(f)
            import torch

            dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                               ("cpu" if device == "auto" else device))
            self._models[key] = (model.to(dev).eval(), spec, dev)
            while len(self._models) > self._size:
                self._models.popitem(last=False)
            return self._models[key]

    def clear(self) -> None:
        """Forget every loaded model."""
        with self._lock:
            self._models.clear()


_MODELS = _ModelCache()


def embedding_uri(dp: DPixelRef, ckpt: CheckpointRef, cfg: EmbeddingConfig,
                  seed: int, storage: StorageConfig) -> tuple[str, str]:
    key = content_key("embed", code_version(*CODE), dp.key, ckpt.key,
                      cfg.min_valid_s2, cfg.min_valid_s1, seed)
    return join(normalise(storage.work_uri), "embeddings", dp.tile.id, f"{key}.zarr"), key


def embed_tile(dp: DPixelRef, ckpt: CheckpointRef, cfg: EmbeddingConfig,
               seed: int, storage: StorageConfig) -> EmbeddingRef:
    """Embed every pixel of a tile (in its native zone); write float32 (H, W, D).

    Committed with :func:`~tasks.storage.commit_stage`: a stop request (checked per block
    and per batch) or a crash leaves no commit record, and the next run starts the tile
    again.

    Raises:
        StopRequested: the process was asked to stop (:mod:`tasks.stop`).
    """
    arm_worker()
    uri, key = embedding_uri(dp, ckpt, cfg, seed, storage)
    return commit_stage(uri, storage, EmbeddingRef,
                        lambda: _embed(dp, ckpt, cfg, seed, storage, uri, key))


def _embed(dp: DPixelRef, ckpt: CheckpointRef, cfg: EmbeddingConfig, seed: int,
           storage: StorageConfig, uri: str, key: str) -> EmbeddingRef:
    t0 = time.perf_counter()
    what = f"embedding of tile {dp.tile.id}"
    check_stop(what)
    model, spec, device = _MODELS.get(ckpt, cfg.device, storage)
    tile = dp.tile
    inside = native_mask(tile)
    src = zarr.open_group(zarr_store(dp.uri, storage, read_only=True), mode="r")
    out = zarr.open_group(zarr_store(uri, storage), mode="w")
    h, w, d = tile.height, tile.width, spec.latent_dim
    c = src["bands"].chunks[1]
    emb = out.create_array("embedding", shape=(h, w, d), dtype="float32",
                           chunks=(c, c, d), fill_value=np.nan)
    s2_doy = src["doys"][:]
    s1_doy = np.concatenate([src[f"sar_{o}_doy"][:] for o in ORBITS])
    s1_keys = np.concatenate([src[f"sar_{o}_doy"][:].astype(np.int64) + S1_ORBIT_KEY[o] for o in ORBITS])
    block = max(SHARD_PX, c)
    n_valid = 0
    for y in range(0, h, block):
        for x in range(0, w, block):
            check_stop(what)
            rows, cols = slice(y, min(h, y + block)), slice(x, min(w, x + block))
            bh, bw = rows.stop - rows.start, cols.stop - cols.start
            sel = inside[rows, cols].ravel()
            s2 = np.moveaxis(src["bands"][:, rows, cols, :], 0, 2).reshape(bh * bw, -1, 10)
            s2_valid = np.moveaxis(src["masks"][:, rows, cols], 0, 2).reshape(bh * bw, -1) > 0
            s1 = np.concatenate([np.moveaxis(src[f"sar_{o}"][:, rows, cols, :], 0, 2)
                                 .reshape(bh * bw, -1, 2) for o in ORBITS], axis=1)
            s1_valid = (s1 != 0).any(-1)
            sel &= (s2_valid.sum(1) >= cfg.min_valid_s2) & (s1_valid.sum(1) >= cfg.min_valid_s1)
            block_emb = np.full((bh * bw, d), np.nan, dtype=np.float32)
            idx = np.flatnonzero(sel)
            if idx.size:
                # On CPU torch already uses every core: concurrent tiles of one process take
                # turns rather than oversubscribe the cores (which stalls its thread pool).
                with _CPU_LOCK if device.type == "cpu" else contextlib.nullcontext():
                    block_emb[idx] = embed_pixels(
                        model, s2[idx], s2_valid[idx], s2_doy, s1[idx], s1_valid[idx], s1_doy,
                        s1_keys, pixel_ids(tile, rows, cols)[idx], seed=seed,
                        batch_size=cfg.batch_size, device=device, compile=cfg.compile,
                        before_batch=lambda: check_stop(what),
                    )
            emb[rows, cols, :] = block_emb.reshape(bh, bw, d)
            n_valid += int(idx.size)
    out.attrs.update({"tile_id": tile.id, "crs": tile.crs, "transform": list(tile.transform),
                      "checkpoint_key": ckpt.key, "model_version": ckpt.model_version})
    return EmbeddingRef(uri=uri, key=key, tile=tile, n_valid=n_valid, n_nodata=h * w - n_valid,
                        seconds=round(time.perf_counter() - t0, 3))
