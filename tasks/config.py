"""Typed configuration: one pydantic model per stage, composed into :class:`BuildConfig`.

Every field carries a description and bounds; the same model is the build flow's parameter
(and so the Prefect UI form), the content of a YAML/TOML config file, and the target of CLI
options. Invalid input fails at construction, before any work, with a message naming the
field.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from tasks.errors import ConfigError
from tasks.grid import SHARD_PX, region_area_km2
from tasks.sources._sh_config import SentinelHubConfig
from tasks.sources._stac_config import StacConfig
from tasks.sources.synthetic import SyntheticWorldConfig

FIRST_YEAR = 2017
"""First full year with both Sentinel-2 L2A and Sentinel-1 (A+B) coverage."""


class _Model(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number is refused by name ("not a number"), not
    # by a confusing bound ("should be greater than or equal to -180").
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


URI_SCHEMES = ("file", "s3", "memory")
"""Schemes a storage or checkpoint URI may have (a path without scheme is local)."""
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def check_uri(v: str, schemes: tuple[str, ...] = URI_SCHEMES) -> str:
    """Check a storage URI: a local path, ``file://``, ``memory://`` or ``s3://bucket[/prefix]``
    (or another of ``schemes``).

    Refuses what looks like a URI but is not one (``s3:/bucket``, ``s3:bucket``), unknown
    schemes and an empty or malformed bucket, so a typo never becomes a local folder named
    ``s3:``.

    Raises:
        ValueError: with an "Expected X. Got Y." message.
    """
    if not v.strip():
        raise ValueError("Expected a local path or an s3:// URI. Got an empty string.")
    if "://" not in v:
        m = _SCHEME_LIKE.match(v)
        if m and "/" not in m.group(1):  # 'C:' (one letter) stays a Windows drive
            scheme = m.group(1)
            hint = f"{scheme}://" + v[len(scheme) + 1:].lstrip("/")
            raise ValueError(
                f"Expected a URI of the form scheme://... (e.g. {hint!r}) or a local path "
                f"(write './{v}' for a folder whose name has a colon). Got {v!r}."
            )
        return v
    scheme, rest = v.split("://", 1)
    if scheme not in schemes:
        raise ValueError(
            f"Expected a local path or a {', '.join(s + '://' for s in schemes)} URI. "
            f"Got scheme {scheme!r} in {v!r}."
        )
    if scheme == "s3":
        bucket = rest.split("/", 1)[0]
        if not _S3_BUCKET.match(bucket):
            raise ValueError(
                "Expected s3://BUCKET[/PREFIX] with a bucket name of 3-63 lowercase letters, "
                f"digits, dots or hyphens. Got {'no bucket' if not bucket else repr(bucket)} "
                f"in {v!r}."
            )
    return v


def last_complete_year(today: dt.date | None = None) -> int:
    """The latest year whose 31 December has passed."""
    return (today or dt.date.today()).year - 1


Lon = Annotated[float, Field(ge=-180.0, le=180.0)]
Lat = Annotated[float, Field(ge=-90.0, le=90.0)]


class RegionConfig(_Model):
    """Where to build: a lon/lat bounding box or a GeoJSON polygon (EPSG:4326)."""

    bbox: tuple[Lon, Lat, Lon, Lat] | None = Field(
        default=None,
        description="Bounding box [min_lon, min_lat, max_lon, max_lat] in degrees (EPSG:4326).",
    )
    geojson: dict[str, Any] | None = Field(
        default=None,
        description="A GeoJSON Polygon or MultiPolygon (or a Feature holding one), EPSG:4326.",
    )
    max_area_km2: float = Field(
        default=2500.0,
        gt=0,
        le=2.0e7,
        description="Largest region a single build accepts, km^2 (a guard against typos).",
    )
    name: str = Field(
        default="region",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Short name of the region, used in run names and manifests.",
    )

    @model_validator(mode="after")
    def _check(self) -> RegionConfig:
        if (self.bbox is None) == (self.geojson is None):
            raise ValueError("Expected exactly one of 'bbox' or 'geojson'.")
        geom = self.geometry()
        area = region_area_km2(geom)
        if area > self.max_area_km2:
            raise ValueError(
                f"Expected a region of at most max_area_km2={self.max_area_km2:g} km^2. "
                f"Got {area:.1f} km^2."
            )
        return self

    @field_validator("bbox")
    @classmethod
    def _check_bbox(cls, v: tuple[float, float, float, float] | None) -> Any:
        if v is None:
            return v
        min_lon, min_lat, max_lon, max_lat = v
        if not min_lon < max_lon:
            raise ValueError(f"Expected min_lon < max_lon. Got {min_lon} >= {max_lon}.")
        if not min_lat < max_lat:
            raise ValueError(f"Expected min_lat < max_lat. Got {min_lat} >= {max_lat}.")
        return v

    @field_validator("bbox", mode="before")
    @classmethod
    def _bbox_numbers(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, float) and math.isnan(x):
                    raise ValueError(f"Expected a number at position {i}. Got NaN (not a number).")
        return v

    @field_validator("geojson")
    @classmethod
    def _check_geojson(cls, v: dict[str, Any] | None) -> Any:
        if v is None:
            return v
        geom = _geojson_geometry(v)
        if geom.is_empty:
            raise ValueError("Expected a polygon with a non-zero area. Got an empty polygon.")
        if not geom.is_valid:
            raise ValueError(f"Expected a valid polygon. Got {explain_validity(geom)}.")
        if geom.area == 0:
            raise ValueError("Expected a polygon with a non-zero area. Got an empty polygon.")
        minx, miny, maxx, maxy = geom.bounds
        if any(math.isnan(b) or math.isinf(b) for b in geom.bounds):
            raise ValueError("Expected finite coordinates. Got NaN (not a number) or infinity.")
        if minx < -180 or maxx > 180 or miny < -90 or maxy > 90:
            raise ValueError(
                "Expected longitudes within +-180 and latitudes within +-90. "
                f"Got bounds {geom.bounds}."
            )
        return v

    def geometry(self) -> BaseGeometry:
        """The region as a shapely geometry in lon/lat."""
        if self.bbox is not None:
            return box(*self.bbox)
        assert self.geojson is not None
        return _geojson_geometry(self.geojson)


def _geojson_geometry(obj: dict[str, Any]) -> BaseGeometry:
    kind = obj.get("type")
    if kind == "Feature":
        return _geojson_geometry(obj.get("geometry") or {})
    if kind == "FeatureCollection":
        feats = obj.get("features") or []
        if len(feats) != 1:
            raise ValueError(f"Expected a FeatureCollection with one feature. Got {len(feats)}.")
        return _geojson_geometry(feats[0])
    if kind not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"Expected a GeoJSON Polygon or MultiPolygon. Got type {kind!r}.")
    try:
        return shape(obj)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise ValueError(f"Expected valid GeoJSON coordinates. Got an error: {exc}") from exc


class StorageConfig(_Model):
    """Where results go: fsspec URIs (local paths or ``s3://``)."""

    output_uri: str = Field(
        default="tessera-out",
        min_length=1,
        description="Root of the published product; '{year}.zarr' stores are written here.",
    )
    work_uri: str = Field(
        default="tessera-work",
        min_length=1,
        description="Root of caches and intermediates (scenes, d-pixels, checkpoints, results).",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint URL for s3:// URIs (e.g. a MinIO or loopback server).",
    )
    s3_region: str | None = Field(default=None, description="S3 region name for s3:// URIs.")
    s3_credentials_block: str | None = Field(
        default=None,
        max_length=160,
        pattern=r"^((secret|aws-credentials)/)?[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="S3 credentials from a Prefect block, resolved at run time by the process "
        "that needs them: 'aws-credentials/NAME' (a prefect-aws AwsCredentials block) or "
        "'secret/NAME' (a Secret block holding JSON with access_key_id and "
        "secret_access_key). Unset: botocore's own chain (AWS_* environment variables, "
        "profile, instance role). Configs never hold a secret.",
    )
    s3_max_attempts: int = Field(
        default=6,
        ge=1,
        le=20,
        description="Attempts per S3 request on transient errors (throttling, 5xx, "
        "connection resets), with botocore's exponential back-off.",
    )

    @field_validator("output_uri", "work_uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        return check_uri(v)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"Expected an http:// or https:// URL. Got {v!r}.")
        return v


class SourceConfig(_Model):
    """Where scenes come from."""

    kind: Literal["synthetic", "sentinelhub", "stac"] = Field(
        default="synthetic",
        description="Scene source: 'synthetic' (the built-in synthetic Earth), "
        "'sentinelhub' (Sentinel Hub / CDSE / a compatible endpoint, see 'sentinelhub') or "
        "'stac' (Planetary Computer / Earth Search COGs, no account needed, see 'stac').",
    )
    synthetic: SyntheticWorldConfig = Field(
        default_factory=SyntheticWorldConfig, description="Synthetic Earth parameters."
    )
    sentinelhub: SentinelHubConfig = Field(
        default_factory=SentinelHubConfig,
        description="Sentinel Hub endpoint, credentials (named, never stored), S1 processing, "
        "concurrency and processing-unit budget; used when kind is 'sentinelhub'.",
    )
    stac: StacConfig = Field(
        default_factory=StacConfig,
        description="STAC catalogues (preset, URLs, signing, key named never stored), "
        "concurrency and retries; used when kind is 'stac'.",
    )


class MaskConfig(_Model):
    """Cloud masking from the Sentinel-2 scene classification (SCL)."""

    invalid_scl: tuple[Annotated[int, Field(ge=0, le=11)], ...] = Field(
        default=(0, 1, 2, 3, 8, 9),
        min_length=1,
        description="SCL classes masked as invalid (TESSERA: no data, saturated, dark, "
        "cloud shadow, cloud medium and high probability).",
    )
    dilation_px: int = Field(
        default=0, ge=0, le=50, description="Grow the invalid mask by this many pixels."
    )
    min_scene_valid_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Drop scenes whose valid fraction is at or below this (0 drops only "
        "scenes with no valid pixel).",
    )


class DPixelConfig(_Model):
    """d-pixel extraction into the TESSERA arrays."""

    chunk_px: int = Field(
        default=64,
        ge=8,
        le=1024,
        description="Spatial chunk side of d-pixel arrays; a chunk holds all timesteps.",
    )
    compression_level: int = Field(default=3, ge=1, le=9, description="Zstd level.")

    @field_validator("chunk_px")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"Expected a power of two (so chunks tile the 256-px blocks). Got {v}.")
        return v


class ModelConfig(_Model):
    """Which TESSERA network to use, and where its official checkpoint's trust comes from."""

    preset: Literal[
        "small", "v1", "v1.1", "v1.1-aws", "v2-nano", "v2-small", "v2-medium", "v2-large"
    ] = Field(
        default="small",
        description="'v1' matches the published TESSERA v1.0 model; 'v1.1' / 'v1.1-aws' the "
        "v1.1 encoders (MPC or AWS statistics); 'v2-nano|small|medium|large' the TESSERA v2 "
        "students (inference only, Matryoshka embeddings); 'small' trains in a minute on a "
        "laptop (v1.0 architecture).",
    )
    checkpoint_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected SHA-256 of training.checkpoint_uri; a different file is refused "
        "before any tile is embedded (official v2 files on the Hub are checked without it).",
    )
    hf_token_secret: str | None = Field(
        default=None,
        max_length=128,
        description="Prefect Secret block holding a Hugging Face Hub token (a string or "
        '{"token": ...}); default: HF_TOKEN from the environment, or none (public files).',
    )
    hf_endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://.+",
        description="Hugging Face Hub endpoint; default: HF_ENDPOINT or the public Hub.",
    )
    hf_cache_dir: str | None = Field(
        default=None,
        description="Hub download cache folder; default: the Hub's own (HF_HUB_CACHE / HF_HOME).",
    )


Device = Literal["auto", "cpu", "cuda"]


class TrainingConfig(_Model):
    """Self-supervised training inside the build (optional)."""

    enabled: bool = Field(
        default=True,
        description="Train a model on this build's d-pixels; if false, use checkpoint_uri.",
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description="Existing checkpoint (ours or the official TESSERA format) to embed with: "
        "a local path, s3://, http(s):// or hf://OWNER/REPO/PATH[@REVISION] (Hugging Face Hub).",
    )
    steps: int = Field(
        default=400, ge=1, le=10_000_000,
        description="Optimiser steps at most (the LR schedule spans them); with validation "
        "and patience > 0 training ends sooner, once the validation loss has flattened.")
    validation_tiles: int = Field(
        default=1, ge=0, le=100_000,
        description="Tiles held out of the training set; the loss on their pixels is the "
        "validation loss (at most all tiles but one; 0 or a one-tile build: no validation).")
    validation_pixels: int = Field(
        default=2048, ge=16, le=1_000_000,
        description="Pixels of the held-out tiles in the validation set.")
    validate_every: int = Field(
        default=25, ge=1, le=1_000_000,
        description="Steps between validation losses (also at the last step).")
    patience: int = Field(
        default=4, ge=0, le=1000,
        description="Stop once this many validations in a row did not lower the best "
        "validation loss by min_delta (the loss has flattened); 0: always run every step.")
    min_delta: float = Field(
        default=0.01, ge=0.0, le=1.0,
        description="Relative decrease of the best validation loss that counts as progress.")
    view_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Share of a pixel's valid observations each of the two training views "
        "draws its time steps from (a random subset per view): below 1 the views see "
        "different dates, so the embedding learns not to depend on which dates are seen; 1: "
        "every valid step.")
    batch_size: int = Field(default=256, ge=4, le=1_048_576, description="Global batch size.")
    learning_rate: float = Field(default=6e-3, gt=0, le=1.0, description="Peak learning rate.")
    pixels_per_tile: int = Field(
        default=4096,
        ge=16,
        le=1_000_000,
        description="Pixels sampled per tile into the globally shuffled training set.",
    )
    min_valid_s2: int = Field(
        default=20, ge=1, le=366, description="Pixels need this many valid S2 steps to train on."
    )
    checkpoint_every: int = Field(
        default=100, ge=1, le=1_000_000, description="Save a resumable checkpoint every N steps."
    )
    shard_pixels: int = Field(
        default=65_536,
        ge=64,
        le=16_777_216,
        description="Target pixels per shard of the globally shuffled training set; the "
        "trainer holds at most two shards in memory.",
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Data-parallel training processes on this machine (torchrun, one per GPU; "
        "gloo on CPU). batch_size is the global batch and must divide evenly.",
    )
    device: Device = Field(default="auto", description="Training device.")

    @field_validator("checkpoint_uri")
    @classmethod
    def _check_uri(cls, v: str | None) -> str | None:
        return v if v is None else check_uri(v, (*URI_SCHEMES, "http", "https", "hf"))

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if not self.enabled and not self.checkpoint_uri:
            raise ValueError(
                "Expected checkpoint_uri when training is disabled. Got none: set "
                "training.checkpoint_uri or training.enabled=true."
            )
        if self.batch_size % self.processes:
            raise ValueError(
                f"Expected training.batch_size divisible by training.processes="
                f"{self.processes}. Got {self.batch_size}."
            )
        return self


class EmbeddingConfig(_Model):
    """Embedding generation with the frozen encoder."""

    batch_size: int = Field(
        default=0,
        ge=0,
        le=1_048_576,
        description="Pixels per forward pass; 0 = automatic from free device memory.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the encoder (CUDA: faster after a one-off compile of "
        "about a minute per process).",
    )
    min_valid_s2: int = Field(
        default=0,
        ge=0,
        le=366,
        description="Stricter mask: pixels with fewer valid S2 steps are no-data. 0: the "
        "preset's reference coverage (every pixel with at least one valid S2 or S1 step).",
    )
    min_valid_s1: int = Field(
        default=0,
        ge=0,
        le=366,
        description="Stricter mask: pixels with fewer valid S1 steps are no-data (0: the "
        "reference coverage).",
    )
    device: Device = Field(default="auto", description="Inference device.")
    bf16: bool = Field(
        default=False,
        description="v1.1/v2 on CUDA: run under bf16 autocast (the v1.1 reference's GPU "
        "default; v2's reference runs fp32). v1.0 models always use bf16 on CUDA.",
    )
    precision: Literal["fp32", "int8-dynamic"] = Field(
        default="fp32",
        description="CPU inference precision: 'int8-dynamic' runs the dense layers as int8 "
        "matmuls with per-pixel activation scales (about 2-4x faster, cosine >= 0.999 to "
        "fp32 per pixel, still independent of the batch; CPU only). Recorded as the "
        "'inference' attribute of each embedding and part of the embed cache key.",
    )

    @model_validator(mode="after")
    def _check_precision(self) -> EmbeddingConfig:
        if self.precision == "int8-dynamic" and self.device == "cuda":
            raise ValueError(
                "Expected embedding.precision 'fp32' with embedding.device 'cuda' (int8-dynamic "
                "is a CPU path). Got precision 'int8-dynamic'."
            )
        return self

    def coverage_rule(self, family: str) -> str:
        """The coverage rule recorded with every embedding (and in the published store)."""
        rule = {"v1.0": "v1.0-reference", "v1.1": "v1.1-reference", "v2": "v2-reference"}
        return f"{rule[family]};min_valid_s2={self.min_valid_s2};min_valid_s1={self.min_valid_s1}"


class PublishConfig(_Model):
    """int8 publishing into the ``tessera:`` Zarr convention."""

    dims: Literal[16, 32, 64, 128] = Field(
        default=128,
        description="Matryoshka prefix K: publish only the first K dims of each embedding "
        "(v2 students only; other models need 128). A store holds one K.",
    )

    compression_level: int = Field(default=3, ge=1, le=9, description="Blosc zstd level.")
    build_version: str = Field(
        default="tessera-factory-0.1",
        max_length=64,
        description="Recorded as tessera:build_version in each zone group.",
    )
    lease_ttl_s: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Age after which a writer lease of a zone group is taken as a crashed "
        "writer's and ignored (seconds); live writers renew theirs between blocks. Keep it "
        "below lease_timeout_s so a retry outlasts a killed writer's lease.",
    )
    lease_timeout_s: float = Field(
        default=900.0,
        gt=0,
        le=86400,
        description="How long a writer waits for a conflicting lease before failing (seconds).",
    )


class RunnerConfig(_Model):
    """How a build's tasks are executed (Prefect task runner)."""

    kind: Literal["threads", "processes", "dask"] = Field(
        default="threads",
        description="'threads' (default), 'processes', or 'dask' (prefect-dask: a local "
        "cluster, or the scheduler at dask_address).",
    )
    max_workers: int = Field(
        default=2, ge=1, le=4096, description="Worker threads/processes (or local Dask workers)."
    )
    dask_address: str | None = Field(
        default=None,
        pattern=r"^(tcp|tls|ws|wss|inproc)://.+",
        description="Address of a running dask.distributed scheduler, e.g. tcp://10.0.0.5:8786.",
    )
    torch_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto",
        description="Torch intra-op threads per worker; 'auto' = cores // max_workers (cores: "
        "this process's CPU affinity, or the cgroup quota if smaller; at least 1), so workers "
        "x threads <= cores. Training, which runs alone, gets all the cores. On a remote Dask "
        "cluster 'auto' is each worker's cores // its threads (tasks/threads.py).",
    )


class EvaluationConfig(_Model):
    """Label-efficiency evaluation at the end of a build (``tasks.heads``; docs/heads.md).

    Heads are fitted on k labelled polygons per class of the build's published embeddings,
    of a raw-feature baseline from the same d-pixels and of a random-init encoder, and scored
    on held-out spatial blocks. Off by default; the demo turns it on.
    """

    enabled: bool = Field(default=False, description="Run the evaluation after publishing.")
    labels: Literal["land_cover", "canopy_height", "file"] = Field(
        default="land_cover",
        description="Synthetic Earth ground truth (land_cover: classes by parcel; "
        "canopy_height: metres) or a label file (labels_uri).",
    )
    labels_uri: str | None = Field(
        default=None, description="GeoParquet, GeoPackage, GeoJSON or CSV (lon/lat) labels.")
    label_column: str = Field(default="label", description="Class or value column of labels_uri.")
    id_column: str | None = Field(default=None, description="Polygon id column (default: row).")
    head: Literal["linear", "random_forest", "gradient_boosting", "mlp"] = Field(
        default="linear", description="Head fitted for every k and seed.")
    ks: tuple[Annotated[int, Field(ge=1, le=10_000)], ...] = Field(
        default=(1, 2, 5, 10, 20, 50, 100), min_length=1,
        description="Labelled polygons per class (value quintile for regression).")
    seeds: int = Field(default=3, ge=1, le=50, description="Random draws per k.")
    split_by: Literal["block", "polygon"] = Field(
        default="block", description="Hold out whole spatial blocks, or whole polygons.")
    block_m: float = Field(default=1280.0, ge=10, le=1e6, description="Spatial block side, m.")
    test_fraction: float = Field(default=0.3, gt=0, lt=1, description="Share held out.")
    max_per_polygon: int = Field(default=20, ge=1, le=10_000,
                                 description="Pixels sampled per polygon at most.")
    edge_px: int = Field(default=1, ge=0, le=10, description="Synthetic labels: skip pixels "
                         "within this many pixels of another parcel (mixed pixels).")
    label_noise: float = Field(default=0.0, ge=0, lt=1, description="Share of training "
                               "polygons given a wrong class (label noise; test labels stay clean).")
    raw_baseline: bool = Field(default=True, description="Compare with per-band seasonal "
                               "statistics of the same d-pixels.")
    random_init_baseline: bool = Field(default=True, description="Compare with the same "
                                       "architecture, untrained (random weights).")
    random_init_seed: int = Field(default=12345, ge=0, description="Seed of the random-init "
                                  "encoder's weights.")
    gate_k: int = Field(default=10, ge=1, description="k at which the gates are checked.")
    min_score: float | None = Field(default=None, ge=-1e3, le=1, description="Fail below this "
                                    "mean macro-F1 (R^2 for regression) of the embeddings.")
    min_gain_over_random_init: float | None = Field(
        default=None, ge=-1, le=1, description="Fail unless the embeddings beat the random-init "
        "encoder by this much (macro-F1 or R^2).")
    min_gain_over_raw: float | None = Field(
        default=None, ge=-1, le=1, description="Fail unless the embeddings beat the raw-feature "
        "baseline by this much.")
    fail_build: bool = Field(default=True, description="A failed gate fails the build (else "
                             "it is only reported).")
    predict_map: bool = Field(default=True, description="Also fit a head on every sample and "
                              "write a predicted map of the build's region with a preview.")
    cog: bool = Field(default=False, description="Also write the predicted map as COG.")

    @model_validator(mode="after")
    def _file_needs_uri(self) -> EvaluationConfig:
        if self.labels == "file" and not self.labels_uri:
            raise ValueError("Expected labels_uri when labels is 'file'. Got none.")
        return self


class BuildConfig(_Model):
    """Everything one build of one region and year needs."""

    region: RegionConfig = Field(description="Where to build.")
    year: int = Field(
        ge=FIRST_YEAR,
        le=2100,
        description=f"Calendar year to build ({FIRST_YEAR} or later, and already complete).",
    )
    seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Seed for training and temporal sampling."
    )
    tile_size_px: int = Field(
        default=SHARD_PX,
        ge=SHARD_PX,
        le=16 * SHARD_PX,
        multiple_of=SHARD_PX,
        description="Tile side in pixels, a multiple of 256 (the shard size).",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Storage roots.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Scene source.")
    mask: MaskConfig = Field(default_factory=MaskConfig, description="Cloud masking.")
    dpixels: DPixelConfig = Field(default_factory=DPixelConfig, description="d-pixels.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Training.")
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig, description="Embedding.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Publishing.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Task execution.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig,
                                         description="Label-efficiency evaluation (optional).")

    @field_validator("year")
    @classmethod
    def _year_complete(cls, v: int) -> int:
        last = last_complete_year()
        if v > last:
            raise ValueError(f"Expected a complete year (at most {last}). Got {v}.")
        return v


DEMO_GATE_GAIN = 0.0
"""The demo's gate: macro-F1 of its embeddings minus the random-init encoder's at k = 10
(measured on the demo region: +0.009 with float embeddings; docs/heads.md)."""


def demo_config(**overrides: Any) -> BuildConfig:
    """The README demo: two tiles of the synthetic Earth near Cambridge, UK, in 2024.

    About 4.6 km^2 (46,000 pixels); a short training run (120 steps of 128 pixels, the cost
    of 60 of the default 256, on both tiles, no validation) so that the whole chain finishes
    in a couple of minutes on a 2-core laptop. It ends with its land-cover
    evaluation (trained vs raw baseline vs random-init, k <= 10 polygons per class) and a
    predicted map; the gate (embeddings beat the random-init encoder by
    ``DEMO_GATE_GAIN`` macro-F1 at k = 10, measured on this region: docs/heads.md) fails
    the demo otherwise.
    """
    base: dict[str, Any] = {
        "region": {"bbox": (0.11, 52.19, 0.15, 52.205), "name": "demo-cambridge"},
        "year": 2024,
        "training": {"steps": 120, "batch_size": 128, "learning_rate": 0.006,
                     "validation_tiles": 0},
        "evaluation": {"enabled": True, "ks": [1, 2, 5, 10], "seeds": 3, "gate_k": 10,
                       "min_gain_over_random_init": DEMO_GATE_GAIN},
    }
    return BuildConfig.model_validate(_deep_merge(base, overrides))


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["training.steps=50", "region.bbox=[0,50,0.1,50.1]"]`` into a nested dict.

    Values are parsed as YAML scalars/lists, so numbers, booleans and lists work. Keys are
    checked against :class:`BuildConfig` here, before anything runs: an unknown field, or a
    subkey of a value that is not a section (``year.x=1``), raises :class:`ConfigError`
    naming the dotted key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", f"expected KEY=VALUE (e.g. training.steps=50). Got {item!r}")
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError("--set", f"expected a dotted field name (e.g. training.steps). Got {key!r}")
        check_field_path(parts)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(key, f"expected a YAML value (number, string, list). Got {raw!r} "
                              f"({where})") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "expected one value or its subkeys. "
                                  "Got both")
            node = child
        node[parts[-1]] = value
    return out


def _section_of(annotation: Any) -> type[BaseModel] | dict[str, Any] | None:
    """The model a field's annotation nests (subkeys checked), ``{}`` for a free-form mapping
    (any subkey), or None for a value (no subkey)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        candidates = [annotation]
    for a in candidates:
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        if a is dict or typing.get_origin(a) is dict:
            return {}
    return None


def check_field_path(parts: list[str], model: type[BaseModel] | None = None) -> None:
    """Check that a dotted path names a field of ``model`` (default :class:`BuildConfig`).

    Raises:
        ConfigError: naming the first unknown field or the value that cannot have subkeys.
    """
    node: type[BaseModel] | dict[str, Any] | None = model or BuildConfig
    for i, name in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if node is None:
            parent = ".".join(parts[:i])
            raise ConfigError(here, f"expected no subkey: '{parent}' is a value, not a section "
                              f"(set it with {parent}=VALUE). Got subkey {name!r}")
        if isinstance(node, dict):
            return  # free-form mapping (e.g. region.geojson): the model validates it
        fields = node.model_fields
        if name not in fields:
            raise ConfigError(here, f"expected one of {', '.join(fields)}. Got unknown field {name!r}")
        node = _section_of(fields[name].annotation)


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON config file into a dict (no code is executed).

    Raises:
        ConfigError: (field ``config``) the file is missing, not a file, unreadable, empty,
            not valid YAML/TOML/JSON, or not a mapping; the message names the file and,
            where the parser says, the line.
    """
    p = Path(path)
    if p.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError("config", f"expected a .yaml, .yml, .toml or .json file. Got {p.name!r}")
    if not p.exists():
        got = "a broken or looping symbolic link" if p.is_symlink() else "no file"
        raise ConfigError("config", f"expected an existing config file. Got {got} at {str(p)!r}")
    if not p.is_file():
        raise ConfigError("config", f"expected a config file. Got a directory or other non-file at {str(p)!r}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"expected a readable UTF-8 file. Got {type(exc).__name__}: "
                          f"{getattr(exc, 'strerror', None) or exc} reading {str(p)!r}") from None
    if not text.strip():
        raise ConfigError("config", f"expected a mapping of config fields. Got an empty file {str(p)!r}")
    try:
        if p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError("config", f"expected valid YAML. Got {what}{where} in {p.name}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"expected valid TOML. Got {exc} in {p.name}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("config", f"expected valid JSON. Got {exc.msg} at line {exc.lineno} "
                          f"in {p.name}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"expected a mapping of config fields at the top of {p.name}. "
                          f"Got {type(data).__name__}")
    return data


def starting_config() -> dict[str, Any]:
    """A plain starting config: every field at its default, with a placeholder region (a
    small box near Cambridge, UK) and the last complete year. ``tessera config`` prints it."""
    cfg = BuildConfig.model_validate({
        "region": {"bbox": (0.11, 52.19, 0.15, 52.205), "name": "my-region"},
        "year": last_complete_year(),
    })
    return cfg.model_dump(mode="json")


def build_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> BuildConfig:
    """Load a build config from a file and/or overrides, raising :class:`ConfigError`.

    The error names the first invalid field as a dotted path (e.g. ``region.bbox``).
    """
    data = load_config_dict(path) if path else {}
    data = _deep_merge(data, overrides or {})
    return validate_build_config(data)


def validate_build_config(data: dict[str, Any] | BuildConfig) -> BuildConfig:
    """Validate a dict into a :class:`BuildConfig`, turning pydantic errors into ConfigError."""
    if isinstance(data, BuildConfig):
        return data
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error_from(exc) from None


def config_error_from(exc: ValidationError) -> ConfigError:
    """The first error of a pydantic ValidationError as a ConfigError naming the field."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "finite_number":
        got = str(err.get("input"))
        kind = "not a number" if got.lower() == "nan" else "infinite"
        msg = f"Expected a finite number. Got {got} ({kind})."
    elif err["type"] == "extra_forbidden":
        msg = f"Expected a known field. Got unknown field {str(err['loc'][-1])!r}."
    elif err["type"] == "missing":
        msg = "Expected a value. Got none (this field is required)."
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return ConfigError(field, msg + more)
