"""Int8 CPU inference: dynamic quantisation with one activation scale per row (per token).

The dense layers that carry almost all the FLOP (band-embedding ``Linear(d, d)``, QKV, attention
output, both FFN layers, the GRU's input and recurrent maps) run as ``int8 x int8 -> int32`` matrix products
instead of float32 GEMMs: with AVX-512 VNNI through the fused kernel
:func:`tessera_model.cpu_kernels.gemm_i8` (product, epilogue, optional LayerNorm and the next
layer's int8 rows in one pass; :data:`USE_GEMM_I8`), else :func:`torch._int_mm` and the epilogue
kernel (the same bits):

- weights: symmetric int8 per output channel, ``s_w[n] = max_k |W[n, k]| / 127`` (once per
  model, cached);
- activations: symmetric int8 **per row** (one token of one pixel), ``s_x[m] = max_k |x[m, k]| /
  127``, ``q = round(x / s_x)`` (half to even);
- ``y[m, n] = s_x[m] s_w[n] sum_k q_x[m, k] q_w[n, k] + b[n]`` (the integer sum is exact).

Unlike torch's stock dynamic quantisation (one activation scale per tensor, i.e. per batch), a
row's result depends only on that row, so a pixel's embedding is the same whatever other pixels
share its batch (the project's rule: bit-identical whatever the batch size or tile split).
The GRU recurrence quantises its state's rows at every step (``h`` and ``r * h``, the same
rule; :meth:`tessera_model.pooling.TemporalAttentionPooling.forward_int8`, with AVX-512 VNNI
one compiled kernel for the input maps, the recurrence and the pooling). Attention scores,
softmax, LayerNorm, the gates' activations and the fusion head stay float32.
Accuracy against the float32 path: cosine >= 0.999 per pixel is tested
(``tests/model/test_cpu_inference.py``); speed in ``BENCHMARKS.md``.

The float32 dense layers of CPU inference are here too (:func:`linear`, :func:`cpu_weights`):
oneDNN GEMMs with weights packed once per model and bias, residual and ReLU fused
(:data:`USE_ONEDNN`), the GRU's maps included under ``fp32``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tessera_model import cpu_kernels
from tessera_model.cpu_kernels import Norm

PRECISIONS = ("fp32", "int8-dynamic")
"""Inference precisions of :meth:`TesseraModel.encode` (``int8-dynamic``: CPU only)."""
QMAX = 127.0
USE_GEMM_I8 = True
"""Run the int8 dense layers through the fused int8 GEMM kernel
(:func:`tessera_model.cpu_kernels.gemm_i8`: the product and its epilogue in one pass, the same
bits) where :func:`tessera_model.cpu_kernels.gemm_i8_available`; ``False``: ``torch._int_mm``
then the epilogue kernel."""
Quantised = tuple[Tensor, Tensor]
"""Rows already quantised: ``(q (M, K) int8, scale (M, 1) float32)``, as :func:`quantise_rows`."""


@dataclass(frozen=True)
class QuantisedWeight:
    """A ``Linear`` weight (N, K) as int8 (K, N) column-major-ready plus per-channel scales."""

    wq_t: Tensor  # (K, N) int8, the transposed quantised weight
    scale: Tensor  # (N,) float32
    bias: Tensor | None  # (N,) float32
    vnni: Tensor | None = None  # the weight packed for the fused int8 GEMM (pack_vnni)
    comp: Tensor | None = None  # (N,) int32, its column sums times 128 (pack_vnni)


@dataclass(frozen=True)
class PackedWeight:
    """A float32 ``Linear`` weight in oneDNN's blocked layout (``mkldnn`` tensor) plus bias.

    Packing once per model saves the reorder oneDNN otherwise makes on every call (about 5 %
    of a GEMM's time, and a fresh weight-sized buffer); the products are bit-identical to those
    with the plain weight.
    """

    weight: Tensor  # mkldnn tensor, the (N, K) weight reordered
    bias: Tensor | None  # (N,) float32


def pack_weight(weight: Tensor, bias: Tensor | None) -> PackedWeight:
    """Reorder a float32 (N, K) weight for oneDNN (:class:`PackedWeight`)."""
    w = weight.detach().float().contiguous()
    return PackedWeight(
        torch.ops.mkldnn._reorder_linear_weight(w),
        None if bias is None else bias.detach().float().contiguous(),
    )


def quantise_weight(weight: Tensor, bias: Tensor | None) -> QuantisedWeight:
    """Symmetric per-output-channel int8 of a (N, K) weight (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    wq = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    vnni, comp = pack_vnni(wq) if wq.shape[1] % 4 == 0 else (None, None)
    return QuantisedWeight(
        wq.t().contiguous(), scale.contiguous(),
        None if bias is None else bias.detach().float().contiguous(), vnni, comp,
    )  # fmt: skip


VNNI_PANEL = 32
"""Columns per panel of :func:`pack_vnni` (``kernels/gemm_i8.c``: NR)."""


def pack_vnni(wq: Tensor) -> tuple[Tensor, Tensor]:
    """Lay out an int8 (N, K) weight for the fused int8 GEMM (:func:`tessera_model.cpu_kernels.
    gemm_i8`, ``kernels/gemm_i8.c``): rows (output columns) padded with zeros to a multiple of
    16, cut into panels of 32 (the last of 16 when 16 remain), each stored as ``[K / 4][its
    columns][4]``; and ``comp = 128 * sum_k W[n, k]`` (int32, the offset of feeding the
    activations as unsigned ``q + 128``). K must be a multiple of 4."""
    n, k = wq.shape
    if k % 4:
        raise ValueError(f"Expected K a multiple of 4. Got {k}.")
    npad = -(-n // 16) * 16
    w = torch.zeros(npad, k, dtype=torch.int8)
    w[:n] = wq
    panels, n0 = [], 0
    while n0 < npad:
        width = VNNI_PANEL if npad - n0 >= VNNI_PANEL else 16
        panels.append(w[n0 : n0 + width].view(width, k // 4, 4).permute(1, 0, 2).reshape(-1))
        n0 += width
    comp = (wq.to(torch.int32).sum(dim=1) * 128).to(torch.int32)
    return torch.cat(panels).contiguous(), comp.contiguous()


def _buf(ws: dict | None, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if ws is None:
        return torch.empty(shape, dtype=dtype)
    key = (name, shape, dtype)
    if key not in ws:
        ws[key] = torch.empty(shape, dtype=dtype)
    return ws[key]


def quantise_rows(x: Tensor, ws: dict | None = None) -> Quantised:
    """Per-row symmetric int8 of a (M, K) float tensor: ``(q (M, K) int8, scale (M, 1))``.

    ``ws``: optional buffers reused between calls of one shape (no fresh multi-MB tensors).
    """
    if x.dtype == torch.float32 and x.is_contiguous() and cpu_kernels.available():
        q = _buf(ws, "q_i8", tuple(x.shape), torch.int8)
        scale = _buf(ws, "q_scale", (x.shape[0], 1), torch.float32)
        cpu_kernels.quantise_rows(x, q, scale)  # the same values in one pass
        return q, scale
    # max |x| per row as max(max x, -min x): the same value, about 25x faster on CPU than
    # torch.linalg.vector_norm(x, inf, dim=1) (0.07 against 1.8 ms for a (2560, 256) block)
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    tmp = torch.mul(x, scale.reciprocal(), out=_buf(ws, "q_f", tuple(x.shape), x.dtype))
    q = _buf(ws, "q_i8", tuple(x.shape), torch.int8)
    q.copy_(tmp.round_())  # |x / s| <= 127: no clamp needed
    return q, scale


def int8_linear(
    x: Tensor | None, qw: QuantisedWeight, out: Tensor | None = None, ws: dict | None = None,
    residual: Tensor | None = None, relu: bool = False, *, xq: Quantised | None = None,
    q_out: Quantised | None = None, float_out: bool = True, norm: Norm | None = None,
) -> Tensor | None:  # fmt: skip
    """``x @ W.T + b`` (then ``+ residual``, then ReLU) for a (M, K) float32 ``x`` through int8
    (module docstring).

    Args:
        x: (M, K) float32, any M >= 1 (``None`` when ``xq`` is given).
        qw: the layer's :class:`QuantisedWeight`.
        out: optional (M, N) float32 buffer.
        ws: optional workspace for the int8 input and the int32 product.
        residual: optional (M, N) float32 added after the bias.
        relu: apply ReLU last.
        xq: ``x`` already quantised (:func:`quantise_rows` of it, for instance made by the
            layer that produced ``x``): skips the quantisation.
        q_out: optional buffers that also receive :func:`quantise_rows` of the result (the
            next int8 layer's ``xq``).
        float_out: ``False`` (with ``q_out``): no float result; returns ``None``.
        norm: a LayerNorm's ``(weight, bias, eps)`` applied last (to the residual sum, the
            post-LN encoder layer's form; through the compiled LayerNorm kernel where
            available, else torch's); ``q_out`` then receives the normalised rows.

    Returns:
        (M, N) float32 (or ``None``, see ``float_out``). The quantisation and the epilogue
        run as one pass each through :mod:`tessera_model.cpu_kernels` where available (the
        same values).
    """
    if xq is None:
        if x is None:
            raise ValueError("Expected x or xq.")
        xq = quantise_rows(x, ws)
    q, sx = xq
    m, n = q.shape[0], qw.wq_t.shape[1]
    if not float_out and (q_out is None or norm is not None):
        raise ValueError("Expected q_out and no norm when float_out is False.")
    if (
        USE_GEMM_I8 and qw.vnni is not None and cpu_kernels.gemm_i8_available()
        and (out is None or out.is_contiguous()) and q.is_contiguous()
        and (residual is None or (residual.is_contiguous() and residual.dtype == torch.float32))
        and (float_out or n <= cpu_kernels.MAX_SCRATCH_ROW)
    ):  # fmt: skip
        y = None if not float_out else torch.empty(m, n) if out is None else out
        return cpu_kernels.gemm_i8(q, qw.vnni, qw.comp, qw.scale, sx, qw.bias, residual, relu,
                                   y, q_out, norm)  # fmt: skip
    if norm is not None:  # the product, then the LayerNorm (and its int8 rows)
        y = int8_linear(None, qw, out, ws, residual, relu, xq=xq)
        if cpu_kernels.available() and y.is_contiguous():
            return cpu_kernels.layer_norm(y, norm[0], norm[1], norm[2], y, q_out)
        y = F.layer_norm(y, (n,), norm[0], norm[1], norm[2])
        if q_out is not None:
            quantise_into(y, q_out)
        return y
    acc = torch._int_mm(q, qw.wq_t, out=_buf(ws, "acc", (m, n), torch.int32))
    if (
        cpu_kernels.available() and (out is None or out.is_contiguous())
        and (residual is None or (residual.is_contiguous() and residual.dtype == torch.float32))
        and (float_out or n <= cpu_kernels.MAX_SCRATCH_ROW)
    ):  # fmt: skip
        y = None if not float_out else torch.empty(m, n) if out is None else out
        return cpu_kernels.dequantise(acc, qw.scale, sx, qw.bias, residual, relu, y, q_out)
    y = torch.mul(acc, qw.scale, out=out) if out is not None else acc * qw.scale
    y = y.mul_(sx) if qw.bias is None else torch.addcmul(qw.bias, y, sx, out=y)
    if residual is not None:
        y.add_(residual)
    y = y.relu_() if relu else y
    if q_out is not None:
        quantise_into(y, q_out)
    return y if float_out else None


def quantise_into(x: Tensor, q_out: Quantised) -> None:
    """:func:`quantise_rows` of (M, K) float32 ``x`` into the buffers ``q_out``."""
    if cpu_kernels.available() and x.is_contiguous() and x.dtype == torch.float32:
        cpu_kernels.quantise_rows(x, *q_out)
        return
    q, s = quantise_rows(x)
    q_out[0].copy_(q)
    q_out[1].copy_(s)


def onednn_available() -> bool:
    """True where torch has oneDNN's fused CPU linear (``torch.ops.mkldnn._linear_pointwise``)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = bool(
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )
    return _ONEDNN


_ONEDNN: bool | None = None
USE_ONEDNN = True
"""Run the float32 dense layers of CPU inference through oneDNN (module :func:`linear`).

torch's own CPU ``addmm`` goes to MKL, which on AMD processors runs its AVX2 kernels: on the
2-core dev box (AMD EPYC, AVX-512) one thread reaches about 105 GFLOP/s there against about
240 through oneDNN, which picks its kernels by instruction set (``BENCHMARKS.md``, model
presets). ``False``: MKL ``addmm`` (the form before; same values to float32 rounding)."""


def linear(x: Tensor, lin_weight: Tensor, lin_bias: Tensor | None,
           qw: QuantisedWeight | PackedWeight | None, out: Tensor | None = None,
           ws: dict | None = None, *, relu: bool = False,
           residual: Tensor | None = None) -> Tensor:  # fmt: skip
    """``x @ W.T + b`` (then ``+ residual``, then ReLU) for CPU inference.

    ``qw`` a :class:`QuantisedWeight`: :func:`int8_linear`. A :class:`PackedWeight`, or float32
    without autograd on CPU where :func:`onednn_available` (and :data:`USE_ONEDNN`): oneDNN's
    fused linear (bias, residual and ReLU applied in the GEMM's epilogue; a fresh output).
    Otherwise ``addmm`` into ``out`` when given. Row ``m`` of the result depends only on row
    ``m`` of ``x`` (and of ``residual``) for a given shape: no reduction across rows.
    """
    if isinstance(qw, QuantisedWeight):
        return int8_linear(x, qw, out, ws, residual, relu)
    if isinstance(qw, PackedWeight) or (
        USE_ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu"
        and not torch.is_grad_enabled() and onednn_available()
    ):  # fmt: skip
        w, b = (qw.weight, qw.bias) if isinstance(qw, PackedWeight) else (lin_weight, lin_bias)
        if residual is not None:
            y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
            return y.relu_() if relu else y
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if relu else "none", [], "")
    if lin_bias is None:
        y = torch.mm(x, lin_weight.t(), out=out) if out is not None else x @ lin_weight.t()
    elif out is not None:
        y = torch.addmm(lin_bias, x, lin_weight.t(), out=out)
    else:
        y = torch.addmm(lin_bias, x, lin_weight.t())
    if residual is not None:
        y.add_(residual)
    return y.relu_() if relu else y


def _dense_layers(
    model: nn.Module, precision: str = "fp32"
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """(weight, bias) of the dense layers of both backbones and of the fusion head
    (``dim_reducer.head_0``/``head_4``, :func:`tessera_model.heads.head_linears`), by
    :func:`cpu_weights` key; the GRU's keys depend on ``precision``."""
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name in ("s2_backbone", "s1_backbone"):
        enc = getattr(model, name)
        out[f"{name}.embedding_in"] = (enc.embedding[0].weight, enc.embedding[0].bias)
        out[f"{name}.embedding"] = (enc.embedding[2].weight, enc.embedding[2].bias)
        for i, layer in enumerate(enc.transformer_encoder.layers):
            attn = layer.self_attn
            pre = f"{name}.layers.{i}"
            out[f"{pre}.in_proj"] = (attn.in_proj_weight, attn.in_proj_bias)
            out[f"{pre}.out_proj"] = (attn.out_proj.weight, attn.out_proj.bias)
            out[f"{pre}.linear1"] = (layer.linear1.weight, layer.linear1.bias)
            out[f"{pre}.linear2"] = (layer.linear2.weight, layer.linear2.bias)
        cell = getattr(getattr(enc.attn_pool, "temporal_context", None), "gru_cell", None)
        if cell is None:
            continue
        w_in = torch.cat([cell.W_ir.weight, cell.W_iz.weight, cell.W_ih.weight], dim=0)
        b_in = torch.cat([cell.b_r, cell.b_z, cell.b_h])
        w_rz = torch.cat([cell.W_hr.weight, cell.W_hz.weight], dim=0)
        if precision == "int8-dynamic":  # TemporalAttentionPooling.forward_int8
            out[f"{name}.gru_in"] = (w_in, b_in)
            out[f"{name}.gru_i8_rz"] = (w_rz, None)
            out[f"{name}.gru_i8_hh"] = (cell.W_hh.weight, None)
        elif _fused_scan(cell):  # small cells: tessera_model.pooling.scan_time_major
            from tessera_model.pooling import fused_scan_weights

            (w_xrz, b_rz), (w_h, b_h) = fused_scan_weights(cell)
            out[f"{name}.gru_xrz"] = (w_xrz, b_rz)
            out[f"{name}.gru_xh"] = (w_h, b_h)
        else:
            out[f"{name}.gru_in"] = (w_in, b_in)
            out[f"{name}.gru_rz"] = (w_rz, None)
            out[f"{name}.gru_hh2"] = (2.0 * cell.W_hh.weight.detach(), None)  # exact doubling
    head = getattr(model, "dim_reducer", None)
    if head is not None:  # the fusion head's Linears (tessera_model.heads.fusion_head_cpu)
        from tessera_model.heads import head_linears

        for key, lin in head_linears(head).items():
            out[f"dim_reducer.{key}"] = (lin.weight, lin.bias)
    return out


def _fused_scan(cell: nn.Module) -> bool:
    """Whether ``cell``'s CPU inference runs :func:`tessera_model.pooling.scan_time_major`."""
    from tessera_model.pooling import FUSED_SCAN_MAX_DIM

    w = cell.W_ir.weight
    return max(w.shape) <= FUSED_SCAN_MAX_DIM


FLOAT_ONLY = ("embedding_in", "head_0", "head_4")
"""Keys that stay float32 (packed for oneDNN) under ``int8-dynamic``: the 10- or 2-channel
band input map, and the fusion head's Linears (``dim_reducer.head_0``/``head_4``: one row per
pixel, under 1 % of the FLOP, so int8 would buy nothing and cost accuracy)."""


def cpu_weights(
    model: nn.Module, precision: str = "fp32"
) -> dict[str, QuantisedWeight | PackedWeight]:
    """Prepared weights of a TESSERA model's dense layers for CPU inference, cached on it.

    Keys: ``"<backbone>.{embedding_in,embedding}"``, ``"<backbone>.layers.<i>.{in_proj,
    out_proj,linear1,linear2}"`` and, for GRU pooling, under ``fp32``
    ``"<backbone>.{gru_in,gru_rz,gru_hh2}"`` (``gru_hh2``: twice ``W_hh``, for ``tanh(a) = 2
    sigmoid(2a) - 1``), or for cells up to :data:`tessera_model.pooling.FUSED_SCAN_MAX_DIM` wide
    ``"<backbone>.{gru_xrz,gru_xh}"`` (:func:`tessera_model.pooling.fused_scan_weights`), and
    under ``int8-dynamic`` ``"<backbone>.{gru_in,gru_i8_rz,gru_i8_hh}"`` (the stacked input,
    ``[W_hr; W_hz]`` and ``W_hh`` maps), for ``<backbone>`` in
    ``s2_backbone``/``s1_backbone``; and the fusion head's Linears ``"dim_reducer.head_0"``
    (and ``"dim_reducer.head_4"`` for v1.1/v2; :func:`tessera_model.heads.head_linears`).
    ``int8-dynamic``: :class:`QuantisedWeight` except the
    :data:`FLOAT_ONLY` keys; those and every key of ``fp32`` are :class:`PackedWeight` where
    :func:`onednn_available` (and :data:`USE_ONEDNN`), else absent (plain float32 ``addmm``).
    The cache is rebuilt when any parameter changed (its tensor version or identity).
    """
    params = list(model.parameters())
    stamp = (USE_ONEDNN, tuple((id(p), p._version) for p in params))
    caches = getattr(model, "_cpu_weights_cache", None)
    if caches is None:
        caches = {}
        object.__setattr__(model, "_cpu_weights_cache", caches)
    cached = caches.get(precision)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    pack = USE_ONEDNN and onednn_available()
    out: dict[str, QuantisedWeight | PackedWeight] = {}
    with torch.no_grad():
        for key, (w, b) in _dense_layers(model, precision).items():
            if precision == "int8-dynamic" and key.rsplit(".", 1)[-1] not in FLOAT_ONLY:
                out[key] = quantise_weight(w, b)
            elif pack:
                out[key] = pack_weight(w, b)
    caches[precision] = (stamp, out)
    return out


def quantised_weights(model: nn.Module) -> dict[str, QuantisedWeight | PackedWeight]:
    """:func:`cpu_weights` for ``int8-dynamic`` (the int8 dense layers)."""
    return cpu_weights(model, "int8-dynamic")


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` for an unknown precision or int8 on a non-CPU device."""
    if precision not in PRECISIONS:
        raise ValueError(f"Expected precision in {PRECISIONS}. Got {precision!r}.")
    if precision == "int8-dynamic" and device.type != "cpu":
        raise ValueError(
            f"Expected precision 'int8-dynamic' only on CPU (it uses the CPU int8 matmul). "
            f"Got device {device}."
        )
