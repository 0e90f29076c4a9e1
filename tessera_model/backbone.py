"""Per-modality encoder of TESSERA (v1.0, v1.1, v2): band embedding + DOY encoding + transformer
+ pooling (GRU attention pooling for v1.0/v1.1, query attention pooling for v2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tessera_model import cpu_kernels
from tessera_model.attention_pooling import QueryAttentionPooling
from tessera_model.encoding import doy_encoding
from tessera_model.errors import InputShapeError
from tessera_model.int8 import Quantised, QuantisedWeight, _buf, int8_linear, linear, quantise_into
from tessera_model.pooling import TemporalAttentionPooling
from tessera_model.spec import ModelSpec


class ModalityEncoder(nn.Module):
    """Encode one modality's sampled time series of a batch of pixels.

    Structure (keys as in the v1.0 checkpoint):

    - ``embedding``: ``Sequential(Linear(C, d), ReLU, Linear(d, d))``
    - fixed sin/cos encoding of the raw DOY, added to the embedding
    - ``transformer_encoder``: ``n_layers`` post-LN, ReLU, batch-first
      :class:`torch.nn.TransformerEncoderLayer` (no padding mask: T is fixed)
    - ``attn_pool``: :class:`TemporalAttentionPooling` (v1.0, v1.1) or
      :class:`QueryAttentionPooling` (v2)
    """

    def __init__(self, in_channels: int, spec: ModelSpec) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.d_model = spec.d_model
        self.embedding = nn.Sequential(
            nn.Linear(in_channels, spec.d_model),
            nn.ReLU(),
            nn.Linear(spec.d_model, spec.d_model),
        )
        layer = nn.TransformerEncoderLayer(
            d_model=spec.d_model,
            nhead=spec.n_heads,
            dim_feedforward=spec.ffn_dim,
            dropout=spec.dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,
        )
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=spec.n_layers, enable_nested_tensor=False
        )
        self.attn_pool: nn.Module = (
            QueryAttentionPooling(spec.d_model)
            if spec.family == "v2"
            else TemporalAttentionPooling(spec.d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Encode.

        Args:
            x: (B, T, C + 1): C normalised band values, then the raw day of year.

        Returns:
            (B, d_model) pooled representation.
        """
        if x.ndim != 3 or x.shape[-1] != self.in_channels + 1:
            raise InputShapeError(
                f"Expected input of shape (B, T, {self.in_channels + 1}). Got {tuple(x.shape)}."
            )
        bands = x[..., : self.in_channels]
        doy = x[..., self.in_channels]
        h = self.embedding(bands) + doy_encoding(doy, self.d_model).to(bands.dtype)
        h = self.transformer_encoder(h)
        return self.attn_pool(h)

    def forward_cpu(
        self, x: Tensor, workspace: dict | None = None, qweights: dict | None = None,
        prefix: str = "",
    ) -> Tensor:  # fmt: skip
        """CPU inference form of :meth:`forward` (same math, to float32 rounding).

        Each encoder layer runs through :func:`encoder_layer_cpu`; its large intermediates go
        into ``workspace`` buffers reused across calls of one chunk shape. With ``qweights``
        (:func:`tessera_model.int8.cpu_weights`, keys under ``prefix``) the dense layers
        run in int8 with per-row activation scales, or in float32 through oneDNN with
        pre-packed weights. With the ``gru_xrz``/``gru_xh`` keys (GRU cells up to
        :data:`tessera_model.pooling.FUSED_SCAN_MAX_DIM` wide) the transformer pieces write
        their outputs time-major into the buffer of
        :meth:`TemporalAttentionPooling.forward_time_major`, which pools them. Call without
        autograd, in eval mode.
        """
        ws = {} if workspace is None else workspace
        qw = qweights or {}
        b, t, _ = x.shape
        d = self.d_model
        per_pixel = t * max(3 * d, self.transformer_encoder.layers[0].linear1.out_features) * 4
        fit = 1 << max(0, (TRANSFORMER_CHUNK_BYTES // per_pixel).bit_length() - 1)
        sub = min(b, max(TRANSFORMER_MIN_ROWS, fit))
        if b % sub:
            sub = b
        pool = self.attn_pool
        w_rz8 = qw.get(f"{prefix}.gru_i8_rz")
        if isinstance(pool, TemporalAttentionPooling) and isinstance(w_rz8, QuantisedWeight):
            # int8: per piece, the transformer, the GRU input maps from its last layer's int8
            # rows, then the int8 recurrence and the pooling, while the piece is in cache
            # (the torch form, without the kernel, pools the whole chunk: its cost is per step)
            out = torch.empty(b, d, dtype=x.dtype)
            w_in, w_hh8 = qw[f"{prefix}.gru_in"], qw[f"{prefix}.gru_i8_hh"]
            step = sub if pool.int8_kernel_runs(w_in, w_rz8, w_hh8) else b
            for start in range(0, b, step):
                piece, pq = self._transformer_cpu(x[start : start + step], ws, qw, prefix, True)
                pool.forward_int8(piece, pq, w_in, w_rz8, w_hh8, out[start : start + step], ws)
            return out
        w_rz, w_h = qw.get(f"{prefix}.gru_xrz"), qw.get(f"{prefix}.gru_xh")
        if isinstance(pool, TemporalAttentionPooling) and t > 1 and w_rz is not None:
            # small GRU: each piece's outputs go time-major into the scan's buffer
            xh = pool.scan_buffer(ws, b, t, x)
            for start in range(0, b, sub):
                piece = self._transformer_cpu(x[start : start + sub], ws, qw, prefix)[0]
                xh[:t, start : start + sub, :d] = piece.transpose(0, 1)
            return pool.forward_time_major(xh, ws, w_rz, w_h)  # type: ignore[arg-type]
        if sub == b:
            h = self._transformer_cpu(x, ws, qw, prefix)[0]
        else:  # the GRU pooling's chunk in cache-sized pieces (same shapes every time)
            h = _buffer(ws, f"{prefix}.enc_out", (b, t, d), x)
            for start in range(0, b, sub):
                h[start : start + sub] = self._transformer_cpu(
                    x[start : start + sub], ws, qw, prefix
                )[0]
        if isinstance(self.attn_pool, TemporalAttentionPooling):
            rec = (qw.get(f"{prefix}.gru_rz"), qw.get(f"{prefix}.gru_hh2"))
            return self.attn_pool(h, ws, qw.get(f"{prefix}.gru_in"), rec)
        return self.attn_pool.forward_cpu(h)  # type: ignore[operator]

    def _transformer_cpu(
        self, x: Tensor, ws: dict, qw: dict, prefix: str, want_q: bool = False
    ) -> tuple[Tensor, Quantised | None]:
        """Band embedding, DOY encoding and the encoder layers of :meth:`forward_cpu`: the
        (B, T, d) output and, under int8 weights with ``want_q``, its int8 rows."""
        b, t, _ = x.shape
        d = self.d_model
        bands = x[..., : self.in_channels].reshape(b * t, self.in_channels)
        lin1, lin2 = self.embedding[0], self.embedding[2]
        e = linear(bands, lin1.weight, lin1.bias, qw.get(f"{prefix}.embedding_in"),
                   _buffer(ws, "e1", (b * t, d), x), ws, relu=True)  # fmt: skip
        pe = doy_encoding_cpu(x[..., self.in_channels], d).view(b * t, d)
        w_emb = qw.get(f"{prefix}.embedding")
        layers = self.transformer_encoder.layers
        # int8: each layer's input arrives quantised by its producer (_layer_q)
        hq = _layer_q(ws, b * t, d, "emb") if isinstance(w_emb, QuantisedWeight) else None
        if hq is not None:
            h = int8_linear(e, w_emb, ws=ws, residual=pe, q_out=hq)
        else:
            h = linear(e, lin2.weight, lin2.bias, w_emb, ws=ws, residual=pe)
        h = h.view(b, t, d)
        for i, layer in enumerate(layers):
            lq = {k: qw[f"{prefix}.layers.{i}.{k}"] for k in _LAYER_KEYS if qw}
            h, hq = _encoder_layer(layer, h, ws, lq or None, hq, want_q or i + 1 < len(layers))
        return h, hq


_LAYER_KEYS = ("in_proj", "out_proj", "linear1", "linear2")
TRANSFORMER_CHUNK_BYTES = 4 << 20
"""Largest activation (tokens x max(3d, FFN) float32) of one transformer piece in
:meth:`ModalityEncoder.forward_cpu`: a GRU-pooled chunk (large, for fewer pooling steps per
pixel) runs its transformer layers in pieces of this size, whose fresh GEMM outputs stay in
cache and in reused heap (``small`` one thread: a (2560, 256) FFN product 0.37 ms, a
(10240, 256) one 1.6-2.0 ms)."""
TRANSFORMER_MIN_ROWS = 32
"""Least pixels of such a piece: wide layers need enough rows per GEMM to pay for reading
their weights (v1 one thread: 58 pixels/s in 4-pixel pieces, 63 in whole 32-pixel chunks)."""
SDPA_MIN_HEAD_DIM = 128
"""Head widths from which fused SDPA beats two batched matmuls around a softmax on CPU (one
thread, per attention call: head 16 x 40 steps 0.78 vs 1.20 ms, 36 x 56 1.16 vs 1.27, 64 x 56
0.80 vs 0.88, 110 x 56 0.67 vs 0.69, 160 x 56 0.87 vs 0.87, 128 x 40 1.93 vs 1.86)."""
LOG2E = 1.4426950408889634
SOFTMAX_SUM_RANGE = (2.0**-100, 2.0**100)
"""Row sums of ``exp2`` within which :func:`softmax_exp2` skips the max subtraction."""


def softmax_exp2(scores: Tensor, out: Tensor) -> Tensor:
    """Softmax over the last axis of scores given in base-2 units (scaled by ``log2 e``).

    ``exp2`` is about 4.6x cheaper than ``exp`` in torch's CPU kernels, and the row maximum
    (which only guards the exponent's range) costs as much as the rest: rows are
    exponentiated as they are, and the whole call is redone with the maximum subtracted when
    any row sum leaves :data:`SOFTMAX_SUM_RANGE` (no overflow, no loss to subnormals).
    ``softmax(x) = exp2(x log2 e) / sum``: the same value as ``torch.softmax`` to float32
    rounding (about 6e-7 relative on 40-step rows). Writes into ``out`` (not ``scores``).
    """
    torch.exp2(scores, out=out)
    total = out.sum(dim=-1, keepdim=True)
    lo, hi = torch.aminmax(total)
    if not (float(lo) >= SOFTMAX_SUM_RANGE[0] and float(hi) <= SOFTMAX_SUM_RANGE[1]):
        torch.sub(scores, scores.amax(dim=-1, keepdim=True), out=out).exp2_()
        total = out.sum(dim=-1, keepdim=True)
    return out.div_(total)


DOY_TABLE_MAX = 366
_DOY_TABLES: dict[int, Tensor] = {}


def doy_encoding_cpu(doy: Tensor, d_model: int) -> Tensor:
    """:func:`doy_encoding` of a CPU inference batch, read from a table of days 0..366.

    The table holds the encoding of each integral day computed once with
    :func:`doy_encoding` (the same formula; each day's row is the same whatever batch it
    comes in, and the sines and cosines of a large batch, about 5 % of ``small``'s CPU time,
    become a gather). Non-integral or out-of-range days are computed directly.

    Args:
        doy: (..., T) float day of year.
        d_model: even encoding width.

    Returns:
        (..., T, d_model) float32.
    """
    table = _DOY_TABLES.get(d_model)
    if table is None:
        table = _DOY_TABLES[d_model] = doy_encoding(
            torch.arange(DOY_TABLE_MAX + 1, dtype=torch.float32), d_model
        )
    day = doy.to(torch.int64)
    if day.numel() and (
        int(day.min()) < 0
        or int(day.max()) > DOY_TABLE_MAX
        or not torch.equal(day.to(doy.dtype), doy)
    ):
        return doy_encoding(doy, d_model)
    # index_select: the same rows as table[day], 13 against 63 us for 2,560 days (one thread)
    return torch.index_select(table, 0, day.reshape(-1)).view(*day.shape, d_model)


def _buffer(ws: dict, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    key = (name, shape)
    buf = ws.get(key)
    if buf is None or buf.dtype != like.dtype:
        buf = ws[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


USE_ATTENTION_KERNEL = True
"""Run the attention of CPU inference through the compiled kernel
(:func:`tessera_model.cpu_kernels.attention`) where it is available; ``False``: torch's ops."""


def use_attention_kernel(qkv: Tensor) -> bool:
    """True when :func:`encoder_layer_cpu` runs its attention through the compiled kernel."""
    return (
        USE_ATTENTION_KERNEL and qkv.dtype == torch.float32 and qkv.device.type == "cpu"
        and qkv.is_contiguous() and cpu_kernels.available()
    )  # fmt: skip


def _layer_norm_cpu(x: Tensor, norm: nn.LayerNorm, out: Tensor,
                    q_out: Quantised | None = None) -> Tensor:  # fmt: skip
    """``norm(x)`` of (rows, d) float32 rows into ``out``: the compiled kernel
    (:func:`tessera_model.cpu_kernels.layer_norm`) where :func:`use_attention_kernel` holds for
    ``x``, else torch's (then ``out`` is not used). ``q_out``: buffers that also receive the
    result's int8 rows (:func:`tessera_model.int8.quantise_rows`)."""
    if use_attention_kernel(x):
        return cpu_kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, out, q_out)
    y = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    if q_out is not None:
        quantise_into(y, q_out)
    return y


def _layer_q(ws: dict, rows: int, width: int, name: str) -> Quantised:
    """Workspace buffers for int8 rows and their scales (:data:`tessera_model.int8.Quantised`)."""
    return (_buf(ws, f"{name}_q", (rows, width), torch.int8),
            _buf(ws, f"{name}_s", (rows, 1), torch.float32))  # fmt: skip


def encoder_layer_cpu(
    layer: nn.TransformerEncoderLayer, x: Tensor, ws: dict | None = None,
    qweights: dict[str, QuantisedWeight] | None = None,
) -> Tensor:  # fmt: skip
    """Inference forward of a post-LN ReLU encoder layer on CPU (no dropout, no mask).

    The math of :class:`torch.nn.TransformerEncoderLayer` in eval mode: one QKV GEMM over
    all tokens, attention (the compiled kernel, :func:`tessera_model.cpu_kernels.attention`,
    where :func:`use_attention_kernel`; else fused SDPA on strided views of the QKV output for
    heads of at least :data:`SDPA_MIN_HEAD_DIM`, or scaled ``baddbmm``, :func:`softmax_exp2`,
    ``bmm``),
    output projection with the residual added in its epilogue, LayerNorm, FFN (GEMM with
    fused ReLU, GEMM with the residual), LayerNorm; the GEMMs through
    :func:`tessera_model.int8.linear` (oneDNN, int8, or ``addmm``). The large intermediates
    of the attention go into ``ws`` buffers (reused across chunks). Agrees with torch's own
    inference fast path to float32 rounding (about 1e-6 at unit scale); a pixel's result
    depends only on its own rows for a given batch shape.

    Args:
        layer: the encoder layer (``batch_first``, ``norm_first=False``, ReLU).
        x: (B, T, d) float tokens.
        ws: workspace dict (buffers by name and shape); ``None``: allocate.
        qweights: int8 weights of ``in_proj``, ``out_proj``, ``linear1``, ``linear2``
            (:mod:`tessera_model.int8`); ``None``: float32.

    Returns:
        (B, T, d).
    """
    return _encoder_layer(layer, x, ws, qweights)[0]


def _encoder_layer(
    layer: nn.TransformerEncoderLayer, x: Tensor, ws: dict | None,
    qweights: dict[str, QuantisedWeight] | None, xq: Quantised | None = None,
    want_q: bool = False,
) -> tuple[Tensor, Quantised | None]:  # fmt: skip
    """:func:`encoder_layer_cpu`; under int8 weights, also takes ``x``'s int8 rows (``xq``)
    and, with ``want_q``, returns the output's (the next layer's input) beside it: every int8
    input is made by the kernel that produced its float rows, while they are in cache (the
    values of quantising them afterwards)."""
    ws = {} if ws is None else ws
    qw = qweights or {}
    b, t, d = x.shape
    attn = layer.self_attn
    heads = attn.num_heads
    dh = d // heads
    h = x.reshape(b * t, d)
    int8 = isinstance(qw.get("linear1"), QuantisedWeight)
    qkv_buf = _buffer(ws, "qkv", (b * t, 3 * d), h)
    if int8 and xq is not None:
        qkv = int8_linear(None, qw["in_proj"], qkv_buf, ws, xq=xq)
    else:
        qkv = linear(h, attn.in_proj_weight, attn.in_proj_bias, qw.get("in_proj"), qkv_buf, ws)
    att_q = None
    if use_attention_kernel(qkv):
        att_q = _layer_q(ws, b * t, d, "att") if int8 else None
        a = cpu_kernels.attention(qkv, b, t, heads, dh, _buffer(ws, "a_tok", (b * t, d), h), att_q)
    elif dh >= SDPA_MIN_HEAD_DIM:
        q, k, v = qkv.view(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * t, d)
    else:
        qkv_h = _buffer(ws, "heads", (3, b, heads, t, dh), h)
        qkv_h.copy_(qkv.view(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4))
        q, k, v = qkv_h.view(3, b * heads, t, dh).unbind(0)
        scores = _buffer(ws, "scores", (b * heads, t, t), h)
        alpha = dh**-0.5 * LOG2E  # scores in base-2 units for softmax_exp2
        torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=alpha, out=scores)
        probs = softmax_exp2(scores, _buffer(ws, "probs", (b * heads, t, t), h))
        a = torch.bmm(probs, v, out=_buffer(ws, "a", (b * heads, t, dh), h))
        a = a.view(b, heads, t, dh).transpose(1, 2).reshape(b * t, d)
    out_proj = attn.out_proj
    ln1 = _buffer(ws, "ln1", (b * t, d), h)
    ffn = layer.linear1.out_features
    if int8:
        # int8: every GEMM ends in the next one's int8 rows, the post-LN LayerNorms run in the
        # GEMM's epilogue (the residual sums never go to memory un-normalised), and the FFN's
        # hidden rows only ever exist as int8
        ln1_q = _layer_q(ws, b * t, d, "ln1")
        h = int8_linear(a, qw["out_proj"], ln1, ws, residual=h, xq=att_q, q_out=ln1_q,
                        norm=_norm(layer.norm1))  # fmt: skip
        fq = _layer_q(ws, b * t, ffn, "ffn")
        int8_linear(h, qw["linear1"], None, ws, relu=True, xq=ln1_q, q_out=fq, float_out=False)
        out_q = _layer_q(ws, b * t, d, "out") if want_q else None
        o = int8_linear(None, qw["linear2"], torch.empty_like(h), ws, residual=h, xq=fq,
                        q_out=out_q, norm=_norm(layer.norm2))  # fmt: skip
        return o.view(b, t, d), out_q
    o = linear(a, out_proj.weight, out_proj.bias, qw.get("out_proj"),
               _buffer(ws, "o", (b * t, d), h), ws, residual=h)  # fmt: skip
    h = _layer_norm_cpu(o, layer.norm1, ln1)
    f = linear(h, layer.linear1.weight, layer.linear1.bias, qw.get("linear1"),
               _buffer(ws, "ffn", (b * t, ffn), h), ws, relu=True)  # fmt: skip
    o = linear(f, layer.linear2.weight, layer.linear2.bias, qw.get("linear2"), o, ws, residual=h)
    o = _layer_norm_cpu(o, layer.norm2, torch.empty_like(o))  # fresh: the layer's output
    return o.view(b, t, d), None


def _norm(norm: nn.LayerNorm) -> tuple[Tensor | None, Tensor | None, float]:
    """``(weight, bias, eps)`` of a LayerNorm (:data:`tessera_model.cpu_kernels.Norm`)."""
    return norm.weight, norm.bias, norm.eps
