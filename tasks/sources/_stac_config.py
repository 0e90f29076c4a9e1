"""Typed configuration of the STAC scene source (``source.stac``) and the catalogue presets.

Holds no secret: the Planetary Computer subscription key (optional) is named by an
environment variable or a Prefect Secret block and resolved where requests are made, so this
config can be part of cache keys, flow parameters and results. The presets' facts and their
provenance are in ``docs/sources.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.sources.base import S2_BANDS

__all__ = [
    "ASSET_NAMES",
    "PRESETS",
    "S1_ASSETS",
    "Catalogue",
    "StacConfig",
]

AssetNaming = Literal["planetary-computer", "earth-search"]

ASSET_NAMES: dict[AssetNaming, dict[str, str]] = {
    # Planetary Computer sentinel-2-l2a: band-coded asset keys (its collection's item_assets).
    "planetary-computer": {b: b for b in S2_BANDS} | {"SCL": "SCL"},
    # Element84 Earth Search v1 sentinel-2-l2a: common names (its collection's item_assets):
    # B02 blue, B03 green, B04 red, B05-B07 rededge1-3, B08 nir, B8A nir08, B11 swir16, B12 swir22.
    "earth-search": {
        "B04": "red", "B02": "blue", "B03": "green", "B08": "nir", "B8A": "nir08",
        "B05": "rededge1", "B06": "rededge2", "B07": "rededge3", "B11": "swir16",
        "B12": "swir22", "SCL": "scl",
    },
}
"""S2 band (TESSERA name, plus ``SCL``) -> asset key, per catalogue naming convention."""

S1_ASSETS: dict[str, str] = {"VV": "vv", "VH": "vh"}
"""S1 polarisation -> asset key (Planetary Computer sentinel-1-rtc)."""

PC_STAC = "https://planetarycomputer.microsoft.com/api/stac/v1"
PC_SAS = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
ES_STAC = "https://earth-search.aws.element84.com/v1"


@dataclass(frozen=True)
class Catalogue:
    """One STAC API collection as the source reads it (resolved from the config)."""

    api_url: str
    collection: str
    naming: AssetNaming
    sign: bool
    dn_offset_removed: bool
    """The catalogue's COGs have the baseline-04.00 offset removed already (the fallback when
    an item does not say so itself with ``earthsearch:boa_offset_applied``)."""


PRESETS: dict[str, tuple[Catalogue, Catalogue]] = {
    "planetary-computer": (
        Catalogue(PC_STAC, "sentinel-2-l2a", "planetary-computer", True, False),
        Catalogue(PC_STAC, "sentinel-1-rtc", "planetary-computer", True, False),
    ),
    # Earth Search has no open, terrain-corrected S1 (its sentinel-1-grd is requester-pays
    # GRD): Sentinel-1 RTC comes from Planetary Computer.
    "earth-search": (
        Catalogue(ES_STAC, "sentinel-2-l2a", "earth-search", False, True),
        Catalogue(PC_STAC, "sentinel-1-rtc", "planetary-computer", True, False),
    ),
}
"""(S2, S1) catalogues of each hosted preset."""

_URL = r"^https?://[^\s@?#]+$"


class StacConfig(BaseModel):
    """Where and how to read Sentinel-2 L2A and Sentinel-1 RTC from STAC catalogues."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["planetary-computer", "earth-search", "custom"] = Field(
        default="planetary-computer",
        description="'planetary-computer' (S2 L2A and S1 RTC, signed), 'earth-search' (S2 L2A "
        "from Element84 Earth Search, S1 RTC from Planetary Computer) or 'custom' (api_url and "
        "the naming/signing fields below).",
    )
    api_url: str | None = Field(
        default=None, pattern=_URL, max_length=512,
        description="STAC API of the S2 collection, replacing the preset's (a mirror, or the "
        "local endpoint); required with preset 'custom'.",
    )
    s1_api_url: str | None = Field(
        default=None, pattern=_URL, max_length=512,
        description="STAC API of the S1 collection, replacing the preset's. None: api_url "
        "where the preset reads S1 from the same API as S2 ('planetary-computer', 'custom'), "
        "else the preset's.",
    )
    s2_collection: str = Field(
        default="sentinel-2-l2a", pattern=r"^[A-Za-z0-9._-]+$", max_length=128,
        description="Collection id of Sentinel-2 L2A.",
    )
    s1_collection: str = Field(
        default="sentinel-1-rtc", pattern=r"^[A-Za-z0-9._-]+$", max_length=128,
        description="Collection id of Sentinel-1 RTC (gamma0 terrain-corrected linear power, "
        "assets vv and vh, sat:orbit_state on each item).",
    )
    asset_naming: AssetNaming | None = Field(
        default=None,
        description="S2 asset keys: 'planetary-computer' (B02 ... SCL) or 'earth-search' (blue "
        "... scl). None = the preset's ('planetary-computer' for 'custom').",
    )
    sign_s2: bool | None = Field(
        default=None,
        description="Sign S2 asset hrefs through the planetary-computer package. None = the "
        "preset's (no for 'custom').",
    )
    sign_s1: bool | None = Field(
        default=None,
        description="Sign S1 asset hrefs through the planetary-computer package. None = the "
        "preset's (no for 'custom').",
    )
    dn_offset_removed: bool | None = Field(
        default=None,
        description="The S2 catalogue's COGs already have the baseline-04.00 +1000 DN offset "
        "removed (Earth Search: yes; Planetary Computer: no). Used only for items that do not "
        "say so themselves (earthsearch:boa_offset_applied). None = the preset's (no for "
        "'custom').",
    )
    sas_url: str | None = Field(
        default=None, pattern=_URL, max_length=512,
        description="SAS token endpoint the planetary-computer package signs with (its "
        "Settings.sas_url); None = Planetary Computer's.",
    )
    subscription_key_env: str = Field(
        default="PC_SDK_SUBSCRIPTION_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128,
        description="Name of the environment variable that may hold a Planetary Computer "
        "subscription key (optional: signing works without one, at lower rate limits).",
    )
    secret_block: str | None = Field(
        default=None, pattern=r"^[a-z0-9-]+$", max_length=128,
        description='Name of a Prefect Secret block holding {"subscription_key": ...}; used '
        "instead of the environment variable.",
    )
    blob_mirror_url: str | None = Field(
        default=None, pattern=_URL, max_length=512,
        description="Read Azure blob hrefs (https://ACCOUNT.blob.core.windows.net/PATH) from "
        "{blob_mirror_url}/ACCOUNT/PATH instead, after signing (a mirror or the local "
        "endpoint's /blob).",
    )
    asset_href_rewrite: dict[str, str] = Field(
        default_factory=dict, max_length=8,
        description="URL prefix -> replacement applied to asset hrefs after signing (a mirror "
        "or caching proxy of the blob store; the local endpoint prints its own).",
    )
    max_cloud_cover: float = Field(
        default=100.0, ge=0.0, le=100.0,
        description="Keep S2 items whose eo:cloud_cover is at most this, percent (100 keeps "
        "all; the SCL cloud mask does the per-pixel work).",
    )
    page_size: int = Field(
        default=100, ge=1, le=1000, description="Items per search page ('limit'; then 'next')."
    )
    max_connections: int = Field(
        default=8, ge=1, le=64,
        description="Concurrent HTTP connections per tile (range reads of COG windows).",
    )
    max_attempts: int = Field(
        default=5, ge=1, le=20,
        description="Attempts per HTTP request on 5xx, 429, dropped connections, truncated "
        "bodies and timeouts (then the tile's task retry takes over).",
    )
    backoff_s: float = Field(
        default=1.0, ge=0.0, le=120.0,
        description="First wait between attempts, s (doubling; a 429's Retry-After wins).",
    )
    timeout_s: float = Field(default=60.0, ge=1.0, le=600.0, description="HTTP timeout, s.")
    missing_baseline: Literal["error", "by-date"] = Field(
        default="error",
        description="An S2 item without s2:processing_baseline: 'error' fails the tile; "
        "'by-date' assumes baseline 04.00 from 2022-01-25 on.",
    )
    cache_responses: bool = Field(
        default=True,
        description="Keep search results and read windows in the work root (stac-responses/), "
        "so a retried or re-run acquisition reads nothing twice.",
    )

    @model_validator(mode="after")
    def _check(self) -> StacConfig:
        if self.preset == "custom" and not self.api_url:
            raise ValueError("Expected api_url with preset 'custom'. Got none.")
        bad = [k for k, v in self.asset_href_rewrite.items()
               if not k.startswith(("http://", "https://")) or not v.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"Expected asset_href_rewrite keys and values to be http(s) URL "
                             f"prefixes. Got {bad[0]!r}.")
        return self

    def catalogues(self) -> tuple[Catalogue, Catalogue]:
        """The (S2, S1) catalogues this config reads, preset defaults filled in."""
        if self.preset == "custom":
            assert self.api_url is not None  # checked at construction
            s2 = Catalogue(self.api_url, self.s2_collection, "planetary-computer", False, False)
            s1 = Catalogue(self.s1_api_url or self.api_url, self.s1_collection,
                           "planetary-computer", False, False)
        else:
            s2, s1 = PRESETS[self.preset]
            shared = s1.api_url == s2.api_url
            s1_url = self.s1_api_url or (self.api_url if shared and self.api_url else s1.api_url)
            s2 = Catalogue(self.api_url or s2.api_url, self.s2_collection, s2.naming, s2.sign,
                           s2.dn_offset_removed)
            s1 = Catalogue(s1_url, self.s1_collection, s1.naming, s1.sign, s1.dn_offset_removed)

        def pick(v: object, default: object) -> object:
            return default if v is None else v

        s2 = Catalogue(s2.api_url.rstrip("/"), s2.collection,
                       pick(self.asset_naming, s2.naming),  # type: ignore[arg-type]
                       bool(pick(self.sign_s2, s2.sign)),
                       bool(pick(self.dn_offset_removed, s2.dn_offset_removed)))
        s1 = Catalogue(s1.api_url.rstrip("/"), s1.collection, s1.naming,
                       bool(pick(self.sign_s1, s1.sign)), False)
        return s2, s1
