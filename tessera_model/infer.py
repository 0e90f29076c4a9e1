"""Batched, reproducible embedding of d-pixels with a :class:`TesseraModel`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import torch

from tessera_model.errors import InputShapeError
from tessera_model.inputs import gather_inputs, resolve_device
from tessera_model.int8 import check_precision
from tessera_model.model import TesseraModel
from tessera_model.sampling import sample_indices
from tessera_model.spec import ModelSpec

S2_STREAM = 0
S1_STREAM = 1
MIN_FORWARD_ROWS = 64
"""Forward passes are padded to at least this many rows: below it, CPU BLAS picks other
kernels (another summation order), and a pixel's float result, hence its int8 bytes, would
depend on how many pixels shared its batch."""
AUTO_BATCH_MIN = 64
AUTO_BATCH_MAX = 8192
"""Cap of an automatic batch: an H200 runs v1 ``encode`` at 65k pixels/s at 4096 and 67k at
32768 (BENCHMARKS.md), so larger batches buy nothing and only coarsen the overlap of host
preparation with device compute (embed_pixels: 61.6k pixels/s at 4096, 55.4k at 32768)."""
CPU_BATCH_BUDGET_BYTES = 1 << 30
"""Activation budget of an automatic CPU batch: beyond a few hundred pixels CPU throughput
no longer grows (BENCHMARKS.md), so there is no point in using more memory."""
CUDA_FREE_FRACTION = 0.6
"""Share of the device's free memory an automatic CUDA batch may use (the rest covers the
allocator's fragmentation and other work on the card)."""


def _check_shape(name: str, arr: npt.NDArray, shape: tuple[int | None, ...]) -> None:
    ok = arr.ndim == len(shape) and all(
        s is None or s == a for s, a in zip(shape, arr.shape, strict=True)
    )
    if not ok:
        want = tuple("*" if s is None else s for s in shape)
        raise InputShapeError(f"Expected {name} of shape {want}. Got {arr.shape}.")


def activation_bytes_per_pixel(
    spec: ModelSpec, dtype_bytes: int = 4, steps: int | None = None
) -> int:
    """Upper estimate of the inference activation memory of one pixel (both modalities).

    Per modality and layer the live tensors are about the FFN hidden ``(T, ffn)``, a few
    ``(T, d)`` buffers (input, QKV, attention output, residuals) and the ``(heads, T, T)``
    scores; the estimate counts ``ffn + 8 d + heads * T`` values per step, twice (two
    modalities), in ``dtype_bytes`` (4: float32 on CPU; bf16 autocast keeps some fp32).
    ``steps`` is the sequence length (default ``spec.sample_steps``; a bin for v1.1/v2).
    """
    t, d = steps or spec.sample_steps, spec.d_model
    return 2 * t * (spec.ffn_dim + 8 * d + spec.n_heads * t) * dtype_bytes


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def auto_batch_size(
    spec: ModelSpec, device: str | torch.device | None = None, steps: int | None = None
) -> int:
    """Pixels per forward pass from the memory the device has free.

    CUDA: ``CUDA_FREE_FRACTION`` of ``torch.cuda.mem_get_info`` divided by
    :func:`activation_bytes_per_pixel`; CPU: ``CPU_BATCH_BUDGET_BYTES`` divided likewise.
    Rounded down to a power of two in ``[AUTO_BATCH_MIN, AUTO_BATCH_MAX]``.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = CUDA_FREE_FRACTION * free
    else:
        budget = CPU_BATCH_BUDGET_BYTES
    size = _pow2_floor(budget / activation_bytes_per_pixel(spec, steps=steps))
    return int(min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, size)))


def _prefetched(make: Callable[[int], object], starts: range, enabled: bool) -> Iterator[object]:
    """``make(start)`` for each start; with ``enabled``, the next one is built on a thread."""
    if not enabled or len(starts) < 2:
        for start in starts:
            yield make(start)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-prefetch") as pool:
        pending = pool.submit(make, starts[0])
        for nxt in list(starts[1:]) + [None]:
            ready = pending.result()
            if nxt is not None:
                pending = pool.submit(make, nxt)
            yield ready


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
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    s2_keys: npt.NDArray[np.int64] | None = None,
    compile: bool = False,
    prefetch: bool | None = None,
    before_batch: Callable[[], None] | None = None,
    all_steps_fallback: bool = False,
    precision: str = "fp32",
) -> npt.NDArray[np.float32]:
    """Embed pixels (v1.0 family); each pixel's result depends only on its data, id and seed.

    ``spec.sample_steps`` valid steps are sampled per modality and pixel with
    :func:`sample_indices` (stream 0 for S2, 1 for S1), normalised with the v1.0 constants,
    given the raw DOY column and encoded under ``torch.inference_mode`` in batches of
    ``batch_size`` pixels (memory is bounded by the batch, not by N). On CUDA the model runs
    under bf16 autocast (attention through fused SDPA) and the host prepares the next batch
    (sampling, gathering, pinned copy) on a thread while the device runs the current one; on
    CPU it runs in float32. The model is put in eval mode and moved to ``device``. On one
    device type, results are bit-identical whatever the batch size or the other pixels in
    the call (batches are padded to :data:`MIN_FORWARD_ROWS` rows so the same kernels run;
    with ``compile`` every batch is padded to ``batch_size`` rows, one compiled shape).

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
        batch_size: pixels per forward pass; ``None`` or 0: :func:`auto_batch_size`.
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        s2_keys: (T,) int64 S2 step keys; default the DOY.
        compile: run ``model.encode`` through ``torch.compile`` (worth it for large N on
            CUDA; the first call compiles).
        prefetch: prepare the next batch on a thread; default on for CUDA, off for CPU
            (where the thread would compete with the BLAS threads).
        before_batch: called before every forward pass; whatever it raises aborts the call
            (e.g. ``tasks.stop.check_stop``, so a stop request ends a long tile within one
            batch). It does not change any result.
        all_steps_fallback: the v1.0 reference's coverage (``shared/reference/tessera.md``;
            reference ``sample_s2_batch``/``sample_s1_batch``): a modality with no valid step
            samples from all its steps (cloudy S2, zero S1), so a pixel is embedded when
            either modality has a valid step. Off: both modalities need one.
        precision: ``"fp32"`` or ``"int8-dynamic"`` (CPU only: dense layers in int8 with
            per-row activation scales, :mod:`tessera_model.int8`; still independent of the
            batch).

    Returns:
        (N, embed_dim) float32; NaN rows for pixels not covered (see ``all_steps_fallback``).
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
    if batch_size is not None and batch_size < 0:
        raise ValueError(f"Expected batch_size >= 0 (0 = automatic). Got {batch_size}.")
    keys2 = s2_doy.astype(np.int64) if s2_keys is None else np.asarray(s2_keys, np.int64)
    _check_shape("s2_keys", keys2, (t2,))

    dev = resolve_device(device)
    check_precision(precision, dev)
    model.eval()
    model.to(dev)
    batch = batch_size or auto_batch_size(model.spec, dev)
    k = model.spec.sample_steps
    cuda = dev.type == "cuda"
    out = np.full((n, model.spec.embed_dim), np.nan, dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    encode = torch.compile(model.encode, dynamic=False) if compile else model.encode
    if precision != "fp32":
        encode = functools.partial(encode, precision=precision)
    min_rows = batch if compile else MIN_FORWARD_ROWS

    def prepare(start: int) -> tuple[int, np.ndarray, torch.Tensor, torch.Tensor] | None:
        sl = slice(start, min(start + batch, n))
        v2, v1 = s2_valid[sl], s1_valid[sl]
        has2, has1 = v2.any(axis=1), v1.any(axis=1)
        if all_steps_fallback:
            rows = np.nonzero((has2 | has1) & (t2 > 0) & (t1 > 0))[0]
            v2 = np.where(has2[:, None], v2, True)
            v1 = np.where(has1[:, None], v1, True)
        else:
            rows = np.nonzero(has2 & has1)[0]
        if rows.size == 0:
            return None
        ids = pixel_ids[sl][rows]
        i2 = sample_indices(v2[rows], k, ids, seed, S2_STREAM, keys2)
        i1 = sample_indices(v1[rows], k, ids, seed, S1_STREAM, s1_keys)
        x2 = torch.from_numpy(gather_inputs(s2, s2_doy, i2, "s2", start + rows))
        x1 = torch.from_numpy(gather_inputs(s1, s1_doy, i1, "s1", start + rows))
        if rows.size < min_rows:
            pad = np.zeros(min_rows - rows.size, dtype=np.int64)
            x2, x1 = torch.cat([x2, x2[pad]]), torch.cat([x1, x1[pad]])
        if cuda:
            x2, x1 = x2.pin_memory(), x1.pin_memory()
        return start, rows, x2, x1

    use_thread = cuda if prefetch is None else prefetch
    with torch.inference_mode(), autocast:
        for item in _prefetched(prepare, range(0, n, batch), use_thread):
            if before_batch is not None:
                before_batch()
            if item is None:
                continue
            start, rows, x2, x1 = item  # type: ignore[misc]
            x2, x1 = x2.to(dev, non_blocking=True), x1.to(dev, non_blocking=True)
            emb = encode(x2, x1)[: rows.size]
            out[start + rows] = emb.float().cpu().numpy()
    return out
