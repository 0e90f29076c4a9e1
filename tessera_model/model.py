"""The TESSERA two-tower model: S2 and S1 encoders, fusion to the embedding, training projector."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tessera_model.backbone import ModalityEncoder
from tessera_model.errors import SpecError
from tessera_model.heads import fusion_head
from tessera_model.spec import ModelSpec

PROJECTOR_PREFIX = "projector."


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

    def encode(self, s2: Tensor, s1: Tensor) -> Tensor:
        """Embed pixels.

        Args:
            s2: (B, T2, s2_channels + 1) normalised S2 bands + raw DOY column.
            s1: (B, T1, s1_channels + 1) normalised S1 bands + raw DOY column.

        Returns:
            (B, embed_dim) embeddings: the first ``embed_dim`` of the head's ``latent_dim``
            outputs (all of them except for v1.1, which keeps 128 of 192).
        """
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
