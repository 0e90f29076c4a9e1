"""A tiny, hand-made scene source for stage tests (deterministic, no synthetic Earth)."""

from __future__ import annotations

import numpy as np

from tasks.grid import Tile
from tasks.sources.base import S1Stack, S2Stack


class FakeSource:
    """Three S2 dates (the last after the baseline-04.00 switch) and two S1 dates per orbit.

    S2 DN of band b on date t at pixel (i, j) = 100*b + t + 1 (+ offset), SCL 4 except a
    cloud square (SCL 9) on date 0 and an all-cloud date 1.
    """

    name = "fake"

    def s2_dates(self, tile: Tile, year: int) -> np.ndarray:
        return np.array(["2022-01-10", "2022-01-20", "2022-02-01"], dtype="datetime64[D]")

    def s1_dates(self, tile: Tile, year: int, orbit) -> np.ndarray:  # noqa: ANN001
        day = "05" if orbit == "ascending" else "06"
        return np.array([f"2022-01-{day}", f"2022-01-1{day[1]}"], dtype="datetime64[D]")

    def read_s2(self, tile: Tile, dates: np.ndarray) -> S2Stack:
        all_dates = list(self.s2_dates(tile, 2022))
        idx = [all_dates.index(d) for d in dates]
        h = w = tile.size_px
        offset = np.array([1000 if d >= np.datetime64("2022-01-25") else 0 for d in dates], np.int16)
        bands = np.zeros((len(dates), h, w, 10), np.uint16)
        scl = np.full((len(dates), h, w), 4, np.uint8)
        for k, t in enumerate(idx):
            bands[k] = (100 * np.arange(10) + t + 1 + offset[k]).astype(np.uint16)
            if t == 0:
                scl[k, 10:20, 10:20] = 9
            if t == 1:
                scl[k] = 9
        return S2Stack(dates=np.asarray(dates), bands=bands, scl=scl, offset=offset)

    def read_s1(self, tile: Tile, dates: np.ndarray, orbit) -> S1Stack:  # noqa: ANN001
        h = w = tile.size_px
        vals = np.full((len(dates), h, w, 2), 0.1, np.float32)
        vals[..., 1] = 0.01
        vals[:, 0, 0, :] = 0.0  # one pixel without data
        return S1Stack(dates=np.asarray(dates), values=vals)
