"""A synthetic Earth: Sentinel-2 L2A and Sentinel-1 GRD scenes anywhere, without downloads.

The world is a deterministic function of (seed, UTM zone, easting, northing, date): every
random quantity comes from counter-based hashes of integer keys (pixel indices on the 10 m
zone grid, lattice nodes, parcel cells, days) and from lattice value noise evaluated at
absolute coordinates. Two tiles computed separately therefore agree exactly on shared pixels,
and any region of any zone can be built in any order. The model (parcels, phenology,
endmember spectra, clouds, SAR backscatter, disturbances) and its calibration against a real
Sentinel-2 patch are described in ``docs/synthetic-earth.md``.

Shapes: (T, H, W, C) for stacks, (H, W) for ground truth; H = W = ``tile.size_px``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.grid import PIXEL_M, Tile
from tasks.sources._noise import (
    fbm_grid,
    fbm_points,
    fbm_to_uniform,
    hash_keys,
    lattice_grid,
    splitmix64,
    tag,
    uniform,
    uniform16,
    value_noise_grid,
)
from tasks.sources.base import (
    BASELINE_0400_START,
    S2_BANDS,
    S2_DN_OFFSET,
    Orbit,
    S1Stack,
    S2Stack,
)

__all__ = [
    "BARE",
    "ALL_CLASS_NAMES",
    "BUILT_UP",
    "CLASS_NAMES",
    "HARD_PRESET",
    "LATE_MAIZE",
    "SPRING_CEREAL",
    "DECIDUOUS",
    "EVERGREEN",
    "GRASSLAND",
    "MAIZE",
    "WATER",
    "WINTER_CEREAL",
    "GroundTruth",
    "SyntheticSource",
    "SyntheticWorldConfig",
]

CLASS_NAMES: tuple[str, ...] = (
    "water",
    "built_up",
    "bare",
    "grassland",
    "winter_cereal",
    "maize",
    "deciduous_forest",
    "evergreen_forest",
)
"""Land-cover classes of the synthetic world; the class code is the index in this tuple."""
WATER, BUILT_UP, BARE, GRASSLAND, WINTER_CEREAL, MAIZE, DECIDUOUS, EVERGREEN = range(
    len(CLASS_NAMES)
)
SPRING_CEREAL, LATE_MAIZE = len(CLASS_NAMES), len(CLASS_NAMES) + 1
ALL_CLASS_NAMES: tuple[str, ...] = (*CLASS_NAMES, "spring_cereal", "late_maize")
"""Every class code a world can hold: the default world uses the first eight
(:data:`CLASS_NAMES`); ``timing_classes`` adds spring cereal and late-sown maize, which differ
from winter cereal and maize only in the timing of their season."""
_FORESTS = (DECIDUOUS, EVERGREEN)
_BURNABLE = (GRASSLAND, WINTER_CEREAL, MAIZE, DECIDUOUS, EVERGREEN, SPRING_CEREAL, LATE_MAIZE)
_ARABLE = (WINTER_CEREAL, MAIZE, BARE, SPRING_CEREAL, LATE_MAIZE)

# --- Endmember surface reflectances (BOA, 0..1) -------------------------------------------
# Wavelength order B02 B03 B04 B05 B06 B07 B08 B8A B11 B12. Representative values read off
# the USGS Spectral Library v7 (Kokaly et al. 2017) and ECOSTRESS library (Meerdink et al.
# 2019) resampled to S2 bands, cross-checked against typical L2A values in the literature;
# see docs/synthetic-earth.md for the per-endmember sources. Rounded, not exact extractions.
_WAVELENGTH_ORDER = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
_ENDMEMBERS_WL: dict[str, tuple[float, ...]] = {
    "green_leaf": (0.030, 0.065, 0.035, 0.110, 0.300, 0.380, 0.420, 0.440, 0.210, 0.100),
    "conifer": (0.020, 0.045, 0.022, 0.070, 0.190, 0.240, 0.260, 0.275, 0.120, 0.055),
    "dry_vegetation": (0.060, 0.085, 0.105, 0.140, 0.180, 0.210, 0.230, 0.250, 0.330, 0.230),
    "soil": (0.075, 0.105, 0.145, 0.175, 0.200, 0.220, 0.240, 0.255, 0.330, 0.270),
    "water": (0.050, 0.060, 0.038, 0.030, 0.015, 0.012, 0.010, 0.008, 0.004, 0.003),
    "urban": (0.100, 0.115, 0.130, 0.150, 0.165, 0.175, 0.185, 0.195, 0.230, 0.200),
    "char": (0.035, 0.045, 0.055, 0.065, 0.075, 0.085, 0.095, 0.105, 0.170, 0.150),
    "snow": (0.900, 0.890, 0.870, 0.850, 0.820, 0.800, 0.780, 0.760, 0.080, 0.060),
    "cloud": (0.600, 0.590, 0.600, 0.610, 0.610, 0.610, 0.610, 0.600, 0.420, 0.300),
    "cirrus": (0.070, 0.060, 0.055, 0.050, 0.045, 0.045, 0.040, 0.040, 0.030, 0.020),
    "haze": (0.030, 0.020, 0.014, 0.010, 0.008, 0.007, 0.006, 0.006, 0.002, 0.001),
}
_TO_S2 = [_WAVELENGTH_ORDER.index(b) for b in S2_BANDS]
_EM = {k: np.asarray(v, np.float32)[_TO_S2] for k, v in _ENDMEMBERS_WL.items()}
_B04, _B08 = S2_BANDS.index("B04"), S2_BANDS.index("B08")

# --- Acquisition plan ----------------------------------------------------------------------
_S2_REVISIT_D = 5
_S2B_START = np.datetime64("2017-07-06", "D")  # S2B operational; S2A alone (10 d) before
_S1_REVISIT_D = 12
_S1B_END = np.datetime64("2021-12-23", "D")  # S1B failure; 6 d per orbit before (S1A+S1B)
_SOUTH_SHIFT_D = 182  # southern seasons run half a year behind the calendar
_CLOUD_GAIN = 0.7  # fBm persistence of cloud fields: broken, fragmented edges at the 1 km scale
_LAT_BAND_M = 100_000.0  # sun angle and snow climate are set per 100 km band of northing

# --- S1 backscatter (dB), per class --------------------------------------------------------
# Volume terms and surface terms chosen inside the ranges reported for C-band (e.g. Veloso et
# al. 2017 for crops; Dostalova et al. 2018 for forests; rule of thumb water < -20 dB VV).
_VOL_DB = {  # (VV, VH) of a full vegetation volume
    GRASSLAND: (-11.5, -18.5),
    WINTER_CEREAL: (-12.0, -18.0),
    MAIZE: (-8.5, -14.5),
    SPRING_CEREAL: (-12.0, -18.0),
    LATE_MAIZE: (-8.5, -14.5),
    DECIDUOUS: (-7.5, -13.0),
    EVERGREEN: (-7.0, -12.5),
    BARE: (-12.0, -19.0),
    BUILT_UP: (-10.0, -17.0),
    WATER: (-25.0, -31.0),
}


HARD_PRESET: dict[str, Any] = {
    "timing_classes": True,
    "late_sowing_days": 18.0,
    "phenology_jitter_scale": 2.0,
    "parcel_vigour_spread": 0.25,
    "climate_shift_days": 12.0,
    "cloud_cover_scale": 1.35,
    "overcast_spell_probability": 0.25,
    "height_signal": 1.0,
    "canopy_density_spread": 0.3,
    "edge_mixing": 1.0,
    "fire_probability": 0.12,
}
"""Knob values of ``difficulty: hard`` (docs/synthetic-earth.md, "A harder world"); a knob
given explicitly wins over the preset."""


class SyntheticWorldConfig(BaseModel):
    """Parameters of the synthetic Earth. The same config always builds the same world.

    Every knob's default is the original ("default") world; ``difficulty: hard`` fills the
    knobs of :data:`HARD_PRESET` that are not given explicitly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    difficulty: Literal["default", "hard"] = Field(
        "default",
        description="Preset: 'default' (the original world) or 'hard' (timing-only classes, "
        "large within-class variation, regional climate shift, cloudier and irregular years, "
        "canopy height visible in the signal but confounded by stand density, mixed pixels "
        "at parcel edges, frequent fires); explicit knobs win.",
    )
    timing_classes: bool = Field(
        False,
        description="Split arable classes by timing only: spring vs winter cereal, late- vs "
        "early-sown maize (codes 8 and 9 of ALL_CLASS_NAMES).",
    )
    late_sowing_days: float = Field(
        18.0, ge=0.0, le=90.0, description="Delay of late-sown maize's season, days."
    )
    phenology_jitter_scale: float = Field(
        1.0, ge=0.0, le=5.0,
        description="Multiplier on per-parcel timing jitter (green-up +-10 d, senescence +-8 d, "
        "harvest +-10 d at 1).",
    )
    parcel_vigour_spread: float = Field(
        0.0, ge=0.0, le=0.6,
        description="Per-parcel multiplier on green cover, uniform in 1 +- this (0: none).",
    )
    climate_shift_days: float = Field(
        0.0, ge=0.0, le=60.0,
        description="Regional shift of every season date, up to +- this many days, varying "
        "smoothly over ~40 km (climate gradients between regions).",
    )
    overcast_spell_probability: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Chance per 30-day period and region (150 km field) of an overcast spell: "
        "every S2 date fully clouded (irregular, cloud-heavy years).",
    )
    height_signal: float = Field(
        0.0, ge=0.0, le=3.0,
        description="How strongly forest canopy height shows in the signal (S1 volume "
        "scattering and attenuation, S2 canopy shadowing and texture); 0: not at all.",
    )
    canopy_density_spread: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Per-parcel forest canopy density, uniform in 1 +- this, independent of "
        "height: it scales the same S1 volume and S2 shading terms as height, so brightness "
        "alone cannot tell a tall open stand from a short dense one; with it, height shows "
        "through saturating C-band volume scattering and the leaf-off (winter) vs leaf-on "
        "contrast instead of linearly; 0: off.",
    )
    edge_mixing: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Mixed pixels at parcel edges: a pixel whose 10 m footprint crosses the "
        "boundary to the neighbouring parcel takes that parcel's vegetation in proportion "
        "(times this); 0: every pixel is pure.",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("difficulty") == "hard":
            return {**HARD_PRESET, **data}
        return data

    seed: int = Field(
        0, ge=0, le=2**62, description="World seed: a different seed is a different planet."
    )
    parcel_size_m: float = Field(
        250.0,
        ge=50.0,
        le=2000.0,
        description="Spacing of the jittered lattice whose Voronoi cells are parcels, m.",
    )
    parcel_jitter: float = Field(
        0.85,
        ge=0.0,
        le=1.0,
        description="Jitter of parcel seed points, fraction of the parcel spacing.",
    )
    landscape_scale_m: float = Field(
        4000.0,
        ge=500.0,
        le=100_000.0,
        description="Base wavelength of the low-frequency noise that clusters classes into bodies, m.",
    )
    water_share: float = Field(
        0.07, ge=0.0, le=0.5, description="Approximate share of parcels that are water."
    )
    built_share: float = Field(
        0.08, ge=0.0, le=0.5, description="Approximate share of non-water parcels built up."
    )
    forest_share: float = Field(
        0.35, ge=0.0, le=0.9, description="Approximate share of remaining parcels forested."
    )
    evergreen_share: float = Field(
        0.4, ge=0.0, le=1.0, description="Share of forest that is evergreen."
    )
    grassland_share: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of open land that is permanent grassland."
    )
    cloud_cover_scale: float = Field(
        1.0,
        ge=0.0,
        le=2.5,
        description="Multiplier on the seasonal mean cloud cover (0 = always clear).",
    )
    cloud_mean: float = Field(
        0.40, ge=0.0, le=1.0, description="Annual mean cloud cover fraction before scaling."
    )
    cloud_seasonal_amplitude: float = Field(
        0.14,
        ge=0.0,
        le=0.5,
        description="Winter-minus-annual-mean cloud cover (cosine, peak mid-January).",
    )
    cloud_scale_m: float = Field(
        3_000.0, ge=1000.0, le=100_000.0, description="Base wavelength of cloud fields, m."
    )
    cirrus_probability: float = Field(
        0.15, ge=0.0, le=1.0, description="Chance that a date has thin cirrus, per region."
    )
    snow_probability: float = Field(
        0.35,
        ge=0.0,
        le=1.0,
        description="Chance of snow on a midwinter date at high latitude (>= 53 deg).",
    )
    fire_probability: float = Field(
        0.02, ge=0.0, le=1.0, description="Chance per vegetated parcel and year that it burns."
    )
    burn_recovery_days: float = Field(
        120.0,
        ge=5.0,
        le=2000.0,
        description="e-folding time of spectral recovery after a burn, days (forest x3).",
    )
    nodata_probability: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Chance per S2 date of a swath edge cutting the zone (SCL 0).",
    )
    defect_rate: float = Field(
        2e-5,
        ge=0.0,
        le=0.01,
        description="Chance per pixel and S2 date of a saturated/defective pixel (SCL 1).",
    )
    s1_looks: int = Field(
        4,
        ge=0,
        le=64,
        description="Equivalent number of looks of the S1 speckle (gamma); 0 disables speckle.",
    )


@dataclass(frozen=True)
class GroundTruth:
    """Ground truth of one tile and year.

    Attributes:
        land_cover: Class code (index into :data:`CLASS_NAMES`), uint8 (H, W).
        parcel_id: Globally unique parcel id, int64 (H, W).
        canopy_height: Vegetation height (annual maximum), metres, float32 (H, W).
        burn_doy: Day of year of a burn in this year, uint16 (H, W); 0 = not burned.
    """

    land_cover: np.ndarray
    parcel_id: np.ndarray
    canopy_height: np.ndarray
    burn_doy: np.ndarray


@dataclass(frozen=True)
class _Land:
    """Static (year-independent) layout of one tile."""

    x: np.ndarray  # (W,) pixel-centre eastings
    y: np.ndarray  # (H,) pixel-centre northings
    zkey: int
    lat_abs: np.ndarray  # (H,) |latitude| of each row's 100 km northing band centre, degrees
    shift: int  # season shift, days
    pix: np.ndarray  # (H, W) uint64 per-pixel base hash
    inv: np.ndarray  # (H, W) parcel index into the per-parcel arrays
    cell_x: np.ndarray  # (n,) parcel lattice cell
    cell_y: np.ndarray
    base_class: np.ndarray  # (n,) class, with arable parcels marked -1
    vigour: np.ndarray  # (H, W) float32 within-parcel multiplicative vegetation variation
    texture: np.ndarray  # (H, W) float32 in [-1, 1], static small-scale texture
    inv2: np.ndarray | None = None  # (H, W) neighbouring parcel across the nearest edge
    wmix: np.ndarray | None = None  # (H, W) float32 share of the footprint in inv2 (0..0.5)


@dataclass(frozen=True)
class _Year:
    """Per-parcel state for one season year."""

    cls: np.ndarray  # (n,) class
    green_jit: np.ndarray  # (n,) days
    sen_jit: np.ndarray
    harvest_jit: np.ndarray
    mow: np.ndarray  # (n, 4) mowing days (999 = none)
    burn_day: np.ndarray  # (n,) absolute season day of the burn, or a huge sentinel
    severity: np.ndarray  # (n,)
    amp: np.ndarray | None = None  # (n,) green-cover multiplier (parcel_vigour_spread)


_NO_BURN = 10**9


def _sig(t: float, centre: np.ndarray, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(t - centre) / width))


def _doy(days: np.ndarray) -> np.ndarray:
    d = np.asarray(days, dtype="datetime64[D]")
    return (d - d.astype("datetime64[Y]")).astype(np.int64) + 1


def _year(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype="datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970


class SyntheticSource:
    """Synthetic Sentinel-2 L2A / Sentinel-1 GRD scene source (implements ``SceneSource``)."""

    name = "synthetic"

    def __init__(self, config: SyntheticWorldConfig | None = None) -> None:
        self.config = config or SyntheticWorldConfig()

    # --- acquisition dates -------------------------------------------------------------------
    def _phase(self, tile: Tile, stream: str, period: int) -> int:
        h = hash_keys(self.config.seed, _zone_key(tile), tag(stream))
        return int(h % np.uint64(period))

    def s2_dates(self, tile: Tile, year: int) -> np.ndarray:
        """All S2 acquisitions of the year: every 5 days (10 before S2B), phase per zone."""
        days = _year_days(year)
        rel = days.astype(np.int64) - self._phase(tile, "s2-phase", 10)
        ok = (rel % _S2_REVISIT_D == 0) & ((days >= _S2B_START) | (rel % 10 == 0))
        return days[ok]

    def s1_dates(self, tile: Tile, year: int, orbit: Orbit) -> np.ndarray:
        """S1 acquisitions per orbit: every 12 days, every 6 before S1B's loss; phase per orbit."""
        if orbit not in ("ascending", "descending"):
            raise ValueError(f"Expected orbit 'ascending' or 'descending'. Got {orbit!r}.")
        days = _year_days(year)
        phase = self._phase(tile, "s1-phase-ascending", _S1_REVISIT_D)
        if orbit == "descending":  # a different day from ascending, also while S1B flew (6 d)
            lag = (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)[self._phase(tile, "s1-phase-descending", 10)]
            phase = (phase + lag) % _S1_REVISIT_D
        rel = days.astype(np.int64) - phase
        ok = np.where(days > _S1B_END, rel % _S1_REVISIT_D == 0, rel % (_S1_REVISIT_D // 2) == 0)
        return days[ok]

    # --- ground truth --------------------------------------------------------------------------
    def ground_truth(self, tile: Tile, year: int) -> GroundTruth:
        """Class, parcel id, canopy height and burn day of year of every pixel of a tile."""
        land = self._land(tile)
        st = self._year_state(land, year)
        cls = st.cls[land.inv].astype(np.uint8)
        n = land.cell_x.size
        zk = land.zkey
        pid = (np.int64(zk) << 46) + ((land.cell_y + 2**22) << 23) + (land.cell_x + 2**22)
        # canopy height: forests 10..35 m per parcel, +-15 % per pixel; crops at their annual max
        forest_h = self._forest_height(land, st.cls)
        base_h = np.select(
            [
                np.isin(st.cls, _FORESTS),
                np.isin(st.cls, (MAIZE, LATE_MAIZE)),
                st.cls == WINTER_CEREAL,
                st.cls == GRASSLAND,
                st.cls == SPRING_CEREAL,
            ],
            [forest_h, np.full(n, 2.6), np.full(n, 0.9), np.full(n, 0.4), np.full(n, 0.8)],
            0.0,
        ).astype(np.float32)
        height = base_h[land.inv] * (1.0 + 0.15 * land.texture) * np.clip(land.vigour, 0.7, 1.3)
        # burns: season days -> calendar dates in this year
        burn = np.zeros(n, np.uint16)
        for ys in (year, year + 1):
            s = self._year_state(land, ys)
            cal = s.burn_day - land.shift
            hit = (s.burn_day < _NO_BURN) & (_year(cal.astype("datetime64[D]")) == year)
            burn = np.where(hit, _doy(cal.astype("datetime64[D]")), burn).astype(np.uint16)
        return GroundTruth(
            land_cover=cls,
            parcel_id=pid[land.inv],
            canopy_height=height.astype(np.float32),
            burn_doy=burn[land.inv],
        )

    def _forest_height(self, land: _Land, cls: np.ndarray) -> np.ndarray:
        """Per-parcel forest canopy height, m: evergreen 10-35, deciduous 14-32 (hashed)."""
        cfg = self.config
        hp = uniform(hash_keys(cfg.seed, land.zkey, tag("height"), land.cell_x, land.cell_y))
        return np.where(cls == EVERGREEN, 10.0 + 25.0 * hp, 14.0 + 18.0 * hp)

    def _density(self, land: _Land, cls: np.ndarray) -> np.ndarray:
        """Per-parcel forest canopy density, 1 +- canopy_density_spread (1 off forest)."""
        cfg = self.config
        u = uniform(hash_keys(cfg.seed, land.zkey, tag("canopy-density"), land.cell_x,
                              land.cell_y))
        rho = 1.0 + cfg.canopy_density_spread * (2.0 * u - 1.0)
        return np.where(np.isin(cls, _FORESTS), rho, 1.0).astype(np.float32)

    def _height_norm(self, land: _Land, cls: np.ndarray) -> np.ndarray:
        """Per-parcel forest height mapped to about [-1, 1] ((h - 22 m) / 12 m), 0 off forest."""
        h = self._forest_height(land, cls)
        return np.where(np.isin(cls, _FORESTS), (h - 22.0) / 12.0, 0.0).astype(np.float32)

    # --- Sentinel-2 ------------------------------------------------------------------------------
    def read_s2(self, tile: Tile, dates: np.ndarray) -> S2Stack:
        """Synthetic S2 L2A of the tile on the given dates (any dates; each computed alone).

        Returns:
            S2Stack with bands uint16 (T, H, W, 10) in S2_BANDS order, scl uint8 (T, H, W) and
            offset int16 (T,): 1000 on and after 2022-01-25 (baseline 04.00), else 0.
        """
        dates = np.asarray(dates, dtype="datetime64[D]")
        land = self._land(tile)
        h = w = tile.size_px
        bands = np.zeros((dates.size, h, w, len(S2_BANDS)), np.uint16)
        scl = np.zeros((dates.size, h, w), np.uint8)
        offset = np.where(dates >= np.datetime64(BASELINE_0400_START), S2_DN_OFFSET, 0).astype(
            np.int16
        )
        for t, d in enumerate(dates):
            bands[t], scl[t] = self._s2_date(land, d, int(offset[t]))
        return S2Stack(dates=dates, bands=bands, scl=scl, offset=offset)

    # --- Sentinel-1 ------------------------------------------------------------------------------
    def read_s1(self, tile: Tile, dates: np.ndarray, orbit: Orbit) -> S1Stack:
        """Synthetic S1 GRD (linear sigma0, float32 (T, H, W, 2) [VV, VH]) on the given dates."""
        if orbit not in ("ascending", "descending"):
            raise ValueError(f"Expected orbit 'ascending' or 'descending'. Got {orbit!r}.")
        dates = np.asarray(dates, dtype="datetime64[D]")
        land = self._land(tile)
        values = np.zeros((dates.size, tile.size_px, tile.size_px, 2), np.float32)
        for t, d in enumerate(dates):
            values[t] = self._s1_date(land, d, orbit)
        return S1Stack(dates=dates, values=values)

    # ============================================================================================
    # The world model
    # ============================================================================================
    def _land(self, tile: Tile) -> _Land:
        cfg = self.config
        zk = _zone_key(tile)
        px = np.round((tile.eastings() - PIXEL_M / 2) / PIXEL_M).astype(np.int64)
        py = np.round((tile.northings() - PIXEL_M / 2) / PIXEL_M).astype(np.int64)
        x = px * PIXEL_M + PIXEL_M / 2
        y = py * PIXEL_M + PIXEL_M / 2
        # parcels: Voronoi cells of a jittered lattice (nearest of the 3 x 3 candidate seeds)
        size = cfg.parcel_size_m
        cx = np.floor(x / size).astype(np.int64)
        cy = np.floor(y / size).astype(np.int64)
        lx = np.arange(cx.min() - 1, cx.max() + 2)
        ly = np.arange(cy.min() - 1, cy.max() + 2)
        sx, sy = self._parcel_seeds(zk, lx[None, :], ly[:, None])
        best = np.full((y.size, x.size), np.inf)
        bx = np.zeros((y.size, x.size), np.int64)
        by = np.zeros((y.size, x.size), np.int64)
        mix = cfg.edge_mixing > 0
        if mix:  # also the second-nearest seed: the parcel across the nearest edge
            second = np.full((y.size, x.size), np.inf)
            b2x = np.zeros((y.size, x.size), np.int64)
            b2y = np.zeros((y.size, x.size), np.int64)
        for dy in (-1, 0, 1):
            iy = cy + dy - ly[0]
            for dx in (-1, 0, 1):
                ix = cx + dx - lx[0]
                d2 = (sx[np.ix_(iy, ix)] - x[None, :]) ** 2 + (sy[np.ix_(iy, ix)] - y[:, None]) ** 2
                closer = d2 < best
                if mix:
                    nxt = ~closer & (d2 < second)
                    second = np.where(closer, best, np.where(nxt, d2, second))
                    b2x = np.where(closer, bx, np.where(nxt, (cx + dx)[None, :], b2x))
                    b2y = np.where(closer, by, np.where(nxt, (cy + dy)[:, None], b2y))
                best = np.where(closer, d2, best)
                bx = np.where(closer, (cx + dx)[None, :], bx)
                by = np.where(closer, (cy + dy)[:, None], by)
        code = (by - ly[0]) * (lx.size + 1) + (bx - lx[0])
        inv2 = wmix = None
        if mix:
            code2 = (b2y - ly[0]) * (lx.size + 1) + (b2x - lx[0])
            uniq, inv_all = np.unique(np.concatenate([code.ravel(), code2.ravel()]),
                                      return_inverse=True)
            inv, inv2 = inv_all[: code.size], inv_all[code.size :].reshape(y.size, x.size)
            ax, ay = self._parcel_seeds(zk, bx, by)
            qx, qy = self._parcel_seeds(zk, b2x, b2y)
            gap = np.maximum(np.hypot(ax - qx, ay - qy), 1e-6)
            edge_dist = (second - best) / (2.0 * gap)  # pixel centre to the Voronoi boundary, m
            wmix = (cfg.edge_mixing * np.clip(0.5 - edge_dist / PIXEL_M, 0.0, 0.5)).astype(
                np.float32)
        else:
            uniq, inv = np.unique(code, return_inverse=True)
        cell_y = uniq // (lx.size + 1) + ly[0]
        cell_x = uniq % (lx.size + 1) + lx[0]
        # classes clustered by low-frequency noise evaluated at the parcel seed
        psx, psy = self._parcel_seeds(zk, cell_x, cell_y)
        scale = cfg.landscape_scale_m

        def field(name: str) -> np.ndarray:
            v = fbm_points(psx, psy, scale, 3, (cfg.seed, zk, tag(name)))
            return fbm_to_uniform(v, 3)

        hp = uniform(hash_keys(cfg.seed, zk, tag("grass-pick"), cell_x, cell_y))
        grass = (0.5 * field("grass") + 0.5 * hp) < cfg.grassland_share
        base = np.where(grass, GRASSLAND, -1)
        forest = field("forest") > 1.0 - cfg.forest_share
        base = np.where(
            forest, np.where(field("evergreen") < cfg.evergreen_share, EVERGREEN, DECIDUOUS), base
        )
        base = np.where(field("built") > 1.0 - cfg.built_share, BUILT_UP, base)
        base = np.where(field("water") > 1.0 - cfg.water_share, WATER, base)
        # within-parcel variation: 60 m and 20 m value noise plus pixel hash
        pix = hash_keys(cfg.seed, zk, tag("pixel"), px[None, :], py[:, None])
        n60 = value_noise_grid(x, y, 60.0, (cfg.seed, zk, tag("vigour60")))
        n200 = value_noise_grid(x, y, 200.0, (cfg.seed, zk, tag("vigour200")))
        hpx = uniform16(pix, 0)
        vigour = 1.0 + 0.10 * (n60 - 0.5) * 2 + 0.06 * (n200 - 0.5) * 2 + 0.04 * (hpx - 0.5) * 2
        texture = (n60 - 0.5) + (hpx - 0.5)
        # latitude (for sun angle and snow) per 100 km northing band, so it never depends on the tile
        band_centre = (np.floor(y / _LAT_BAND_M) + 0.5) * _LAT_BAND_M
        lat_abs = (1e7 - band_centre if tile.south else band_centre) / 110_950.0
        return _Land(
            x=x,
            y=y,
            zkey=zk,
            lat_abs=lat_abs,
            shift=_SOUTH_SHIFT_D if tile.south else 0,
            pix=pix,
            inv=inv.reshape(y.size, x.size),
            cell_x=cell_x,
            cell_y=cell_y,
            base_class=base,
            vigour=vigour.astype(np.float32),
            texture=texture.astype(np.float32),
            inv2=inv2,
            wmix=wmix,
        )

    def _parcel_seeds(
        self, zk: int, cx: np.ndarray, cy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        h = hash_keys(cfg.seed, zk, tag("parcel-seed"), cx, cy)
        u1 = uniform(h)
        u2 = uniform(splitmix64(h))
        j = cfg.parcel_jitter
        return (cx + 0.5 + j * (u1 - 0.5)) * cfg.parcel_size_m, (
            cy + 0.5 + j * (u2 - 0.5)
        ) * cfg.parcel_size_m

    def _year_state(self, land: _Land, ys: int) -> _Year:
        cfg = self.config
        cx, cy, zk = land.cell_x, land.cell_y, land.zkey

        def u(name: str, k: int = 0) -> np.ndarray:
            return uniform(hash_keys(cfg.seed, zk, tag(name), ys, k, cx, cy))

        r = u("rotation")
        crop = np.select([r < 0.45, r < 0.88], [WINTER_CEREAL, MAIZE], BARE)
        if cfg.timing_classes:  # half of each crop sown in the other season / later
            late = u("timing") < 0.5
            crop = np.where((crop == WINTER_CEREAL) & late, SPRING_CEREAL, crop)
            crop = np.where((crop == MAIZE) & late, LATE_MAIZE, crop)
        cls = np.where(land.base_class < 0, crop, land.base_class)
        mow = np.stack(
            [b + 16.0 * (u("mow", k) - 0.5) for k, b in enumerate((140, 185, 232, 278))], -1
        )
        n_cuts = 2 + np.floor(u("cuts") * 3).astype(np.int64)
        mow = np.where(np.arange(4)[None, :] < n_cuts[:, None], mow, 999.0)
        burns = np.isin(cls, _BURNABLE) & (u("fire") < cfg.fire_probability)
        start = int(np.datetime64(f"{ys}-01-01", "D").astype(np.int64))
        burn_day = np.where(
            burns, start + 100 + np.floor(u("fire-day") * 180).astype(np.int64), _NO_BURN
        )
        js = cfg.phenology_jitter_scale
        green_jit = 20.0 * (u("green-jit") - 0.5) * js
        sen_jit = 16.0 * (u("sen-jit") - 0.5) * js
        harvest_jit = 20.0 * (u("harvest-jit") - 0.5) * js
        if cfg.climate_shift_days > 0:  # regional climate: every season date shifts together
            psx, psy = self._parcel_seeds(zk, cx, cy)
            c = fbm_to_uniform(fbm_points(psx, psy, 40_000.0, 2, (cfg.seed, zk, tag("climate"))), 2)
            shift = cfg.climate_shift_days * (2.0 * c - 1.0)
            green_jit, sen_jit, harvest_jit = green_jit + shift, sen_jit + shift, harvest_jit + shift
        late_maize = cls == LATE_MAIZE
        if late_maize.any():
            lag = cfg.late_sowing_days
            green_jit = np.where(late_maize, green_jit + lag, green_jit)
            sen_jit = np.where(late_maize, sen_jit + lag, sen_jit)
            harvest_jit = np.where(late_maize, harvest_jit + lag, harvest_jit)
        amp = None
        if cfg.parcel_vigour_spread > 0:
            amp = 1.0 + cfg.parcel_vigour_spread * (2.0 * u("parcel-vigour") - 1.0)
        return _Year(
            cls=cls,
            green_jit=green_jit,
            sen_jit=sen_jit,
            harvest_jit=harvest_jit,
            mow=mow,
            burn_day=burn_day,
            severity=0.7 + 0.3 * u("severity"),
            amp=amp,
        )

    def _phenology(
        self, land: _Land, ds: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-parcel green and dry vegetation cover, burn strength and class at season day ds."""
        cfg = self.config
        ys = int(_year(np.asarray(ds).astype("datetime64[D]")))
        t = float(_doy(np.asarray(ds).astype("datetime64[D]")))
        st, nxt, prv = (
            self._year_state(land, ys),
            self._year_state(land, ys + 1),
            self._year_state(land, ys - 1),
        )
        cls = st.cls
        n = cls.size
        summer = 0.5 - 0.5 * math.cos(2 * math.pi * (t - 15) / 365.0)
        # winter cereal: emerged in autumn, green-up March, senescence late June, harvest July
        can = 0.25 + 0.62 * _sig(t, 85 + st.green_jit, 9.0)
        sen = _sig(t, 172 + st.sen_jit, 6.0)
        hv = 200 + st.harvest_jit
        cer_g = np.where(t < hv, can * (1 - sen), 0.0)
        cer_d = np.where(t < hv, can * sen, 0.35 * np.exp(-(t - hv) / 40.0))
        # maize: green-up June, senescence September, harvest October
        can = 0.9 * _sig(t, 165 + st.green_jit, 7.0)
        sen = _sig(t, 252 + st.sen_jit, 8.0)
        hv = 282 + st.harvest_jit
        mz_g = np.where(t < hv, can * (1 - sen), 0.0)
        mz_d = np.where(t < hv, can * sen, 0.3 * np.exp(-(t - hv) / 40.0))
        sp_g = sp_d = np.zeros(n)
        if cfg.timing_classes:  # spring cereal: sown in March, green-up May, harvest August
            can = 0.85 * _sig(t, 118 + st.green_jit, 8.0)
            sen = _sig(t, 190 + st.sen_jit, 6.0)
            hv = 218 + st.harvest_jit
            sp_g = np.where(t < hv, can * (1 - sen), 0.0)
            sp_d = np.where(t < hv, can * sen, 0.35 * np.exp(-(t - hv) / 40.0))
        # grassland: spring growth, 2-4 cuts, each followed by regrowth
        g = 0.42 + 0.42 * _sig(t, 95 + st.green_jit, 12.0) - 0.2 * _sig(t, 300 + st.sen_jit, 15.0)
        last = np.where(st.mow <= t, st.mow, -999.0).max(axis=1)
        cut = 0.6 * np.exp(-(t - last) / 15.0)
        gr_g, gr_d = g * (1 - cut), 0.5 * g * cut
        # deciduous: leaf-on late April, leaf-off October; woody/litter background
        leaf = _sig(t, 118 + st.green_jit, 6.0) * (1 - _sig(t, 292 + st.sen_jit, 8.0))
        de_g, de_d = 0.08 + 0.8 * leaf, 0.1 + 0.45 * (1 - leaf)
        ev_g = np.full(n, 0.76 + 0.08 * summer)
        bare_g = 0.04 + 0.08 * _sig(t, 110 + st.green_jit, 12.0) * (
            1 - _sig(t, 240 + st.sen_jit, 15.0)
        )
        conds = [
            cls == c
            for c in (WINTER_CEREAL, MAIZE, GRASSLAND, DECIDUOUS, EVERGREEN, BARE, BUILT_UP)
        ]
        green = np.select(
            conds, [cer_g, mz_g, gr_g, de_g, ev_g, bare_g, np.full(n, 0.1 + 0.08 * summer)], 0.0
        )
        dry = np.select(
            conds,
            [cer_d, mz_d, gr_d, de_d, np.full(n, 0.1), np.full(n, 0.08), np.full(n, 0.03)],
            0.0,
        )
        if cfg.timing_classes:
            green = np.select([cls == SPRING_CEREAL, cls == LATE_MAIZE], [sp_g, mz_g], green)
            dry = np.select([cls == SPRING_CEREAL, cls == LATE_MAIZE], [sp_d, mz_d], dry)
        if st.amp is not None:
            green = green * st.amp
        # autumn sowing of next season's winter cereal
        sow = (nxt.cls == WINTER_CEREAL) & np.isin(cls, _ARABLE)
        green = np.where(sow, np.maximum(green, 0.25 * _sig(t, 300 + nxt.green_jit, 8.0)), green)
        # burns of this or the previous season, recovering exponentially
        tau = np.where(np.isin(cls, _FORESTS), 3.0, 1.0) * cfg.burn_recovery_days
        burn = np.zeros(n)
        for s in (st, prv):
            age = ds - s.burn_day
            burn = np.maximum(
                burn, np.where(age >= 0, s.severity * np.exp(-np.maximum(age, 0) / tau), 0.0)
            )
        return green, dry, burn, cls

    def _moisture(self, land: _Land, d: int, sd: float) -> np.ndarray:
        """Soil moisture 0..1 (H, W): antecedent-precipitation index of hashed rain events on a
        25 km lattice, smoothly interpolated, plus a seasonal baseline (wetter in winter)."""
        cfg = self.config
        lags = np.arange(40)

        def nodes(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
            k = (d - lags)[:, None, None]
            h = hash_keys(cfg.seed, land.zkey, tag("rain"), k, lx[None, None, :], ly[None, :, None])
            wet = uniform(h) < 0.3
            amount = -np.log(uniform(splitmix64(h)) + 1e-12) * 8.0
            api = (wet * amount * np.exp(-lags / 5.0)[:, None, None]).sum(axis=0)
            return (
                0.15
                + 0.1 * math.cos(2 * math.pi * (sd - 20) / 365.0)
                + 0.6 * (1 - np.exp(-api / 15.0))
            )

        return np.clip(lattice_grid(land.x, land.y, 25_000.0, nodes), 0.0, 1.0)

    def _surface(self, land: _Land, d: int) -> dict[str, np.ndarray]:
        ds = d + land.shift
        sd = float(_doy(np.asarray(ds).astype("datetime64[D]")))
        green_p, dry_p, burn_p, cls_p = self._phenology(land, ds)
        inv = land.inv
        cls = cls_p[inv]

        def px(v: np.ndarray) -> np.ndarray:  # per parcel -> per pixel (edges mixed)
            v = v.astype(np.float32)
            if land.wmix is None:
                return v[inv]
            return (1.0 - land.wmix) * v[inv] + land.wmix * v[land.inv2]

        green = np.clip(px(green_p) * land.vigour, 0.0, 1.0)
        dry = np.clip(px(dry_p), 0.0, 1.0 - green)
        burn = px(burn_p)
        moist = self._moisture(land, d, sd)
        out = {
            "cls": cls,
            "green": green,
            "dry": dry,
            "burn": burn,
            "moist": moist,
            "sd": np.float32(sd),
        }
        if self.config.height_signal > 0:
            out["height"] = self._height_norm(land, cls_p)[inv] * np.float32(self.config.height_signal)
            if self.config.canopy_density_spread > 0:
                rho = self._density(land, cls_p)[inv]
                out["density"] = rho
                out["green"] = np.clip(out["green"] * rho, 0.0, 1.0)  # denser: more leaf cover
                out["dry"] = np.minimum(out["dry"], 1.0 - out["green"])
                # C band saturates with height (the density terms are in _s1_date, _s2_date)
                out["height"] = (np.tanh(1.5 * out["height"]) / np.tanh(1.5)).astype(np.float32)
        return out

    def _s2_date(
        self, land: _Land, d64: np.datetime64, offset: int
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        d = int(d64.astype(np.int64))
        s = self._surface(land, d)
        cls, green, dry, burn, moist, sd = (
            s["cls"],
            s["green"],
            s["dry"],
            s["burn"],
            s["moist"],
            float(s["sd"]),
        )
        zk, x, y = land.zkey, land.x, land.y
        key = (cfg.seed, zk, d)
        # background: soil darkened by moisture (per-parcel brightness), urban, or water
        pb = uniform(hash_keys(cfg.seed, zk, tag("soil-bright"), land.cell_x, land.cell_y))
        bright = (0.75 + 0.5 * pb).astype(np.float32)[land.inv] * (1.0 + 0.05 * land.texture)
        soil = _EM["soil"] * (bright * (1.0 - 0.35 * moist))[..., None]
        litter = 0.5 * _EM["soil"] + 0.5 * _EM["dry_vegetation"]
        bg = np.where(
            (cls == WATER)[..., None],
            _EM["water"] * (0.8 + 0.5 * bright)[..., None],
            np.where((cls == BUILT_UP)[..., None], _EM["urban"] * bright[..., None], soil),
        )
        bg = np.where(np.isin(cls, _FORESTS)[..., None], litter * bright[..., None], bg)
        leaf = np.where((cls == EVERGREEN)[..., None], _EM["conifer"], _EM["green_leaf"])
        refl = (
            bg * (1.0 - green - dry)[..., None]
            + leaf * green[..., None]
            + _EM["dry_vegetation"] * dry[..., None]
        )
        if "height" in s:  # taller, rougher canopies: more shadow, more texture (forests)
            hs = s["height"] * s["density"] if "density" in s else s["height"]
            refl *= (1.0 - 0.12 * hs * (1.0 - burn) + 0.10 * (hs + np.abs(hs)) * land.texture)[..., None]
        refl += (burn[..., None] * (_EM["char"] - refl)).astype(np.float32)
        # snow (high latitude, winter, regional events; visible less through forest canopy)
        winter = max(0.0, math.cos(2 * math.pi * (sd - 20) / 365.0)) ** 2
        p_snow = cfg.snow_probability * winter * np.clip((land.lat_abs - 38.0) / 15.0, 0.0, 1.0)
        snow = np.zeros_like(green)
        if p_snow.max() > 0:
            event = _regional(x, y, (*key, tag("snow-event"))) < p_snow[:, None]
            if event.any():
                local = fbm_to_uniform(fbm_grid(x, y, 4000.0, 4, (*key, tag("snow"))), 4)
                snow_cover = np.clip((local - 0.25) / 0.2, 0.0, 1.0) * event
                veil = np.select(
                    [cls == WATER, cls == EVERGREEN, cls == DECIDUOUS], [0.0, 0.35, 0.6], 1.0
                )
                snow = (snow_cover * veil).astype(np.float32)
                refl += snow[..., None] * (_EM["snow"] - refl)
        # atmosphere: regional haze, cloud cover (mixture calibrated on the eo-learn patch)
        haze = value_noise_grid(x, y, 80_000.0, (*key, tag("haze")))
        refl += (haze**2)[..., None] * _EM["haze"]
        m = cfg.cloud_cover_scale * (
            cfg.cloud_mean
            + cfg.cloud_seasonal_amplitude * math.cos(2 * math.pi * (sd - 15) / 365.0)
        )
        cover = _cover_from_u(_regional(x, y, (*key, tag("cover"))), m)
        if cfg.overcast_spell_probability > 0:  # irregular years: month-long overcast spells
            spell = _regional(x, y, (cfg.seed, zk, d // 30, tag("overcast-spell")))
            cover = np.where(spell < cfg.overcast_spell_probability, np.float32(1.0), cover)
        tau = self._cloud(x, y, key, cover)
        # shadows: the cloud field seen from each pixel toward the sun, per latitude band
        top = float(uniform(hash_keys(*key, tag("cloud-top"))))
        tau_s = np.empty_like(tau)
        for lat in np.unique(land.lat_abs):
            rows = land.lat_abs == lat
            dist, az = _sun_offset(float(lat), land.shift > 0, sd, top)
            yr = y[rows]
            tau_s[rows] = self._cloud(
                x + dist * math.sin(az), yr + dist * math.cos(az), key, cover[rows]
            )
        shade = np.clip(1.5 * tau_s, 0.0, 1.0) * (tau < 0.03)
        refl *= (1.0 - 0.75 * shade)[..., None]
        cir_on = _regional(x, y, (*key, tag("cirrus-on"))) < cfg.cirrus_probability
        cir = np.zeros_like(tau)
        if cir_on.any():
            streak = fbm_to_uniform(fbm_grid(x * 0.25, y, 6000.0, 4, (*key, tag("cirrus"))), 4)
            cir = np.clip((streak - 0.45) / 0.4, 0.0, 1.0) * cir_on
            refl += cir[..., None] * _EM["cirrus"]
        alpha = np.clip(1.3 * tau**0.8, 0.0, 1.0)
        refl += alpha[..., None] * (_EM["cloud"] * (0.75 + 0.25 * tau)[..., None] - refl)
        # sensor/correction noise: 10 band values from two 64-bit hashes per pixel-date
        h1 = splitmix64(land.pix ^ hash_keys(*key, tag("s2-noise-1")))
        h2 = splitmix64(land.pix ^ hash_keys(*key, tag("s2-noise-2")))
        noise = np.stack(
            [_lane12(h1, k) for k in range(5)] + [_lane12(h2, k) for k in range(5)], -1
        )
        refl += (noise - 0.5) * (0.004 + 0.03 * refl)
        dn = np.clip(np.round(np.clip(refl, 0.0, 6.0) * 10000.0) + offset, 1, 65535).astype(
            np.uint16
        )
        # scene classification, in priority order
        ndvi = (refl[..., _B08] - refl[..., _B04]) / (refl[..., _B08] + refl[..., _B04] + 1e-6)
        scl = np.where(ndvi > 0.4, 4, 5).astype(np.uint8)
        scl[(cls == WATER) & (ndvi < 0.2)] = 6
        scl[snow > 0.5] = 11
        scl[cir > 0.35] = 10
        scl[shade > 0.35] = 3
        scl[tau > 0.03] = 8
        scl[tau > 0.45] = 9
        defect = uniform16(h2, 3) < cfg.defect_rate
        scl[defect] = 1
        dn[defect] = 65535
        if uniform(hash_keys(*key, tag("nodata-on"))) < cfg.nodata_probability:
            u = uniform(hash_keys(*key, tag("nodata-edge")))
            edge = 166_000.0 + 668_000.0 * u + (y[:, None] - 5e6) * 0.21
            side = uniform(hash_keys(*key, tag("nodata-side"))) < 0.5
            gone = (x[None, :] > edge) if side else (x[None, :] < edge)
            scl[gone] = 0
            dn[gone] = 0
        return dn, scl

    def _cloud(
        self, x: np.ndarray, y: np.ndarray, key: tuple[int, ...], cover: np.ndarray
    ) -> np.ndarray:
        """Cloud optical-thickness proxy 0..1 (H, W): multi-octave noise thresholded at the cover."""
        v = fbm_grid(x, y, self.config.cloud_scale_m, 6, (*key, tag("cloud")), _CLOUD_GAIN)
        v = fbm_to_uniform(v, 6, _CLOUD_GAIN)
        return np.clip((v - (1.0 - cover)) / 0.06, 0.0, 1.0)

    def _s1_date(self, land: _Land, d64: np.datetime64, orbit: Orbit) -> np.ndarray:
        cfg = self.config
        d = int(d64.astype(np.int64))
        s = self._surface(land, d)
        cls, green, dry, burn, moist = s["cls"], s["green"], s["dry"], s["burn"], s["moist"]
        zk, x, y = land.zkey, land.x, land.y
        okey = tag(f"s1-{orbit}")
        key = (cfg.seed, zk, d, okey)
        woody = np.where(np.isin(cls, _FORESTS), np.float32(0.55), np.float32(0.0))
        if "height" in s:  # taller forest: more woody volume (more attenuation of the ground)
            woody = woody + np.float32(0.2) * s["height"] * s.get("density", np.float32(1.0))
        vol = np.clip(green + dry + woody, 0.0, 1.0) * (1.0 - burn)
        att = np.exp(np.float32(-2.2) * vol)
        rough = (
            uniform(hash_keys(cfg.seed, zk, tag("roughness"), land.cell_x, land.cell_y)) * 4.0 - 2.0
        )
        soil_vv = -19.0 + 11.0 * moist + rough.astype(np.float32)[land.inv]
        bias = 0.3 if orbit == "ascending" else -0.3
        vv_db_vol = np.zeros_like(green)
        vh_db_vol = np.zeros_like(green)
        for c, (vv_c, vh_c) in _VOL_DB.items():
            vv_db_vol = np.where(cls == c, np.float32(vv_c), vv_db_vol)
            vh_db_vol = np.where(cls == c, np.float32(vh_c), vh_db_vol)
        if "height" in s:  # volume scattering grows with canopy height (C band, below saturation)
            vv_db_vol = vv_db_vol + np.float32(1.5) * s["height"]
            vh_db_vol = vh_db_vol + np.float32(2.5) * s["height"]
            if "density" in s:  # ... and with stand density, whatever the height
                vv_db_vol = vv_db_vol + np.float32(2.0) * (s["density"] - 1.0)
                vh_db_vol = vh_db_vol + np.float32(3.0) * (s["density"] - 1.0)
        vv = _lin(vv_db_vol) * (1.0 - att) + _lin(soil_vv) * att
        vh = _lin(vh_db_vol) * (1.0 - att) + _lin(soil_vv - 9.0) * att
        # water: specular, roughened by regional wind
        wind = value_noise_grid(x, y, 60_000.0, (*key, tag("wind")))
        is_water = cls == WATER
        vv = np.where(is_water, _lin(-25.0 + 7.0 * wind), vv)
        vh = np.where(is_water, _lin(-31.0 + 4.0 * wind), vh)
        # built-up: double bounce, depends on building orientation relative to the look direction
        asp = uniform(
            hash_keys(cfg.seed, zk, tag("aspect"), okey, land.cell_x, land.cell_y)
        ).astype(np.float32)
        is_built = cls == BUILT_UP
        vv = np.where(is_built, _lin(-5.0 + 6.0 * asp[land.inv]), vv)
        vh = np.where(is_built, _lin(-13.0 + 4.0 * asp[land.inv]), vh)
        out = np.stack([vv, vh], -1) * _lin(bias + 0.8 * land.texture)[..., None]
        if cfg.s1_looks > 0:
            looks = cfg.s1_looks
            need = 2 * looks
            lanes = []
            for k in range((need + 3) // 4):
                h = splitmix64(land.pix ^ hash_keys(*key, tag("speckle"), k))
                lanes += [uniform16(h, j) for j in range(4)]
            vv_g = -sum(np.log(u) for u in lanes[:looks]) / looks
            vh_g = -sum(np.log(u) for u in lanes[looks:need]) / looks
            out *= np.stack([vv_g, vh_g], -1)
        return out.astype(np.float32)


def _zone_key(tile: Tile) -> int:
    return tile.zone * 2 + int(tile.south)


def _year_days(year: int) -> np.ndarray:
    return np.arange(np.datetime64(f"{year}-01-01", "D"), np.datetime64(f"{year + 1}-01-01", "D"))


def _lin(db: np.ndarray | float) -> np.ndarray:
    return np.power(np.float32(10.0), np.asarray(db, np.float32) / np.float32(10.0))


def _lane12(h: np.ndarray, k: int) -> np.ndarray:
    lane = (h >> np.uint64(12 * k)) & np.uint64(0xFFF)
    return (lane.astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 4096.0)


def _cover_from_u(u: np.ndarray, mean: float) -> np.ndarray:
    """Regional cloud cover from a uniform variate: a clear / broken / overcast mixture with the
    given mean (bimodal like the per-date cloudy share of the real patch)."""
    mean = min(max(mean, 0.0), 1.0)
    # weight of broken cover, uniform on (0.03, 0.97); shrinks towards always-clear/overcast
    wp = 0.45 * min(1.0, mean / 0.25, (1.0 - mean) / 0.25)
    wo = float(np.clip((mean - 0.5 * wp - 0.015 * (1 - wp)) / 0.97, 0.0, 1.0 - wp))
    wc = max(1.0 - wp - wo, 0.0)
    if wc == 0.0:
        wp = 1.0 - wo
    clear = 0.03 * min(1.0, mean / 0.05) * u / max(wc, 1e-9)
    broken = 0.03 + 0.94 * (u - wc) / max(wp, 1e-9)
    over = 0.97 + 0.03 * (u - wc - wp) / max(wo, 1e-9)
    return np.where(u < wc, clear, np.where(u < wc + wp, broken, over)).astype(np.float32)


def _regional(x: np.ndarray, y: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
    """A weather-scale (150 km) field with a roughly uniform marginal, float32 (H, W)."""
    return fbm_to_uniform(value_noise_grid(x, y, 150_000.0, key), 1)


def _sun_offset(lat_abs: float, south: bool, sd: float, u: float) -> tuple[float, float]:
    """Ground distance (m) and azimuth (rad, toward the sun) from a shadow to its cloud."""
    decl = 23.44 * math.sin(2 * math.pi * (sd - 81) / 365.0)
    elev = max(90.0 - lat_abs + decl - 8.0, 15.0)  # ~10:30 local overpass
    height = 1000.0 + 2000.0 * float(u)
    az = math.radians(30.0 if south else 150.0)  # toward the morning sun: SSE north, NNE south
    return height / math.tan(math.radians(elev)), az
