"""Per-modality encoder of TESSERA (v1.0, v1.1, v2): band embedding + DOY encoding + transformer
+ pooling (GRU attention pooling for v1.0/v1.1, query attention pooling for v2)."""

from __future__ import annotations

from torch import Tensor, nn

from tessera_model.attention_pooling import QueryAttentionPooling
from tessera_model.encoding import doy_encoding
from tessera_model.errors import InputShapeError
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
