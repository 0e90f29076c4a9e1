"""The scene-source interface shared by the synthetic Earth and Sentinel Hub.

A source answers three questions for one tile and one year: which acquisition dates exist,
and what the Sentinel-2 L2A and Sentinel-1 GRD observations of the tile are on those dates,
already on the tile's 10 m UTM grid. Arrays are returned in the factory's canonical layouts
(below); encodings for the TESSERA d-pixel contract are applied downstream, once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from tasks.grid import Tile

Orbit = Literal["ascending", "descending"]

S2_BANDS: tuple[str, ...] = ("B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12")
"""Sentinel-2 bands in TESSERA's order (not wavelength order; the v1 weights depend on it)."""
S1_BANDS: tuple[str, ...] = ("VV", "VH")
"""Sentinel-1 polarisations in TESSERA's order."""

BASELINE_0400_START = dt.date(2022, 1, 25)
"""From this date on, L2A products (processing baseline 04.00) carry a +1000 DN offset."""
S2_DN_OFFSET = 1000


@dataclass(frozen=True)
class S2Stack:
    """Sentinel-2 L2A observations of one tile.

    Attributes:
        dates: Acquisition dates, shape (T,), ascending.
        bands: Digital numbers as delivered, uint16 (T, H, W, 10), in :data:`S2_BANDS` order.
            Where ``offset[t]`` is non-zero the DN of date t include that offset.
        scl: Scene classification codes 0..11, uint8 (T, H, W).
        offset: DN offset carried by each date (1000 for baseline 04.00, else 0), int16 (T,).
    """

    dates: np.ndarray
    bands: np.ndarray
    scl: np.ndarray
    offset: np.ndarray


@dataclass(frozen=True)
class S1Stack:
    """Sentinel-1 GRD IW observations of one tile, one orbit direction.

    Attributes:
        dates: Acquisition dates, shape (T,), ascending.
        values: Linear backscatter as delivered, float32 (T, H, W, 2) in [VV, VH] order;
            0 or NaN where there is no data.
    """

    dates: np.ndarray
    values: np.ndarray


@runtime_checkable
class SceneSource(Protocol):
    """What every scene source implements.

    ``dates`` arrays hold ``datetime64[D]`` values. Implementations must be deterministic:
    the same tile and dates give the same arrays, and neighbouring tiles agree on their edges.
    """

    name: str

    def s2_dates(self, tile: Tile, year: int) -> np.ndarray:
        """Sentinel-2 L2A acquisition dates over the tile in ``year``."""
        ...

    def s1_dates(self, tile: Tile, year: int, orbit: Orbit) -> np.ndarray:
        """Sentinel-1 acquisition dates over the tile in ``year`` for one orbit direction."""
        ...

    def read_s2(self, tile: Tile, dates: np.ndarray) -> S2Stack:
        """Sentinel-2 observations of the tile on the given dates."""
        ...

    def read_s1(self, tile: Tile, dates: np.ndarray, orbit: Orbit) -> S1Stack:
        """Sentinel-1 observations of the tile on the given dates for one orbit direction."""
        ...
