"""Model specification: the typed config that builds a :class:`TesseraModel`.

The checkpoint stores ``ModelSpec.model_dump()`` so a model can always be rebuilt from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tessera_model.errors import SpecError

PresetName = Literal["v1", "small"]


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
        default=40, ge=1, description="Timesteps sampled per modality per pixel (T)."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.d_model % self.n_heads:
            raise SpecError(
                f"Expected d_model divisible by n_heads. Got d_model={self.d_model}, "
                f"n_heads={self.n_heads}."
            )
        if self.d_model % 2:
            raise SpecError(f"Expected an even d_model (sin/cos pairs). Got {self.d_model}.")
        return self

    @classmethod
    def preset(cls, name: str) -> ModelSpec:
        """Return a named preset.

        Args:
            name: ``"v1"`` (exactly TESSERA v1.0) or ``"small"`` (trains in about a minute
                on two CPU cores; still a 128-d output).

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
    }
