"""Int8 CPU inference: dynamic quantisation with one activation scale per row (per token).

The dense layers that carry almost all the FLOP (band-embedding ``Linear(d, d)``, QKV, attention
output, both FFN layers, the GRU input maps) run as ``int8 x int8 -> int32`` matrix products
(:func:`torch._int_mm`, VNNI on x86) instead of float32 GEMMs:

- weights: symmetric int8 per output channel, ``s_w[n] = max_k |W[n, k]| / 127`` (once per
  model, cached);
- activations: symmetric int8 **per row** (one token of one pixel), ``s_x[m] = max_k |x[m, k]| /
  127``, ``q = round(x / s_x)`` (half to even);
- ``y[m, n] = s_x[m] s_w[n] sum_k q_x[m, k] q_w[n, k] + b[n]`` (the integer sum is exact).

Unlike torch's stock dynamic quantisation (one activation scale per tensor, i.e. per batch), a
row's result depends only on that row, so a pixel's embedding is the same whatever other pixels
share its batch (the project's rule: bit-identical whatever the batch size or tile split).
Attention scores, softmax, LayerNorm, the GRU recurrence and the fusion head stay float32.
Accuracy against the float32 path: cosine >= 0.999 per pixel is tested
(``tests/model/test_int8.py``); speed in ``BENCHMARKS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "int8-dynamic")
"""Inference precisions of :meth:`TesseraModel.encode` (``int8-dynamic``: CPU only)."""
QMAX = 127.0


@dataclass(frozen=True)
class QuantisedWeight:
    """A ``Linear`` weight (N, K) as int8 (K, N) column-major-ready plus per-channel scales."""

    wq_t: Tensor  # (K, N) int8, the transposed quantised weight
    scale: Tensor  # (N,) float32
    bias: Tensor | None  # (N,) float32


def quantise_weight(weight: Tensor, bias: Tensor | None) -> QuantisedWeight:
    """Symmetric per-output-channel int8 of a (N, K) weight (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    wq = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return QuantisedWeight(
        wq.t().contiguous(), scale.contiguous(), None if bias is None else bias.detach().float()
    )


def _buf(ws: dict | None, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if ws is None:
        return torch.empty(shape, dtype=dtype)
    key = (name, shape, dtype)
    if key not in ws:
        ws[key] = torch.empty(shape, dtype=dtype)
    return ws[key]


def quantise_rows(x: Tensor, ws: dict | None = None) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of a (M, K) float tensor: ``(q (M, K) int8, scale (M, 1))``.

    ``ws``: optional buffers reused between calls of one shape (no fresh multi-MB tensors).
    """
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    tmp = torch.mul(x, scale.reciprocal(), out=_buf(ws, "q_f", tuple(x.shape), x.dtype))
    q = _buf(ws, "q_i8", tuple(x.shape), torch.int8)
    q.copy_(tmp.round_())  # |x / s| <= 127: no clamp needed
    return q, scale


def int8_linear(
    x: Tensor, qw: QuantisedWeight, out: Tensor | None = None, ws: dict | None = None
) -> Tensor:
    """``x @ W.T + b`` for a (M, K) float32 ``x`` through int8 (module docstring).

    Args:
        x: (M, K) float32, any M >= 1.
        qw: the layer's :class:`QuantisedWeight`.
        out: optional (M, N) float32 buffer.
        ws: optional workspace for the int8 input and the int32 product.

    Returns:
        (M, N) float32.
    """
    q, sx = quantise_rows(x, ws)
    n = qw.wq_t.shape[1]
    acc = torch._int_mm(q, qw.wq_t, out=_buf(ws, "acc", (x.shape[0], n), torch.int32))
    y = torch.mul(acc, qw.scale, out=out) if out is not None else acc * qw.scale
    if qw.bias is None:
        return y.mul_(sx)
    return torch.addcmul(qw.bias, y, sx, out=y)


def linear(x: Tensor, lin_weight: Tensor, lin_bias: Tensor | None, qw: QuantisedWeight | None,
           out: Tensor | None = None, ws: dict | None = None) -> Tensor:  # fmt: skip
    """``x @ W.T + b`` in float32 (``qw`` None) or through :func:`int8_linear`."""
    if qw is not None:
        return int8_linear(x, qw, out, ws)
    if lin_bias is None:
        return torch.mm(x, lin_weight.t(), out=out) if out is not None else x @ lin_weight.t()
    if out is not None:
        return torch.addmm(lin_bias, x, lin_weight.t(), out=out)
    return torch.addmm(lin_bias, x, lin_weight.t())


def quantised_weights(model: nn.Module) -> dict[str, QuantisedWeight]:
    """Int8 weights of a TESSERA model's dense layers, cached on the model.

    Keys: ``"<backbone>.embedding"``, ``"<backbone>.layers.<i>.{in_proj,out_proj,linear1,
    linear2}"``, ``"<backbone>.gru_in"`` for ``<backbone>`` in ``s2_backbone``/``s1_backbone``.
    The cache is rebuilt when any parameter changed (its tensor version or identity).
    """
    params = list(model.parameters())
    stamp = tuple((id(p), p._version) for p in params)
    cached = getattr(model, "_int8_cache", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    out: dict[str, QuantisedWeight] = {}
    for name in ("s2_backbone", "s1_backbone"):
        enc = getattr(model, name)
        emb = enc.embedding[2]
        out[f"{name}.embedding"] = quantise_weight(emb.weight, emb.bias)
        for i, layer in enumerate(enc.transformer_encoder.layers):
            attn = layer.self_attn
            pre = f"{name}.layers.{i}"
            out[f"{pre}.in_proj"] = quantise_weight(attn.in_proj_weight, attn.in_proj_bias)
            out[f"{pre}.out_proj"] = quantise_weight(attn.out_proj.weight, attn.out_proj.bias)
            out[f"{pre}.linear1"] = quantise_weight(layer.linear1.weight, layer.linear1.bias)
            out[f"{pre}.linear2"] = quantise_weight(layer.linear2.weight, layer.linear2.bias)
        cell = getattr(getattr(enc.attn_pool, "temporal_context", None), "gru_cell", None)
        if cell is not None:
            w_in = torch.cat([cell.W_ir.weight, cell.W_iz.weight, cell.W_ih.weight], dim=0)
            b_in = torch.cat([cell.b_r, cell.b_z, cell.b_h])
            out[f"{name}.gru_in"] = quantise_weight(w_in, b_in)
    object.__setattr__(model, "_int8_cache", (stamp, out))
    return out


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` for an unknown precision or int8 on a non-CPU device."""
    if precision not in PRECISIONS:
        raise ValueError(f"Expected precision in {PRECISIONS}. Got {precision!r}.")
    if precision == "int8-dynamic" and device.type != "cpu":
        raise ValueError(
            f"Expected precision 'int8-dynamic' only on CPU (it uses the CPU int8 matmul). "
            f"Got device {device}."
        )
