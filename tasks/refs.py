"""Small typed references that stages pass between them (never arrays).

Each names a complete result in storage (its URI), the tile it belongs to, and the content
key it was produced under, plus a few statistics for reports.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks.grid import Tile


class _Ref(BaseModel):
    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="Where the result lives (fsspec URI).")
    key: str = Field(description="Content key: hash of config, inputs and code version.")
    seconds: float = Field(default=0.0, description="Wall time the stage took to compute it.")


class SceneRef(_Ref):
    """Raw scenes of one tile (S2 DN + SCL, S1 linear backscatter)."""

    tile: Tile
    year: int
    n_s2: int
    n_s1_ascending: int
    n_s1_descending: int


class MaskRef(_Ref):
    """Cloud masks of one tile's S2 scenes, with the scenes kept."""

    tile: Tile
    n_kept: int
    n_dropped: int
    mean_valid_fraction: float
    cloud_fraction: float


class DPixelRef(_Ref):
    """A tile's d-pixels: the TESSERA arrays in one Zarr group."""

    tile: Tile
    n_s2: int
    n_s1_ascending: int
    n_s1_descending: int
    mean_valid_s2: float = Field(description="Mean valid S2 observations per pixel.")


class TrainingSetRef(_Ref):
    """Pixels sampled from many tiles, globally shuffled."""

    n_pixels: int
    n_tiles: int


class CheckpointRef(_Ref):
    """A model checkpoint and the spec it was built with."""

    preset: str
    model_version: str
    final_loss: float | None = None


class EmbeddingRef(_Ref):
    """Float32 embeddings of one tile, NaN where no data."""

    tile: Tile
    n_valid: int
    n_nodata: int


class PublishRef(_Ref):
    """One tile committed to a zone store."""

    tile: Tile
    store_uri: str
    group: str
    skipped: bool = Field(default=False, description="True when it was already published.")
