"""Configuration of the local Sentinel Hub endpoint and of the faults it injects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from tasks.sources.synthetic import SyntheticWorldConfig

TransientFault = Literal["429", "500", "503", "slow", "truncated", "corrupt", "expired_token"]


class FaultConfig(BaseModel):
    """Faults injected into answers, deterministically from ``seed`` and the request order.

    Transient faults hit catalog and Process requests at ``rate``; each distinct request gets
    at most ``max_per_request`` of them (so a client with enough retries always completes).
    A permanent fault answers every request of its kind the same way.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Chance that an answer carries a transient fault."
    )
    kinds: tuple[TransientFault, ...] = Field(
        default=("429", "500", "503", "slow", "truncated", "corrupt", "expired_token"),
        min_length=1,
        description="Transient faults to draw from (uniformly).",
    )
    max_per_request: int = Field(
        default=2, ge=1, le=100, description="Most transient faults for one distinct request."
    )
    retry_after_ms: int = Field(
        default=20, ge=0, le=600_000, description="Retry-After of a 429 answer, milliseconds."
    )
    slow_s: float = Field(default=0.3, ge=0.0, le=600.0, description="Delay of a slow answer, s.")
    permanent: Literal["401", "400"] | None = Field(
        default=None,
        description="'401': the token endpoint rejects every client; '400': every Process "
        "request is rejected as invalid.",
    )
    seed: int = Field(default=0, ge=0, le=2**62, description="Seed of the fault draws.")


class EndpointConfig(BaseModel):
    """The local endpoint: where it listens, whom it accepts, what world it serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Literal["127.0.0.1", "localhost", "::1"] = Field(
        default="127.0.0.1", description="Loopback address to bind (never a public interface)."
    )
    port: int = Field(default=0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    client_id: str = Field(default="local-client", min_length=1, description="Accepted client id.")
    client_secret: SecretStr = Field(
        default=SecretStr("local-secret"), description="Accepted client secret."
    )
    token_expires_in: int = Field(
        default=3600, ge=1, le=86400, description="expires_in of issued tokens, s."
    )
    world: SyntheticWorldConfig = Field(
        default_factory=SyntheticWorldConfig, description="The synthetic Earth served."
    )
    catalog_page_size: int = Field(
        default=100, ge=1, le=1000, description="Most features per catalog page (then 'next')."
    )
    months: tuple[int, ...] | None = Field(
        default=None,
        description="Serve only acquisitions in these calendar months (1-12), a knob that keeps "
        "tests and benchmarks short; None serves every date.",
    )
    faults: FaultConfig = Field(default_factory=FaultConfig, description="Injected faults.")
    memo_responses: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Keep this many encoded Process responses in memory and answer repeats "
        "from there (benchmarks: measures the client, not the synthetic Earth); 0 = off.",
    )
