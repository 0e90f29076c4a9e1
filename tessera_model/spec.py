"""Model specification: the typed config that builds a :class:`TesseraModel`.

The checkpoint stores ``ModelSpec.model_dump()`` so a model can always be rebuilt from it.
One spec covers the three TESSERA families (``shared/reference/tessera.md`` for v1.0,
``shared/reference/tessera-v2.md`` sections 1 and 6 for v1.1 and the v2 students):

| family | pooling | fusion head | observation selection | normalisation |
|---|---|---|---|---|
| v1.0 | GRU attention | ``Linear(2d, L)`` | seeded random, ``sample_steps`` | v1.0 |
| v1.1 | GRU attention | MLP to 192, keep 128 | deterministic bins (v1.1 rule) | v1.1 MPC or AWS |
| v2 | query attention | MLP to 128 + non-affine LN | deterministic bins (v2 rule) | v2 |
"""

from __future__ import annotations

import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tessera_model.errors import SpecError

PresetName = Literal[
    "small", "v1", "v1.1", "v1.1-aws", "v2-nano", "v2-small", "v2-medium", "v2-large"
]
Family = Literal["v1.0", "v1.1", "v2"]
Normalisation = Literal["v1.0", "v1.1-mpc", "v1.1-aws", "v2"]
PRESET_NAMES: tuple[str, ...] = typing.get_args(PresetName)


class ModelSpec(BaseModel):
    """Hyper-parameters of the TESSERA two-tower encoder (frozen value object)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(description="Model version label stored with every embedding.")
    latent_dim: int = Field(ge=1, description="Embedding size L (output of dim_reducer).")
    d_model: int = Field(ge=2, description="Transformer width per modality (v1: 4L = 512).")
    n_layers: int = Field(ge=1, description="Transformer encoder layers per modality.")
    n_heads: int = Field(ge=1, description="Attention heads; must divide d_model.")
    ffn_dim: int = Field(ge=1, description="Feed-forward hidden size of each encoder layer.")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout in the encoder layers.")
    projector_dim: int = Field(ge=1, description="Width H of the training-only projector.")
    projector_layers: int = Field(
        ge=1,
        description="Number of Linear+BatchNorm+ReLU blocks in the projector (v1: 5), "
        "followed by one final Linear(H, H).",
    )
    s2_channels: int = Field(default=10, ge=1, description="Sentinel-2 bands per timestep.")
    s1_channels: int = Field(default=2, ge=1, description="Sentinel-1 bands per timestep.")
    sample_steps: int = Field(
        default=40,
        ge=1,
        description="Timesteps sampled per modality per pixel (T); v1.0 family only (v1.1 "
        "and v2 use every valid step, binned to multiples of 8 up to max_steps).",
    )
    family: Family = Field(
        default="v1.0",
        description="Architecture, observation selection and coverage family (table above).",
    )
    normalisation: Normalisation = Field(
        default="v1.0", description="Name of the band statistics (tessera_model.normalisation)."
    )
    embed_dim: int = Field(
        default=0,
        ge=0,
        description="Dims of the published embedding: the first embed_dim of the head's "
        "latent_dim outputs (v1.1: 128 of 192); 0 (or absent): latent_dim.",
    )
    max_steps: int = Field(
        default=256, ge=8, description="Largest observation bin of v1.1/v2 (reference: 256)."
    )
    size: str = Field(default="", description="Size label of a v2 student (nano..large).")

    @model_validator(mode="before")
    @classmethod
    def _default_embed_dim(cls, data: typing.Any) -> typing.Any:
        if isinstance(data, dict) and not data.get("embed_dim") and "latent_dim" in data:
            data = {**data, "embed_dim": data["latent_dim"]}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.d_model % self.n_heads:
            raise SpecError(
                f"Expected d_model divisible by n_heads. Got d_model={self.d_model}, "
                f"n_heads={self.n_heads}."
            )
        if self.d_model % 2:
            raise SpecError(f"Expected an even d_model (sin/cos pairs). Got {self.d_model}.")
        if self.embed_dim > self.latent_dim:
            raise SpecError(
                f"Expected embed_dim <= latent_dim. Got embed_dim={self.embed_dim}, "
                f"latent_dim={self.latent_dim}."
            )
        return self

    @property
    def binned(self) -> bool:
        """True for the deterministic, binned families (v1.1 and v2)."""
        return self.family != "v1.0"

    @classmethod
    def preset(cls, name: str) -> ModelSpec:
        """Return a named preset.

        Args:
            name: ``"v1"`` (exactly TESSERA v1.0), ``"small"`` (trains in about a minute
                on two CPU cores; still a 128-d output), ``"v1.1"`` / ``"v1.1-aws"`` (v1.1
                with its MPC or AWS statistics) or ``"v2-{nano,small,medium,large}"``.

        Raises:
            SpecError: for an unknown name (lists the choices).
        """
        presets = _presets()
        if name not in presets:
            raise SpecError(f"Expected a preset name in {sorted(presets)}. Got {name!r}.")
        return presets[name]


def _presets() -> dict[str, ModelSpec]:
    return {
        "v1": ModelSpec(
            version="v1.0",
            latent_dim=128,
            d_model=512,
            n_layers=4,
            n_heads=4,
            ffn_dim=4096,
            dropout=0.1,
            projector_dim=16384,
            projector_layers=5,
        ),
        "small": ModelSpec(
            version="small-0.1",
            latent_dim=128,
            d_model=64,
            n_layers=2,
            n_heads=4,
            ffn_dim=256,
            dropout=0.1,
            projector_dim=512,
            projector_layers=2,
        ),
        # v1.1: tessera-v2.md section 6 (latent 192, d 768, FFN 2048, MLP head to 192).
        "v1.1": _v11("mpc"),
        "v1.1-aws": _v11("aws"),
        **{f"v2-{size}": _v2(size, *dims) for size, dims in V2_SIZES.items()},
    }


V2_SIZES: dict[str, tuple[int, int, int, int]] = {
    "nano": (36, 2, 4, 384),
    "small": (64, 4, 4, 1024),
    "medium": (110, 4, 4, 1792),
    "large": (160, 4, 4, 2560),
}
"""v2 student sizes: (latent L = d_model / 4, layers, heads, FFN); tessera-v2.md section 1
(the official checkpoints' ``args``, third-party converters that check their SHA-256)."""


def _v11(stats: str) -> ModelSpec:
    return ModelSpec(
        version="v1.1" if stats == "mpc" else "v1.1-aws",
        family="v1.1",
        normalisation="v1.1-mpc" if stats == "mpc" else "v1.1-aws",
        latent_dim=192,
        embed_dim=128,
        d_model=768,
        n_layers=4,
        n_heads=4,
        ffn_dim=2048,
        dropout=0.1,
        projector_dim=1,
        projector_layers=1,
    )


def _v2(size: str, latent: int, layers: int, heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(
        version=f"v2.0-{size}",
        family="v2",
        normalisation="v2",
        size=size,
        latent_dim=128,
        embed_dim=128,
        d_model=4 * latent,
        n_layers=layers,
        n_heads=heads,
        ffn_dim=ffn,
        dropout=0.0,
        projector_dim=1,
        projector_layers=1,
    )
