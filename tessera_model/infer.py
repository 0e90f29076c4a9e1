"""Batched, reproducible embedding of d-pixels with a :class:`TesseraModel`."""

from __future__ import annotations

import contextlib

import numpy as np
import numpy.typing as npt
import torch

from tessera_model.errors import InputShapeError
from tessera_model.inputs import gather_inputs, resolve_device
from tessera_model.model import TesseraModel
from tessera_model.sampling import sample_indices

S2_STREAM = 0
S1_STREAM = 1
MIN_FORWARD_ROWS = 64
"""Forward passes are padded to at least this many rows: below it, CPU BLAS picks other
kernels (another summation order), and a pixel's float result, hence its int8 bytes, would
depend on how many pixels shared its batch."""


def _check_shape(name: str, arr: npt.NDArray, shape: tuple[int | None, ...]) -> None:
    ok = arr.ndim == len(shape) and all(
        s is None or s == a for s, a in zip(shape, arr.shape, strict=True)
    )
    if not ok:
        want = tuple("*" if s is None else s for s in shape)
        raise InputShapeError(f"Expected {name} of shape {want}. Got {arr.shape}.")


def embed_pixels(
    model: TesseraModel,
    s2: npt.NDArray[np.uint16],
    s2_valid: npt.NDArray[np.bool_],
    s2_doy: npt.NDArray[np.uint16],
    s1: npt.NDArray[np.int16],
    s1_valid: npt.NDArray[np.bool_],
    s1_doy: npt.NDArray[np.uint16],
    s1_keys: npt.NDArray[np.int64],
    pixel_ids: npt.NDArray[np.uint64],
    seed: int,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    s2_keys: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.float32]:
    """Embed pixels; each pixel's result depends only on its data, id and the seed.

    ``spec.sample_steps`` valid steps are sampled per modality and pixel with
    :func:`sample_indices` (stream 0 for S2, 1 for S1), normalised with the v1.0 constants,
    given the raw DOY column and encoded under ``torch.inference_mode`` in batches of
    ``batch_size`` pixels (memory is bounded by the batch). On CUDA the model runs under
    bf16 autocast (attention through fused SDPA); on CPU in float32. The model is put in eval
    mode and moved to ``device``. On one device type, results are bit-identical whatever the
    batch size or the other pixels in the call (batches are padded to
    :data:`MIN_FORWARD_ROWS` rows so the same kernels run).

    Args:
        model: the model.
        s2: (N, T, 10) uint16 S2 DN with the +1000 offset already removed.
        s2_valid: (N, T) bool clear-sky mask.
        s2_doy: (T,) day of year of each S2 step.
        s1: (N, T1, 2) int16 S1 codes, ascending and descending concatenated.
        s1_valid: (N, T1) bool.
        s1_doy: (T1,) day of year of each S1 step.
        s1_keys: (T1,) int64 stable step keys (distinguish asc/desc steps of the same DOY).
        pixel_ids: (N,) uint64 stable pixel ids (e.g. row * width + col within the tile).
        seed: sampling seed.
        batch_size: pixels per forward pass.
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        s2_keys: (T,) int64 S2 step keys; default the DOY.

    Returns:
        (N, latent_dim) float32; NaN rows where either modality has no valid step.
    """
    n, t2 = s2_valid.shape[0], s2_valid.shape[-1]
    t1 = s1_valid.shape[-1]
    _check_shape("s2", s2, (n, t2, model.spec.s2_channels))
    _check_shape("s2_valid", s2_valid, (n, t2))
    _check_shape("s2_doy", s2_doy, (t2,))
    _check_shape("s1", s1, (n, t1, model.spec.s1_channels))
    _check_shape("s1_valid", s1_valid, (n, t1))
    _check_shape("s1_doy", s1_doy, (t1,))
    _check_shape("s1_keys", s1_keys, (t1,))
    _check_shape("pixel_ids", pixel_ids, (n,))
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Got {batch_size}.")
    keys2 = s2_doy.astype(np.int64) if s2_keys is None else np.asarray(s2_keys, np.int64)
    _check_shape("s2_keys", keys2, (t2,))

    dev = resolve_device(device)
    model.eval()
    model.to(dev)
    k = model.spec.sample_steps
    out = np.full((n, model.spec.latent_dim), np.nan, dtype=np.float32)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            v2, v1 = s2_valid[sl], s1_valid[sl]
            rows = np.nonzero(v2.any(axis=1) & v1.any(axis=1))[0]
            if rows.size == 0:
                continue
            ids = pixel_ids[sl][rows]
            i2 = sample_indices(v2[rows], k, ids, seed, S2_STREAM, keys2)
            i1 = sample_indices(v1[rows], k, ids, seed, S1_STREAM, s1_keys)
            x2 = torch.from_numpy(gather_inputs(s2[sl][rows], s2_doy, i2, "s2")).to(dev)
            x1 = torch.from_numpy(gather_inputs(s1[sl][rows], s1_doy, i1, "s1")).to(dev)
            m = rows.size
            if m < MIN_FORWARD_ROWS:
                pad = np.zeros(MIN_FORWARD_ROWS - m, dtype=np.int64)
                x2 = torch.cat([x2, x2[pad]])
                x1 = torch.cat([x1, x1[pad]])
            emb = model.encode(x2, x1)[:m]
            out[start + rows] = emb.float().cpu().numpy()
    return out
