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


def test_edge_mixing_mixes_only_pixels_that_straddle_a_parcel_edge() -> None:
    pure = SyntheticSource(SyntheticWorldConfig(difficulty="hard", edge_mixing=0.0))
    mixed = SyntheticSource(SyntheticWorldConfig(difficulty="hard", edge_mixing=1.0))
    lp, lm = pure._land(TILE), mixed._land(TILE)
    assert lp.wmix is None and lm.wmix is not None
    w = lm.wmix
    assert 0.0 <= w.min() and w.max() <= 0.5
    share = (w > 0).mean()
    assert 0.03 < share < 0.4, share  # a thin band along the parcel borders
    # the same parcels; the mixing partner is always another parcel
    ids_p = lp.cell_x[lp.inv] * 10**7 + lp.cell_y[lp.inv]
    ids_m = lm.cell_x[lm.inv] * 10**7 + lm.cell_y[lm.inv]
    assert np.array_equal(ids_p, ids_m)
    edge = w > 0
    assert (lm.inv2[edge] != lm.inv[edge]).all()
    day = int(np.datetime64("2024-06-20", "D").astype(np.int64))
    gp, gm = pure._surface(lp, day)["green"], mixed._surface(lm, day)["green"]
    assert np.array_equal(gp[~edge], gm[~edge])  # interior pixels are untouched
    assert not np.allclose(gp[edge], gm[edge])
    assert mixed.ground_truth(TILE, 2024).land_cover.tolist() == \
        pure.ground_truth(TILE, 2024).land_cover.tolist()  # labels stay the parcel's class


def test_canopy_density_shows_in_radar_beside_height() -> None:
    """Stand density moves summer VH whatever the height: VH's residual after height tracks it."""
    def resid_corr(spread: float) -> float:
        src = SyntheticSource(SyntheticWorldConfig(difficulty="hard", s1_looks=0,
                                                   canopy_density_spread=spread))
        gt, land = src.ground_truth(TILE, 2024), src._land(TILE)
        rho = src._density(land, src._year_state(land, 2024).cls)[land.inv]
        dates = src.s1_dates(TILE, 2024, "ascending")
        summer = dates[(dates >= np.datetime64("2024-06-01")) & (dates < np.datetime64("2024-08-01"))]
        vh = 10 * np.log10(src.read_s1(TILE, summer[:3], "ascending").values[..., 1]).mean(0)
        m = gt.land_cover == DECIDUOUS
        _, inv = np.unique(gt.parcel_id[m], return_inverse=True)
        n = np.bincount(inv)
        k = n > 50

        def per_parcel(a: np.ndarray) -> np.ndarray:
            return (np.bincount(inv, a[m]) / n)[k]

        vh_p, h_p, rho_p = per_parcel(vh), per_parcel(gt.canopy_height), per_parcel(rho)
        resid = vh_p - np.polyval(np.polyfit(h_p, vh_p, 1), h_p)
        return float(np.corrcoef(resid, rho_p)[0, 1]) if rho_p.std() > 0 else 0.0

    assert resid_corr(0.0) == 0.0
    assert resid_corr(0.5) > 0.5
