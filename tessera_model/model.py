"""The TESSERA two-tower model: S2 and S1 encoders, fusion to the embedding, training projector."""

from __future__ import annotations

import ctypes
import os
import platform

import torch
from torch import Tensor, nn

from tessera_model.backbone import ModalityEncoder
from tessera_model.errors import SpecError
from tessera_model.heads import fusion_head, fusion_head_cpu
from tessera_model.int8 import check_precision, cpu_weights
from tessera_model.pooling import FUSED_SCAN_MAX_DIM
from tessera_model.spec import ModelSpec

PROJECTOR_PREFIX = "projector."
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
"""glibc allocator settings made once by CPU inference (:func:`keep_freed_memory`)."""
_MALLOC_SET: bool | None = None
CPU_CHUNK_BYTES = 4 << 20
"""Target size of the largest activation of one CPU forward chunk (tokens x max(3d, FFN)
float32 values): small enough to stay in cache and in the allocator's reused heap (large
fresh buffers cost page faults on every call), large enough for efficient GEMMs."""
CPU_CHUNK_BYTES_GRU = 16 << 20
"""The same for the GRU-pooled families: their pooling runs one small step op after another
(six per step and stream), so larger chunks mean fewer ops per pixel; with several threads
each op is a thread barrier, which on a shared CPU costs far more than the cache misses
(``small`` at two threads on the loaded dev box: 512-pixel chunks 2.6x the pixels/s of
whole batches, 64-pixel chunks 0.3x; one thread: no difference between 64 and 256)."""
CPU_CHUNK_MIN, CPU_CHUNK_MAX = 8, 512
CPU_CHUNK_MIN_GRU = 32
"""Least chunk of the v1.0 family: each GRU step multiplies the chunk's hidden states by the
(d, 3d) recurrent weights, and with fewer rows the weights are re-read for too little work.
32, not more: v1's FFN activation of 64 pixels (42 MB) passes glibc's largest mmap threshold
(32 MB), so it would be mapped afresh and page-faulted on every layer (v1 one thread, oneDNN:
62 pixels/s with 16 or 32 rows, 56 with 64)."""
CPU_CHUNK_MIN_FUSED_GRU = 512
"""Least chunk of a v1.0-family model whose GRU runs the fused scan
(:func:`tessera_model.pooling.scan_time_major`, d up to
:data:`tessera_model.pooling.FUSED_SCAN_MAX_DIM`): its step GEMMs are short, and more rows per
step pay for their fixed cost (``small``, one stream at one thread: 392 ms per 4096 pixels in
512-pixel chunks, 417 in 256-pixel ones). The transformer of such a chunk still runs in pieces
of :data:`tessera_model.backbone.TRANSFORMER_CHUNK_BYTES`."""
CPU_CHUNK_MIN_V11 = 16
"""Least chunk of v1.1 (binned: the bin groups are padded to 16 rows anyway)."""


def keep_freed_memory() -> bool:
    """Let glibc reuse freed activation buffers instead of mapping fresh pages (once).

    The fused oneDNN layers of CPU inference return fresh multi-MB outputs. glibc maps each
    allocation above its mmap threshold afresh (and returns the top of its heap to the system
    above its trim threshold), so every layer of every chunk page-faults its output in again:
    23 % of ``small``'s CPU time in the kernel on the dev box. This raises the thresholds to
    :data:`MALLOC_MMAP_THRESHOLD` (glibc's largest) and :data:`MALLOC_TRIM_THRESHOLD`: such
    buffers come from the heap and freed ones are reused; the process keeps up to the trim
    threshold of freed heap mapped. Values only, never results. Left alone where the user set
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``, and outside
    glibc. Returns whether the settings are in place.
    """
    global _MALLOC_SET
    if _MALLOC_SET is None:
        _MALLOC_SET = False
        user = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
        if platform.libc_ver()[0] == "glibc" and not any(k in os.environ for k in user):
            try:
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                # M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1 (malloc.h)
                _MALLOC_SET = bool(mallopt(-3, MALLOC_MMAP_THRESHOLD)) and bool(
                    mallopt(-1, MALLOC_TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):
                pass
    return _MALLOC_SET


def cpu_chunk_rows(spec: ModelSpec, steps: int, precision: str = "fp32") -> int:
    """Pixels per CPU inference chunk for sequences of ``steps`` tokens (a power of two).

    A function of the spec and the sequence length only, never of the batch: every chunk
    has exactly this many rows (the last one padded), so every pixel goes through GEMMs of
    the same shapes whatever batch it came in, hence the same float bits. ``int8-dynamic``
    takes the same chunks (``precision`` is kept for callers): its memory-bound quantise and
    rescale passes stay in cache because the transformer of a chunk runs in pieces of
    :data:`tessera_model.backbone.TRANSFORMER_CHUNK_BYTES` (``small`` int8 at one thread: 0.77x
    fp32 with the former 64-pixel int8 chunks, 0.93x with 256; v1 1.85x and 2.03x).
    """
    per_pixel = max(1, int(steps)) * max(3 * spec.d_model, spec.ffn_dim) * 4
    budget = CPU_CHUNK_BYTES if spec.family == "v2" else CPU_CHUNK_BYTES_GRU
    rows = max(1, budget // per_pixel)
    rows = 1 << (rows.bit_length() - 1)
    # v1.0 runs whole blocks in one batch; v1.1 runs bin groups (often of a few dozen
    # pixels: a large least chunk would be mostly padding), v2 has no GRU.
    least = {"v1.0": CPU_CHUNK_MIN_GRU, "v1.1": CPU_CHUNK_MIN_V11}.get(spec.family, CPU_CHUNK_MIN)
    if spec.family == "v1.0" and spec.d_model <= FUSED_SCAN_MAX_DIM:
        least = CPU_CHUNK_MIN_FUSED_GRU
    return int(min(CPU_CHUNK_MAX, max(least, rows)))


class Projector(nn.Module):
    """Training-only Barlow Twins projector (keys ``net.{0,3,..}`` Linear, ``net.{1,4,..}`` BN).

    ``Linear(L, H) + BN + ReLU``, then ``projector_layers - 1`` x ``[Linear(H, H) + BN + ReLU]``,
    then ``Linear(H, H)``. Maps (B, L) -> (B, H).
    """

    def __init__(self, in_dim: int, hidden: int, n_blocks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(n_blocks):
            layers += [nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            dim = hidden
        layers.append(nn.Linear(dim, hidden))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L) -> (B, H)."""
        return self.net(x)


class TesseraModel(nn.Module):
    """A TESSERA model (v1.0, v1.1 or a v2 student) built from a :class:`ModelSpec`.

    Args:
        spec: hyper-parameters.
        with_projector: build the training projector (about 1.35 B parameters for v1; leave
            it out for inference).
    """

    def __init__(self, spec: ModelSpec, with_projector: bool = True) -> None:
        super().__init__()
        if with_projector and spec.family != "v1.0":
            raise SpecError(
                f"Expected with_projector=False for a {spec.family} model (only v1.0-family "
                "models train here). Got with_projector=True."
            )
        self.spec = spec
        self.s2_backbone = ModalityEncoder(spec.s2_channels, spec)
        self.s1_backbone = ModalityEncoder(spec.s1_channels, spec)
        self.dim_reducer = fusion_head(spec)
        self.projector: Projector | None = (
            Projector(spec.latent_dim, spec.projector_dim, spec.projector_layers)
            if with_projector
            else None
        )

    def encode(self, s2: Tensor, s1: Tensor, precision: str = "fp32") -> Tensor:
        """Embed pixels.

        Args:
            s2: (B, T2, s2_channels + 1) normalised S2 bands + raw DOY column.
            s1: (B, T1, s1_channels + 1) normalised S1 bands + raw DOY column.

        Returns:
            precision: ``"fp32"`` or ``"int8-dynamic"`` (CPU inference only: the dense
                layers in int8 with per-row activation scales, :mod:`tessera_model.int8`).

        Returns:
            (B, embed_dim) embeddings: the first ``embed_dim`` of the head's ``latent_dim``
            outputs (all of them except for v1.1, which keeps 128 of 192).

        On CPU without autograd in eval mode the batch runs in chunks of
        :func:`cpu_chunk_rows` pixels (the last one padded), through the CPU inference forms
        of the layers (``ModalityEncoder.forward_cpu``).
        """
        check_precision(precision, s2.device)
        cpu_infer = not self.training and not torch.is_grad_enabled() and s2.device.type == "cpu"
        if precision != "fp32" and not cpu_infer:
            raise SpecError(
                f"Expected precision {precision!r} only for CPU inference (eval mode, no "
                "autograd). Got a training or autograd call."
            )
        if not cpu_infer:
            return self._encode(s2, s1)
        # CPU inference: fixed-size chunks (module constant CPU_CHUNK_BYTES), last one padded
        n = s2.shape[0]
        rows = cpu_chunk_rows(self.spec, max(s2.shape[1], s1.shape[1]), precision)
        padded = -(-n // rows) * rows
        if padded != n:
            pad = torch.zeros(padded - n, dtype=torch.long)
            s2, s1 = torch.cat([s2, s2[pad]]), torch.cat([s1, s1[pad]])
        keep_freed_memory()
        ws: dict = {}
        qw = cpu_weights(self, precision)  # int8 or oneDNN-packed weights, cached
        if padded == rows:
            return self._encode_cpu(s2, s1, ws, qw)[:n]
        out = torch.empty(padded, self.spec.embed_dim, dtype=s2.dtype)
        for start in range(0, padded, rows):
            out[start : start + rows] = self._encode_cpu(
                s2[start : start + rows], s1[start : start + rows], ws, qw
            )
        return out[:n]

    def _encode_cpu(self, s2: Tensor, s1: Tensor, ws: dict, qw: dict | None) -> Tensor:
        fused = torch.cat(
            [
                self.s2_backbone.forward_cpu(s2, ws, qw, "s2_backbone"),
                self.s1_backbone.forward_cpu(s1, ws, qw, "s1_backbone"),
            ],
            dim=-1,
        )
        out = fusion_head_cpu(self.dim_reducer, fused, qw)
        return out if self.spec.embed_dim == self.spec.latent_dim else out[:, : self.spec.embed_dim]

    def _encode(self, s2: Tensor, s1: Tensor) -> Tensor:
        fused = torch.cat([self.s2_backbone(s2), self.s1_backbone(s1)], dim=-1)
        out = self.dim_reducer(fused)
        return out if self.spec.embed_dim == self.spec.latent_dim else out[:, : self.spec.embed_dim]

    def forward(self, s2: Tensor, s1: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: returns ``(embedding (B, L), projection (B, H))``."""
        if self.projector is None:
            raise SpecError("Expected a model built with_projector=True for forward(). Got none.")
        emb = self.encode(s2, s1)
        return emb, self.projector(emb)


def inference_state_dict(model: TesseraModel) -> dict[str, Tensor]:
    """The model's state dict without the training projector (the published v1.0 key set)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(PROJECTOR_PREFIX)}
