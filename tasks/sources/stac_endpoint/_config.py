"""Configuration of the local STAC endpoint, its granule layout and the faults it injects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.sources.synthetic import SyntheticWorldConfig

TransientFault = Literal["500", "503", "429", "drop", "truncated"]
PermanentFault = Literal["401", "403", "missing-asset"]


class FaultConfig(BaseModel):
    """Faults injected into COG (blob) answers, deterministically from ``seed`` and the
    request order.

    Transient faults hit blob requests at ``rate``; each distinct request (URL path and byte
    range) gets at most ``max_per_request`` of them, so a client with enough attempts always
    completes. A permanent fault answers every blob request the same way ('401'/'403'), or
    makes the asset ``missing_asset`` absent from the blob store (404 BlobNotFound).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float = Field(default=0.0, ge=0.0, le=1.0,
                        description="Chance that a blob answer carries a transient fault.")
    kinds: tuple[TransientFault, ...] = Field(
        default=("500", "503", "429", "drop", "truncated"), min_length=1,
        description="Transient faults to draw from (uniformly): 5xx, throttling (429 with "
        "Retry-After), a dropped connection, a body cut short of its Content-Length.",
    )
    max_per_request: int = Field(default=2, ge=1, le=100,
                                 description="Most transient faults for one distinct request.")
    retry_after_s: int = Field(default=0, ge=0, le=600,
                               description="Retry-After of a 429 answer, seconds.")
    permanent: PermanentFault | None = Field(
        default=None,
        description="'401'/'403': refuse every blob request; 'missing-asset': the asset "
        "named by missing_asset answers 404.",
    )
    missing_asset: str = Field(default="B8A", pattern=r"^[A-Za-z0-9_]+$",
                               description="Asset key that 'missing-asset' removes.")
    search_rate: float = Field(default=0.0, ge=0.0, le=1.0,
                               description="Chance that a search answer carries a 503.")
    seed: int = Field(default=0, ge=0, le=2**62, description="Seed of the fault draws.")


class EndpointConfig(BaseModel):
    """The local endpoint: where it listens, what world it serves, how it is cut into granules."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Literal["127.0.0.1", "localhost", "::1"] = Field(
        default="127.0.0.1", description="Loopback address to bind (never a public interface).")
    port: int = Field(default=0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    world: SyntheticWorldConfig = Field(default_factory=SyntheticWorldConfig,
                                        description="The synthetic Earth served.")
    months: tuple[int, ...] | None = Field(
        default=None,
        description="Serve only acquisitions in these calendar months (1-12): keeps tests and "
        "benchmarks short; None serves every date.",
    )
    granule_px: int = Field(
        default=512, ge=256, le=4096,
        description="Side of a granule (one item's COGs), 10 m pixels. Real MGRS granules are "
        "10,980 px; small ones keep the synthetic rendering cheap.",
    )
    granule_step_px: int = Field(
        default=448, ge=64, le=4096,
        description="Spacing of granule origins, px (granule_px - step = the overlap).",
    )
    granule_origin_m: tuple[int, int] = Field(
        default=(0, 0),
        description="(easting, northing) offset of the granule lattice in each zone, metres "
        "(multiples of 20 m).",
    )
    native_20m: bool = Field(
        default=False,
        description="Write B05 B06 B07 B8A B11 B12 and SCL at 20 m as in the real products "
        "(2 x 2 mean; SCL the top-left sample). False: every band at 10 m (exact round trip).",
    )
    reprocessed_months: tuple[int, ...] = Field(
        default=(),
        description="Months of years before 2022 whose S2 items are reprocessed to baseline "
        "05.00: their COGs carry the +1000 DN offset (Planetary Computer) although their date "
        "is before 2022-01-25.",
    )
    block_px: int = Field(default=256, ge=64, le=1024,
                          description="COG tile size, px (a window reads only its tiles).")
    page_size_max: int = Field(default=100, ge=1, le=1000,
                               description="Most items per search page (then a 'next' link).")
    cache_mb: int = Field(default=512, ge=16, le=65536,
                          description="Memory for rendered COGs, MiB (least recently used out).")
    sas_expiry_s: int = Field(default=3600, ge=60, le=86400,
                              description="Lifetime of issued SAS tokens, s.")
    faults: FaultConfig = Field(default_factory=FaultConfig, description="Injected faults.")

    @model_validator(mode="after")
    def _check(self) -> EndpointConfig:
        if self.granule_step_px > self.granule_px:
            raise ValueError(f"Expected granule_step_px <= granule_px={self.granule_px} "
                             f"(granules overlap or touch). Got {self.granule_step_px}.")
        if any(v % 20 for v in self.granule_origin_m) or self.granule_step_px % 2 \
                or self.granule_px % 2:
            raise ValueError("Expected granule_origin_m in multiples of 20 m and even "
                             f"granule_px/granule_step_px. Got {self.granule_origin_m}, "
                             f"{self.granule_px}, {self.granule_step_px}.")
        return self
