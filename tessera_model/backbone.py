"""Per-modality encoder of TESSERA (v1.0, v1.1, v2): band embedding + DOY encoding + transformer
+ pooling (GRU attention pooling for v1.0/v1.1, query attention pooling for v2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tessera_model.attention_pooling import QueryAttentionPooling
from tessera_model.encoding import doy_encoding
from tessera_model.errors import InputShapeError
from tessera_model.int8 import QuantisedWeight, linear
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
        pre-packed weights. Call without autograd, in eval mode.
        """
        ws = {} if workspace is None else workspace
        qw = qweights or {}
        b, t, _ = x.shape
        d = self.d_model
        bands = x[..., : self.in_channels].reshape(b * t, self.in_channels)
        lin1, lin2 = self.embedding[0], self.embedding[2]
        e = linear(bands, lin1.weight, lin1.bias, qw.get(f"{prefix}.embedding_in"),
                   _buffer(ws, "e1", (b * t, d), x), ws, relu=True)  # fmt: skip
        pe = doy_encoding_cpu(x[..., self.in_channels], d).view(b * t, d)
        h = linear(e, lin2.weight, lin2.bias, qw.get(f"{prefix}.embedding"), ws=ws, residual=pe)
        h = h.view(b, t, d)
        for i, layer in enumerate(self.transformer_encoder.layers):
            lq = {k: qw[f"{prefix}.layers.{i}.{k}"] for k in _LAYER_KEYS if qw}
            h = encoder_layer_cpu(layer, h, ws, lq or None)  # type: ignore[arg-type]
        if isinstance(self.attn_pool, TemporalAttentionPooling):
            rec = (qw.get(f"{prefix}.gru_rz"), qw.get(f"{prefix}.gru_hh2"))
            return self.attn_pool(h, ws, qw.get(f"{prefix}.gru_in"), rec)
        return self.attn_pool(h)


_LAYER_KEYS = ("in_proj", "out_proj", "linear1", "linear2")
SDPA_MIN_HEAD_DIM = 32
"""Head widths from which fused SDPA beats two batched matmuls around a softmax on CPU
(measured one thread: head 16 at 40 steps 23 vs 18 GFLOP/s; head 36 at 48 steps 41 vs 49)."""
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
    return table[day]


def _buffer(ws: dict, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    key = (name, shape)
    buf = ws.get(key)
    if buf is None or buf.dtype != like.dtype:
        buf = ws[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def encoder_layer_cpu(
    layer: nn.TransformerEncoderLayer, x: Tensor, ws: dict | None = None,
    qweights: dict[str, QuantisedWeight] | None = None,
) -> Tensor:  # fmt: skip
    """Inference forward of a post-LN ReLU encoder layer on CPU (no dropout, no mask).

    The math of :class:`torch.nn.TransformerEncoderLayer` in eval mode: one QKV ``addmm``
    over all tokens, attention (fused SDPA on strided views of the QKV output for heads of
    at least :data:`SDPA_MIN_HEAD_DIM`; else scaled ``baddbmm``, softmax, ``bmm``), output
    projection, residual and LayerNorm, FFN (``addmm`` + in-place ReLU, ``addmm``), residual
    and LayerNorm. The large intermediates are written into ``ws`` buffers (reused across
    chunks: fresh multi-MB buffers cost page faults on every call). Agrees with torch's own
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
    ws = {} if ws is None else ws
    qw = qweights or {}
    b, t, d = x.shape
    attn = layer.self_attn
    heads = attn.num_heads
    dh = d // heads
    h = x.reshape(b * t, d)
    qkv = linear(
        h, attn.in_proj_weight, attn.in_proj_bias, qw.get("in_proj"),
        _buffer(ws, "qkv", (b * t, 3 * d), h), ws,
    )  # fmt: skip
    if dh >= SDPA_MIN_HEAD_DIM:
        q, k, v = qkv.view(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * t, d)
    else:
        qkv_h = _buffer(ws, "heads", (3, b, heads, t, dh), h)
        qkv_h.copy_(qkv.view(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4))
        q, k, v = qkv_h.view(3, b * heads, t, dh).unbind(0)
        scores = _buffer(ws, "scores", (b * heads, t, t), h)
        torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=dh**-0.5, out=scores)
        # softmax into another buffer: torch's in-place CPU softmax runs at half the speed
        probs = torch.softmax(scores, dim=-1, out=_buffer(ws, "probs", (b * heads, t, t), h))
        a = torch.bmm(probs, v, out=_buffer(ws, "a", (b * heads, t, dh), h))
        a = a.view(b, heads, t, dh).transpose(1, 2).reshape(b * t, d)
    out_proj = attn.out_proj
    o = linear(a, out_proj.weight, out_proj.bias, qw.get("out_proj"),
               _buffer(ws, "o", (b * t, d), h), ws, residual=h)  # fmt: skip
    h = F.layer_norm(o, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    f = linear(
        h, layer.linear1.weight, layer.linear1.bias, qw.get("linear1"),
        _buffer(ws, "ffn", (b * t, layer.linear1.out_features), h), ws, relu=True,
    )  # fmt: skip
    o = linear(f, layer.linear2.weight, layer.linear2.bias, qw.get("linear2"), o, ws, residual=h)
    o = F.layer_norm(o, (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    return o.view(b, t, d)
