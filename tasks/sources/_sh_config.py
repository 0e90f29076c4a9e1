"""Typed configuration of the Sentinel Hub scene source (``source.sentinelhub``).

Holds no secret: credentials are named (environment variable names or a Prefect Secret block
name) and resolved only where requests are made, so this config can be part of cache keys,
flow parameters and results. Defaults and their provenance are in ``docs/sentinelhub.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PRESETS", "SentinelHubConfig"]

PRESETS: dict[str, tuple[str, str]] = {
    "sentinelhub": (
        "https://services.sentinel-hub.com",
        "https://services.sentinel-hub.com/auth/realms/main/protocol/openid-connect/token",
    ),
    "cdse": (
        "https://sh.dataspace.copernicus.eu",
        "https://identity.dataspace.copernicus.eu/auth/realms/CDSE/protocol/openid-connect/token",
    ),
}
"""(base URL, OAuth token URL) of each hosted deployment (sentinelhub-py docs; CDSE docs)."""

BackCoeff = Literal["BETA0", "SIGMA0_ELLIPSOID", "GAMMA0_ELLIPSOID", "GAMMA0_TERRAIN"]
Dem = Literal["COPERNICUS_30", "COPERNICUS_90", "MAPZEN"]


class SentinelHubConfig(BaseModel):
    """Where and how to fetch Sentinel-2 L2A and Sentinel-1 GRD through Sentinel Hub."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["sentinelhub", "cdse", "custom"] = Field(
        default="cdse",
        description="'cdse' (Copernicus Data Space Ecosystem), 'sentinelhub' (services."
        "sentinel-hub.com) or 'custom' (base_url and token_url below, e.g. the local endpoint).",
    )
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s@]+$",
        max_length=512,
        description="Service base URL for preset 'custom' (no credentials in it), e.g. "
        "http://127.0.0.1:8765.",
    )
    token_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s@]+$",
        max_length=512,
        description="OAuth2 token URL for preset 'custom'; default {base_url}/oauth/token.",
    )
    client_id_env: str = Field(
        default="SH_CLIENT_ID",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        description="Name of the environment variable holding the OAuth client id.",
    )
    client_secret_env: str = Field(
        default="SH_CLIENT_SECRET",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        description="Name of the environment variable holding the OAuth client secret.",
    )
    secret_block: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+$",
        max_length=128,
        description="Name of a Prefect Secret block whose value is "
        '{"client_id": ..., "client_secret": ...}; used instead of the environment variables.',
    )
    max_cloud_cover: float = Field(
        default=100.0,
        ge=0.0,
        le=100.0,
        description="Keep S2 scenes whose catalog eo:cloud_cover is at most this, percent "
        "(100 keeps all; the SCL cloud mask does the per-pixel work).",
    )
    harmonize_values: bool = Field(
        default=True,
        description="Sentinel Hub's harmonizeValues (its default): DN arrive on the pre-2022 "
        "scale, offset recorded as 0 for every date (right also for reprocessed older "
        "products). False: DN as in the product, offset 1000 recorded for dates from "
        "2022-01-25. Either way d-pixel extraction removes the offset exactly once.",
    )
    s1_back_coeff: BackCoeff = Field(
        default="GAMMA0_TERRAIN",
        description="S1 backscatter coefficient (Sentinel Hub 'backCoeff').",
    )
    s1_orthorectify: bool = Field(
        default=True, description="Orthorectify S1 with the DEM (required by GAMMA0_TERRAIN)."
    )
    s1_dem: Dem = Field(
        default="COPERNICUS_30", description="DEM for S1 orthorectification ('demInstance')."
    )
    max_threads: int = Field(
        default=4, ge=1, le=64, description="Concurrent Process API requests per tile."
    )
    max_request_px: int = Field(
        default=2500,
        ge=64,
        le=2500,
        description="Largest side of one Process request, px (Sentinel Hub allows 2500); "
        "larger tiles are split and stitched.",
    )
    pu_budget: float | None = Field(
        default=None,
        gt=0.0,
        le=1e9,
        description="Processing units a build may spend; a build whose estimate exceeds it "
        "fails before the first Process request. None = no limit (estimate still reported).",
    )
    max_download_attempts: int = Field(
        default=4, ge=1, le=20, description="Attempts per request on 5xx, timeouts, resets."
    )
    download_sleep_s: float = Field(
        default=5.0,
        ge=0.0,
        le=300.0,
        description="First wait between attempts, s (x3 each retry, sentinelhub-py's rule).",
    )
    max_rate_limit_retries: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="HTTP 429 answers tolerated per request (each honours Retry-After).",
    )
    max_decode_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Downloads per request whose body is not a valid image (truncated, corrupt).",
    )
    timeout_s: float = Field(
        default=120.0, ge=1.0, le=3600.0, description="HTTP timeout per request, s."
    )
    cache_responses: bool = Field(
        default=True,
        description="Keep catalog and Process responses in the work root (sh-responses/), "
        "so a retried or re-run acquisition downloads nothing twice.",
    )

    @model_validator(mode="after")
    def _check(self) -> SentinelHubConfig:
        if self.preset == "custom" and not self.base_url:
            raise ValueError("Expected base_url with preset 'custom'. Got none.")
        if self.preset != "custom" and (self.base_url or self.token_url):
            raise ValueError(
                f"Expected no base_url/token_url with preset {self.preset!r} (use 'custom')."
            )
        if self.s1_back_coeff == "GAMMA0_TERRAIN" and not self.s1_orthorectify:
            raise ValueError(
                "Expected s1_orthorectify=true with s1_back_coeff GAMMA0_TERRAIN "
                "(terrain flattening needs orthorectification)."
            )
        return self

    def urls(self) -> tuple[str, str]:
        """(service base URL, OAuth token URL) for this preset."""
        if self.preset == "custom":
            assert self.base_url is not None  # checked at construction
            base = self.base_url.rstrip("/")
            return base, self.token_url or f"{base}/oauth/token"
        return PRESETS[self.preset]
