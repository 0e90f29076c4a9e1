"""Deterministic embedding of d-pixels with a v1.1 model or a v2 student, batched by bin.

No random numbers: each stream of each pixel is turned into exactly ``bin`` tokens by the
version's own rule (:mod:`tessera_model.binning`), and pixels that share ``(S2 bin, S1 bin)``
are stacked into one rectangular forward pass, so no compute is spent on padded time steps
(``shared/reference/tessera-v2.md`` sections 2, 3 and 6).

Inputs per pixel (reference conventions):

- S2: standardised bands (the version's statistics, float32), then the raw day of year.
- S1: ascending and descending steps, each standardised with its own orbit's statistics, in
  the merged order given (ascending first); a step is valid where VV or VH is non-zero in the
  raw values.
- A stream with no valid step is fed as the reference does: all-zero tokens (standardised
  bands 0, DOY 0), one for v2 and eight for v1.1.
- A pixel with no valid step in either stream is no-data (NaN): the reference leaves such
  rows uninitialised (v2) or embeds zeros (v1.1); ours are marked (section 8, bug 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch

from tessera_model.binning import bin_size_v2, bin_size_v11, gather_positions
from tessera_model.infer import _check_shape, auto_batch_size
from tessera_model.inputs import resolve_device
from tessera_model.int8 import check_precision
from tessera_model.model import TesseraModel
from tessera_model.normalisation import band_stats

BINNED_MIN_ROWS = 16
"""Forward passes of a bin group are padded to at least this many rows, so the same CPU BLAS
kernels run whatever the group's size and a pixel's bytes never depend on its neighbours
(fewer than 8 rows changed results on the 2-core dev box; 16 leaves a margin). Smaller than
the v1.0 path's 64 (:data:`tessera_model.infer.MIN_FORWARD_ROWS`) because a block holds
dozens of bin groups: padding them all to 64 would waste compute on small blocks."""
EMPTY_STREAM_TOKENS = {"v2": 1, "v1.1": 8}
"""All-zero tokens fed for a stream with no valid step (reference: v2 one, v1.1 one bin of 8)."""


def stream_bins(n_valid: npt.NDArray[np.int64], family: str, max_steps: int) -> npt.NDArray:
    """Tokens per pixel of one stream: the family's bin, or the empty-stream token count.

    Args:
        n_valid: (N,) valid steps per pixel.

    Returns:
        (N,) int64 sequence lengths (>= 1).
    """
    if family == "v2":
        b = bin_size_v2(n_valid, max_steps)
    elif family == "v1.1":
        b = bin_size_v11(n_valid, max_steps)
    else:
        raise ValueError(f"Expected family 'v1.1' or 'v2'. Got {family!r}.")
    return np.where(np.asarray(n_valid) > 0, b, EMPTY_STREAM_TOKENS[family])


def _tokens(
    values: npt.NDArray,
    valid: npt.NDArray[np.bool_],
    doy: npt.NDArray,
    mean: npt.NDArray[np.float32],
    std: npt.NDArray[np.float32],
    length: int,
    family: str,
    rows: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.float32]:
    """Standardised tokens (G, length, C + 1) of a group sharing one sequence length.

    Only the group's chosen steps are read (one gather from the flattened ``(N T, C)``
    values), then standardised in place as ``(value - mean) / std`` in float32 over whole
    tokens of ``C + 1`` values (the DOY column as ``(doy - 0) / 1``, exact): the same
    operations per value, hence the same bits, as gathering whole rows and broadcasting the
    statistics over C, in under half the time.

    Args:
        values: (N, T, C) raw d-pixel values of the block (or of the group alone).
        valid: (N, T) bool.
        doy: (T,) day of year.
        mean, std: (C,) or (T, C) float32 statistics (per step for merged S1).
        length: the group's bin.
        rows: (G,) the group's rows of ``values``/``valid``; ``None``: all N.
    """
    n, t, c = values.shape
    if rows is None:
        rows = np.arange(n)
    v = valid[rows]
    g = rows.size
    has = v.any(axis=1)
    every = bool(has.all())
    if not every and not has.any():
        return np.zeros((g, length, c + 1), dtype=np.float32)
    if not every:
        v, rows = v[has], rows[has]
    idx = gather_positions(v, length, family)  # (G', length)
    flat = values.reshape(n * t, c)  # a view for a contiguous block (the caller makes it one)
    tok = np.empty((rows.size, length, c + 1), dtype=np.float32)
    tok[..., :c] = np.take(flat, rows[:, None] * t + idx, axis=0)  # as .astype(np.float32)
    tok[..., c] = np.asarray(doy)[idx]
    # the DOY column passes as (doy - 0) / 1 (exact); whole rows, no broadcast over C
    zero, one = (
        np.zeros((*mean.shape[:-1], 1), np.float32),
        np.ones((*std.shape[:-1], 1), np.float32),
    )
    mean_ext = np.concatenate([mean, zero], axis=-1)
    std_ext = np.concatenate([std, one], axis=-1)
    if mean.ndim == 2:  # per-step statistics (merged S1): (G', length, C + 1)
        np.subtract(tok, mean_ext[idx], out=tok)
        np.divide(tok, std_ext[idx], out=tok)
    else:
        whole = tok.reshape(rows.size, length * (c + 1))
        np.subtract(whole, np.tile(mean_ext, length), out=whole)
        np.divide(whole, np.tile(std_ext, length), out=whole)
    if every:
        return tok
    out = np.zeros((g, length, c + 1), dtype=np.float32)
    out[has] = tok
    return out


def _any_nonzero(values: npt.NDArray) -> npt.NDArray[np.bool_]:
    """(N, T) True where any of the last axis's C values is non-zero (a loop over C only)."""
    out = values[..., 0] != 0
    for ch in range(1, values.shape[-1]):
        out |= values[..., ch] != 0
    return out


def embed_pixels_binned(
    model: TesseraModel,
    s2: npt.NDArray[np.uint16],
    s2_valid: npt.NDArray[np.bool_],
    s2_doy: npt.NDArray[np.uint16],
    s1: npt.NDArray[np.int16],
    s1_doy: npt.NDArray[np.uint16],
    s1_descending: npt.NDArray[np.bool_],
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    bf16: bool = False,
    before_batch: Callable[[], None] | None = None,
    precision: str = "fp32",
) -> npt.NDArray[np.float32]:
    """Embed pixels with a v1.1 or v2 model; bit-identical whatever the batch size or split.

    Pixels are grouped by ``(S2 bin, S1 bin)`` (groups in ascending order of the pair); each
    group is encoded in forward passes of at most ``batch_size`` pixels, padded to
    :data:`BINNED_MIN_ROWS` rows so the same CPU kernels run whatever the group's size (a
    pixel's bytes never depend on its neighbours).

    Args:
        model: a model of family ``"v1.1"`` or ``"v2"``.
        s2: (N, T, 10) uint16 S2 DN with the +1000 offset removed.
        s2_valid: (N, T) bool clear-sky mask.
        s2_doy: (T,) day of year of each S2 step.
        s1: (N, T1, 2) int16 S1 codes, ascending steps then descending steps.
        s1_doy: (T1,) day of year of each S1 step.
        s1_descending: (T1,) bool, True for the descending steps.
        batch_size: pixels per forward pass; ``None``/0: from free memory per group length.
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
        bf16: run under bf16 autocast on CUDA (the v1.1 reference's GPU default; the v2
            reference runs fp32 only). Ignored on CPU.
        before_batch: called before every forward pass (stop hook); does not change results.
        precision: ``"fp32"`` or ``"int8-dynamic"`` (CPU only, :mod:`tessera_model.int8`).

    Returns:
        (N, embed_dim) float32; NaN rows for pixels with no valid step in either stream.
    """
    spec = model.spec
    family = spec.family
    n, t2 = s2_valid.shape[0], s2_valid.shape[-1]
    t1 = s1_doy.shape[0]
    _check_shape("s2", s2, (n, t2, spec.s2_channels))
    _check_shape("s2_doy", s2_doy, (t2,))
    _check_shape("s1", s1, (n, t1, spec.s1_channels))
    _check_shape("s1_descending", np.asarray(s1_descending), (t1,))
    if batch_size is not None and batch_size < 0:
        raise ValueError(f"Expected batch_size >= 0 (0 = automatic). Got {batch_size}.")
    stats = band_stats(spec.normalisation)
    s2_mean, s2_std = stats.s2()
    s1_mean, s1_std = stats.s1(np.asarray(s1_descending, bool))
    s2, s1 = np.ascontiguousarray(s2), np.ascontiguousarray(s1)  # _tokens gathers flat rows
    s1_valid = _any_nonzero(s1)  # raw values, before standardising
    n2, n1 = np.count_nonzero(s2_valid, axis=1), np.count_nonzero(s1_valid, axis=1)
    covered = (n2 > 0) | (n1 > 0)
    len2 = stream_bins(n2, family, spec.max_steps)
    len1 = stream_bins(n1, family, spec.max_steps)

    dev = resolve_device(device)
    check_precision(precision, dev)
    model.eval()
    model.to(dev)
    cuda = dev.type == "cuda"
    out = np.full((n, spec.embed_dim), np.nan, dtype=np.float32)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda and bf16 else contextlib.nullcontext()
    )
    keys = len2.astype(np.int64) * 4096 + len1
    with torch.inference_mode(), autocast:
        for key in np.unique(keys[covered]):
            b2, b1 = int(key // 4096), int(key % 4096)
            members = np.flatnonzero((keys == key) & covered)
            batch = batch_size or auto_batch_size(spec, dev, steps=max(b2, b1))
            for start in range(0, members.size, batch):
                if before_batch is not None:
                    before_batch()
                rows = members[start : start + batch]
                x2 = _tokens(s2, s2_valid, s2_doy, s2_mean, s2_std, b2, family, rows)
                x1 = _tokens(s1, s1_valid, s1_doy, s1_mean, s1_std, b1, family, rows)
                t2_, t1_ = torch.from_numpy(x2), torch.from_numpy(x1)
                if rows.size < BINNED_MIN_ROWS:
                    pad = np.zeros(BINNED_MIN_ROWS - rows.size, dtype=np.int64)
                    t2_, t1_ = torch.cat([t2_, t2_[pad]]), torch.cat([t1_, t1_[pad]])
                emb = model.encode(t2_.to(dev), t1_.to(dev), precision)[: rows.size]
                out[rows] = emb.float().cpu().numpy()
    return out
