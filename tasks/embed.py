"""Embedding generation: the frozen encoder over every pixel of a tile.

Reads a tile's d-pixels piece by piece (every timestep of a strip of whole chunk rows one
256-px square wide, :data:`STRIP_ROWS`), draws each pixel's temporal sample from a
counter-based hash of (seed, global pixel id, day of year), so a pixel's embedding does not
depend on batch size, piece or tile split, and writes float32
embeddings (H, W, 128) with NaN rows for no-data pixels: outside the tile's own UTM zone
band (native-UTM rule), not covered by the model version's reference coverage rule, or with
fewer valid observations than a stricter configured minimum.

Coverage per version (``shared/reference/tessera.md``; ``tessera-v2.md`` sections 3, 6, 8):

- v1.0 (presets ``v1`` and ``small``): a pixel is embedded when any of its S2 band values is
  non-zero and it has at least one valid S2 or S1 step; a modality with no valid step samples
  from all its steps (cloudy S2, zero S1); an orbit the tile has no S1 scene for is fed as one
  zero step at day 180, as the reference's loader does.
- v1.1 and v2: every pixel with at least one valid S2 or S1 step; an empty stream is fed as
  zero tokens; observations are selected deterministically (:mod:`tessera_model.binning`).
- A pixel with no valid observation at all is no-data in every version (the reference
  embeds uninitialised memory or zeros there).

The rule that made an embedding is recorded in its attributes (``coverage_rule``) and,
when published, in the zone store.

The whole tile is embedded, whatever part of it the build's region covers: the published
unit is the tile, so its content never depends on which region asked for it, and builds of
overlapping regions compose in one store (a re-publish of the same tile is a no-op).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import zarr

from tasks.acquire import ORBITS
from tasks.config import EmbeddingConfig, StorageConfig
from tasks.grid import PIXEL_M, Tile, native_mask
from tasks.publish.digest import ATTR as DIGEST_ATTR
from tasks.publish.digest import SQUARE, SquareDigest
from tasks.refs import CheckpointRef, DPixelRef, EmbeddingRef
from tasks.stop import arm_worker, check_stop
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    join,
    normalise,
    zarr_store,
)
from tessera_model import (
    ModelSpec,
    embed_pixels,
    embed_pixels_binned,
    is_own_format,
    model_from_checkpoint,
    read_checkpoint,
)

CODE = ("tasks.embed", "tasks.grid", "tasks.checkpoints", "tasks.publish.digest", "tessera_model")
S1_ORBIT_KEY = {"ascending": 0, "descending": 1000}
"""Added to an S1 day of year to make the sampling key of a step (asc/desc may share a DOY)."""
V1_EMPTY_ORBIT_DOY = 180
"""v1.0 reference: an orbit without any S1 scene is one all-zero step at day 180."""
STRIP_ROWS = 64
"""Least rows of a piece of the tile embedded at once. A piece is a run of whole d-pixel chunk
rows (``dpixels.chunk_px``, so no chunk is read twice) across one 256-px hash square (whole
chunks when a chunk is wider): with the default 64-px chunks, 64 x 256 pixels of every
timestep, about 24 MB of S2 for 73 dates, where a whole 256-px block was four times that and
its copies. At least this many rows, so small chunks do not make many small model calls."""


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
            from tasks.checkpoints import open_for_embedding

            with open_for_embedding(ckpt, storage) as f:
                obj = read_checkpoint(f)
            model, spec = model_from_checkpoint(
                obj, preset=None if is_own_format(obj) else ckpt.preset
            )
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


def model_family(ckpt: CheckpointRef) -> str:
    """The family of a checkpoint's preset (our own checkpoints are v1.0-family)."""
    return ModelSpec.preset(ckpt.preset).family


def embedding_uri(dp: DPixelRef, ckpt: CheckpointRef, cfg: EmbeddingConfig,
                  seed: int, storage: StorageConfig) -> tuple[str, str]:
    key = content_key("embed", code_version(*CODE), dp.key, ckpt.key,
                      cfg.coverage_rule(model_family(ckpt)), cfg.bf16, seed, cfg.precision)
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
    h, w, d = tile.height, tile.width, spec.embed_dim
    c = src["bands"].chunks[1]
    # uncompressed: an intermediate whose float32 mantissas zstd shrinks by < 10 %, read by
    # publishing at ~4x the speed (BENCHMARKS.md, publishing against its floor)
    emb = out.create_array("embedding", shape=(h, w, d), dtype="float32",
                           chunks=(c, c, d), fill_value=np.nan, compressors=None)
    digest = SquareDigest((h, w, d))  # the content hash, made here (tasks/publish/digest.py)
    s2_doy = src["doys"][:]
    orbit_doys = {o: src[f"sar_{o}_doy"][:] for o in ORBITS}
    v1_family = spec.family == "v1.0"
    # v1.0 reference: an orbit with no scene at all is one zero step at day 180.
    dummy = {o: v1_family and orbit_doys[o].size == 0 for o in ORBITS}
    doys = {o: np.array([V1_EMPTY_ORBIT_DOY], np.uint16) if dummy[o] else orbit_doys[o]
            for o in ORBITS}
    s1_doy = np.concatenate([doys[o] for o in ORBITS]).astype(np.uint16)
    s1_keys = np.concatenate([doys[o].astype(np.int64) + S1_ORBIT_KEY[o] for o in ORBITS])
    s1_desc = np.concatenate([np.full(doys[o].size, o == "descending") for o in ORBITS])
    rows_per, width = max(c, STRIP_ROWS), max(SQUARE, c)  # a piece: whole chunks, squares wide
    buf = np.empty((rows_per * width, d), np.float32)  # a piece's embeddings, reused
    n_valid = 0
    for y in range(0, h, rows_per):
        for x in range(0, w, width):
            check_stop(what)
            rows, cols = slice(y, min(h, y + rows_per)), slice(x, min(w, x + width))
            bh, bw = rows.stop - rows.start, cols.stop - cols.start
            n = bh * bw
            # (T, bh, bw, C) as read; (n, T, C) views of it (bh and bw merge without a copy)
            raw2 = src["bands"][:, rows, cols, :]
            s2 = np.moveaxis(raw2, 0, 2).reshape(n, -1, 10)
            s2_valid = np.moveaxis(src["masks"][:, rows, cols], 0, 2).reshape(n, -1) > 0
            s1 = np.concatenate([
                np.zeros((n, 1, 2), np.int16) if dummy[o] else
                np.moveaxis(src[f"sar_{o}"][:, rows, cols, :], 0, 2).reshape(n, -1, 2)
                for o in ORBITS], axis=1)  # fmt: skip
            s1_valid = s1.any(-1)
            n2, n1 = s2_valid.sum(1), s1_valid.sum(1)
            sel = inside[rows, cols].ravel().copy()  # (ravel may be a view of inside)
            sel &= (n2 > 0) | (n1 > 0)  # no observation at all: no-data in every version
            sel &= (n2 >= cfg.min_valid_s2) & (n1 >= cfg.min_valid_s1)  # stricter options
            if v1_family:  # the v1.0 reference skips all-zero S2 (no full-size temporary)
                sel &= raw2.any(axis=(0, 3)).ravel()
            del raw2
            piece = buf[:n]
            piece.fill(np.nan)
            idx = np.flatnonzero(sel)
            if idx.size:
                every = idx.size == n  # all pixels: the views as they are, no gathered copy
                s2_in, s2v_in = (s2, s2_valid) if every else (s2[idx], s2_valid[idx])
                s1_in, s1v_in = (s1, s1_valid) if every else (s1[idx], s1_valid[idx])
                # No lock: concurrent tiles of one process each run on their own share of
                # the cores (the task set this thread's torch threads, tasks/threads.py).
                if v1_family:
                    e = embed_pixels(
                        model, s2_in, s2v_in, s2_doy, s1_in, s1v_in, s1_doy, s1_keys,
                        pixel_ids(tile, rows, cols)[idx], seed=seed,
                        batch_size=cfg.batch_size, device=device, compile=cfg.compile,
                        before_batch=lambda: check_stop(what), all_steps_fallback=True,
                        precision=cfg.precision,
                    )
                else:
                    e = embed_pixels_binned(
                        model, s2_in, s2v_in, s2_doy, s1_in, s1_doy, s1_desc,
                        batch_size=cfg.batch_size, device=device, bf16=cfg.bf16,
                        before_batch=lambda: check_stop(what), precision=cfg.precision,
                    )
                if every:
                    piece[:] = e
                else:
                    piece[idx] = e
                del s2_in, s2v_in, s1_in, s1v_in, e
            del s2, s2_valid, s1, s1_valid
            out_piece = piece.reshape(bh, bw, d)
            emb[rows, cols, :] = out_piece
            digest.add(y, x, out_piece)
            n_valid += int(idx.size)
    out.attrs.update({"tile_id": tile.id, "crs": tile.crs, "transform": list(tile.transform),
                      "checkpoint_key": ckpt.key, "model_version": ckpt.model_version,
                      "model_preset": ckpt.preset, "model_family": spec.family,
                      "model_size": spec.size, "spec_version": spec.version,
                      "coverage_rule": cfg.coverage_rule(spec.family),
                      "inference": cfg.precision})
    if (sha := digest.hexdigest()) is not None:  # every block was hashed: always complete
        out.attrs[DIGEST_ATTR] = sha
    return EmbeddingRef(uri=uri, key=key, tile=tile, n_valid=n_valid, n_nodata=h * w - n_valid,
                        seconds=round(time.perf_counter() - t0, 3))
