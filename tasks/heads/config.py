"""Typed configs of the head flows (``train-head``, ``predict-map``): the Prefect UI forms.

The build's own evaluation step is configured by :class:`tasks.config.EvaluationConfig`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.config import StorageConfig, check_field_path, check_uri, parse_overrides
from tasks.heads.models import HeadConfig, SplitConfig

__all__ = ["PredictMapConfig", "TrainHeadConfig", "parse_head_overrides"]

Lon = Annotated[float, Field(ge=-180, le=180)]
Lat = Annotated[float, Field(ge=-90, le=90)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainHeadConfig(_Model):
    """Train a head on labels over a published year store."""

    labels_uri: str = Field(description="GeoParquet, GeoPackage, GeoJSON or CSV (lon/lat) file.")
    label_column: str = Field(description="Class or value column.")
    id_column: str | None = Field(default=None, description="Polygon id column (default: row).")
    task: Literal["auto", "classification", "regression"] = Field(
        default="auto", description="auto: text and integers are classes, other numbers values.")
    crs: str | None = Field(default=None, description="CRS of the label coordinates when the "
                            "file does not say (CSV: default EPSG:4326), e.g. EPSG:27700.")
    layer: str | None = Field(default=None, description="GeoPackage table (default: first).")
    year: int = Field(ge=2017, le=2100, description="Year of the store.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Store (output "
                                   "root) and work root.")
    name: str = Field(default="head", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Artifact name: heads/{name}/{version} under the output root.")
    head: HeadConfig = Field(default_factory=HeadConfig, description="The head.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Held-out test set.")
    max_per_polygon: int = Field(default=50, ge=1, le=100_000,
                                 description="Pixels sampled per polygon at most.")
    inner_buffer_m: float = Field(default=0.0, ge=0, le=1000,
                                  description="Shrink polygons first (skip mixed edge pixels).")
    min_polygons_per_class: int = Field(default=2, ge=1, le=1000,
                                        description="Fewer labelled polygons in a class fail.")
    refit_on_all: bool = Field(default=True, description="After testing, refit on every "
                               "sample for the saved head (the metrics stay the test ones).")
    seed: int = Field(default=0, ge=0, description="Pixel subsampling seed.")

    @field_validator("labels_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class PredictMapConfig(_Model):
    """Apply a saved head to a published year store and write a predicted map."""

    head_uri: str = Field(description="A head folder written by train-head (heads/{name}/{version}).")
    year: int = Field(ge=2017, le=2100, description="Year of the store.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Store (output "
                                   "root) and work root.")
    bbox: tuple[Lon, Lat, Lon, Lat] | None = Field(
        default=None, description="Only this (west, south, east, north) box (default: the store).")
    map_uri: str | None = Field(default=None, description="Where the map's Zarr goes (default "
                                "maps/{head name}-{version}/{year}.zarr under the output root).")
    cog: bool = Field(default=False, description="Also write a Cloud-Optimised GeoTIFF per zone.")

    @field_validator("head_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


def parse_head_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items of ``tessera train-head`` as a nested dict; keys are checked
    against :class:`TrainHeadConfig` (an unknown one raises ConfigError naming it)."""
    for item in items:
        key = item.partition("=")[0].strip()
        if key:
            check_field_path(key.split("."), TrainHeadConfig)
    # the values are parsed as for a build (YAML scalars); the key check above replaces the
    # build-config check, so parse each item with a placeholder key and move the value
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parsed = parse_overrides([f"seed={raw}"]) if sep else parse_overrides([item])
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed["seed"]
    return out
