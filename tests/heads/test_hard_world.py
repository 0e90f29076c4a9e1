"""The harder synthetic world: a preset of knobs, timing-only classes, canopy height in S1."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.grid import Tile
from tasks.sources.synthetic import (
    DECIDUOUS,
    HARD_PRESET,
    LATE_MAIZE,
    SPRING_CEREAL,
    SyntheticSource,
    SyntheticWorldConfig,
)

TILE = Tile(zone=31, south=False, x0=312320, y0=5783040, size_px=256)  # deciduous, crops


def test_preset_fills_knobs_and_explicit_values_win() -> None:
    default = SyntheticWorldConfig()
    assert not default.timing_classes and default.height_signal == 0
    hard = SyntheticWorldConfig(difficulty="hard", fire_probability=0.05)
    for k, v in HARD_PRESET.items():
        assert getattr(hard, k) == (0.05 if k == "fire_probability" else v), k


def test_timing_classes_only_in_the_hard_world() -> None:
    lc_d = SyntheticSource(SyntheticWorldConfig()).ground_truth(TILE, 2024).land_cover
    lc_h = SyntheticSource(SyntheticWorldConfig(difficulty="hard")).ground_truth(TILE, 2024).land_cover
    assert not np.isin(lc_d, (SPRING_CEREAL, LATE_MAIZE)).any()
    assert (lc_h == SPRING_CEREAL).sum() > 500 and (lc_h == LATE_MAIZE).sum() > 500


@pytest.mark.parametrize(("world", "lo", "hi"), [("default", -0.5, 0.5), ("hard", 0.8, 1.0)])
def test_canopy_height_shows_in_radar_only_when_asked(world: str, lo: float, hi: float) -> None:
    src = SyntheticSource(SyntheticWorldConfig(difficulty=world, s1_looks=0))
    gt = src.ground_truth(TILE, 2024)
    dates = src.s1_dates(TILE, 2024, "ascending")
    summer = dates[(dates >= np.datetime64("2024-06-01")) & (dates < np.datetime64("2024-08-01"))]
    vh = 10 * np.log10(src.read_s1(TILE, summer[:3], "ascending").values[..., 1]).mean(0)
    m = gt.land_cover == DECIDUOUS
    # per parcel: within-parcel texture modulates both the height and S1, so compare means
    _, inv = np.unique(gt.parcel_id[m], return_inverse=True)
    n = np.bincount(inv)
    assert (n > 50).sum() >= 8
    vh_p = np.bincount(inv, vh[m]) / n
    h_p = np.bincount(inv, gt.canopy_height[m]) / n
    r = np.corrcoef(vh_p[n > 50], h_p[n > 50])[0, 1]
    assert lo < r < hi, r
