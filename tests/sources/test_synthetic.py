"""Tests of the synthetic Earth scene source: determinism, seams, plan, physics, ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.grid import Tile
from tasks.sources.base import S2_BANDS, SceneSource
from tasks.sources.synthetic import (
    BUILT_UP,
    CLASS_NAMES,
    DECIDUOUS,
    EVERGREEN,
    MAIZE,
    WATER,
    WINTER_CEREAL,
    SyntheticSource,
    SyntheticWorldConfig,
)

B02, B04, B08, B12 = (S2_BANDS.index(b) for b in ("B02", "B04", "B08", "B12"))
CLEAR = (4, 5, 6)

# A compact world: every class inside one 256 px tile, no clouds, frequent fires.
SMALL = SyntheticWorldConfig(
    seed=0,
    parcel_size_m=120,
    landscape_scale_m=1500,
    water_share=0.2,
    built_share=0.15,
    cloud_cover_scale=0.0,
    fire_probability=0.3,
    snow_probability=0.0,
)
TILE = Tile(zone=33, south=False, x0=500480, y0=5100160, size_px=256)


@pytest.fixture(scope="module")
def small() -> SyntheticSource:
    return SyntheticSource(SMALL)


@pytest.fixture(scope="module")
def small_year(small: SyntheticSource):
    """Every third S2 date of 2021 over TILE in the compact, cloud-free world, plus ground truth."""
    dates = small.s2_dates(TILE, 2021)[::3]
    return small.read_s2(TILE, dates), small.ground_truth(TILE, 2021)


def _ndvi(bands: np.ndarray, offset: np.ndarray) -> np.ndarray:
    refl = bands.astype(np.float32) - offset[:, None, None, None]
    return (refl[..., B08] - refl[..., B04]) / (refl[..., B08] + refl[..., B04] + 1e-6)


def test_implements_scene_source_protocol():
    src = SyntheticSource()
    assert isinstance(src, SceneSource)
    assert src.name == "synthetic"


def test_config_is_frozen_and_validated():
    cfg = SyntheticWorldConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        SyntheticWorldConfig(parcel_size_m=1.0)
    with pytest.raises(ValidationError):
        SyntheticWorldConfig(fire_probability=1.5)
    with pytest.raises(ValidationError):
        SyntheticWorldConfig(unknown_field=1)


def test_bad_orbit_raises():
    with pytest.raises(ValueError, match="ascending"):
        SyntheticSource().s1_dates(TILE, 2023, "sideways")  # type: ignore[arg-type]


def test_shapes_and_dtypes(small: SyntheticSource):
    dates = small.s2_dates(TILE, 2023)[:2]
    s2 = small.read_s2(TILE, dates)
    assert s2.dates.dtype == np.dtype("datetime64[D]")
    assert s2.bands.shape == (2, 256, 256, 10) and s2.bands.dtype == np.uint16
    assert s2.scl.shape == (2, 256, 256) and s2.scl.dtype == np.uint8
    assert s2.offset.dtype == np.int16
    s1 = small.read_s1(TILE, small.s1_dates(TILE, 2023, "descending")[:2], "descending")
    assert s1.values.shape == (2, 256, 256, 2) and s1.values.dtype == np.float32
    gt = small.ground_truth(TILE, 2023)
    assert gt.land_cover.dtype == np.uint8 and gt.land_cover.shape == (256, 256)
    assert gt.parcel_id.dtype == np.int64
    assert gt.canopy_height.dtype == np.float32
    assert gt.burn_doy.dtype == np.uint16


def test_deterministic_and_seed_dependent():
    dates = SyntheticSource().s2_dates(TILE, 2022)[30:33]
    a = SyntheticSource(SyntheticWorldConfig(seed=7)).read_s2(TILE, dates)
    b = SyntheticSource(SyntheticWorldConfig(seed=7)).read_s2(TILE, dates)
    c = SyntheticSource(SyntheticWorldConfig(seed=8)).read_s2(TILE, dates)
    assert np.array_equal(a.bands, b.bands) and np.array_equal(a.scl, b.scl)
    assert not np.array_equal(a.bands, c.bands)


def test_date_subset_equals_full_read():
    src = SyntheticSource()
    dates = src.s2_dates(TILE, 2023)[:6]
    full = src.read_s2(TILE, dates)
    one = src.read_s2(TILE, dates[[4]])
    assert np.array_equal(one.bands[0], full.bands[4]) and np.array_equal(one.scl[0], full.scl[4])
    s1_dates = src.s1_dates(TILE, 2023, "ascending")[:4]
    s1_full = src.read_s1(TILE, s1_dates, "ascending")
    assert np.array_equal(
        src.read_s1(TILE, s1_dates[[2]], "ascending").values[0], s1_full.values[2]
    )


def test_big_tile_equals_its_four_quarters():
    src = SyntheticSource()
    big = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=512)
    # dates with clouds, shadows and clear sky; S1 on both orbits
    dates = src.s2_dates(big, 2023)[[0, 3, 35, 38, 56]]
    asc = src.s1_dates(big, 2023, "ascending")[[5, 20]]
    des = src.s1_dates(big, 2023, "descending")[[7]]
    s2 = src.read_s2(big, dates)
    assert len(np.unique(s2.scl)) >= 5  # the seam test covers clouds, shadows, land
    s1a, s1d = src.read_s1(big, asc, "ascending"), src.read_s1(big, des, "descending")
    gt = src.ground_truth(big, 2023)
    for i in range(2):
        for j in range(2):
            q = Tile(zone=31, south=False, x0=big.x0 + 2560 * j, y0=big.y0 - 2560 * i, size_px=256)
            rows, cols = slice(256 * i, 256 * (i + 1)), slice(256 * j, 256 * (j + 1))
            qs2 = src.read_s2(q, dates)
            assert qs2.bands.tobytes() == s2.bands[:, rows, cols].tobytes()
            assert qs2.scl.tobytes() == s2.scl[:, rows, cols].tobytes()
            assert (
                src.read_s1(q, asc, "ascending").values.tobytes()
                == s1a.values[:, rows, cols].tobytes()
            )
            assert (
                src.read_s1(q, des, "descending").values.tobytes()
                == s1d.values[:, rows, cols].tobytes()
            )
            qgt = src.ground_truth(q, 2023)
            for field in ("land_cover", "parcel_id", "canopy_height", "burn_doy"):
                assert getattr(qgt, field).tobytes() == getattr(gt, field)[rows, cols].tobytes()


def test_s2_revisit_five_days():
    dates = SyntheticSource().s2_dates(TILE, 2023)
    assert dates.dtype == np.dtype("datetime64[D]")
    assert np.all(np.diff(dates.astype(np.int64)) == 5)
    assert 72 <= dates.size <= 73
    assert (dates[0] - np.datetime64("2023-01-01")).astype(int) < 5


@pytest.mark.parametrize(("year", "step"), [(2023, 12), (2020, 6)])
def test_s1_revisit_per_orbit(year: int, step: int):
    src = SyntheticSource()
    asc = src.s1_dates(TILE, year, "ascending")
    des = src.s1_dates(TILE, year, "descending")
    for d in (asc, des):
        assert np.all(np.diff(d.astype(np.int64)) == step)
        assert (d[0] - np.datetime64(f"{year}-01-01")).astype(int) < step
    assert asc[0] != des[0]  # each orbit has its own phase


def test_offset_from_baseline_0400():
    src = SyntheticSource(SMALL)
    dates = np.arange(np.datetime64("2022-01-15"), np.datetime64("2022-02-05"), 5)
    s2 = src.read_s2(TILE, dates)
    after = dates >= np.datetime64("2022-01-25")
    assert np.array_equal(s2.offset, np.where(after, 1000, 0))
    valid = (s2.scl != 0) & (s2.scl != 1)
    for t in range(dates.size):
        lo = s2.bands[t][valid[t]].min()
        assert (lo >= 1000) if after[t] else (lo < 1000)
    # the offset is on top of the same surface: a date on either side differs by ~1000 DN
    water = src.ground_truth(TILE, 2022).land_cover == WATER
    b08 = [np.median(s2.bands[t, ..., B08][water & (s2.scl[t] == 6)]) for t in (0, dates.size - 1)]
    assert 800 < b08[1] - b08[0] < 1200


def test_cloud_scl_matches_brightness():
    src = SyntheticSource()
    dates = src.s2_dates(TILE, 2023)[::4]
    s2 = src.read_s2(TILE, dates)
    b02 = s2.bands[..., B02].astype(np.float32) - s2.offset[:, None, None]
    cloud = np.isin(s2.scl, (8, 9))
    clear = np.isin(s2.scl, CLEAR)
    shadow = s2.scl == 3
    assert cloud.mean() > 0.1 and clear.mean() > 0.1 and shadow.any()
    assert np.median(b02[s2.scl == 9]) > 4000
    assert np.mean(b02[cloud]) > np.mean(b02[clear]) + 1500
    assert np.mean(b02[shadow]) < np.mean(b02[clear])


def test_seasonal_cloud_cover():
    src = SyntheticSource()
    winter, summer = [], []
    for tile in (TILE, Tile(zone=33, south=False, x0=800000, y0=5400000, size_px=256)):
        for year in (2019, 2020):
            dates = src.s2_dates(tile, year)
            month = dates.astype("datetime64[M]").astype(int) % 12 + 1
            pick = np.isin(month, (12, 1, 2, 6, 7, 8))
            scl = src.read_s2(tile, dates[pick]).scl
            share = np.isin(scl, (8, 9)).mean(axis=(1, 2))
            is_winter = np.isin(month[pick], (12, 1, 2))
            winter.append(share[is_winter])
            summer.append(share[~is_winter])
    w, s = np.concatenate(winter), np.concatenate(summer)
    assert w.mean() > s.mean() + 0.05
    # per-date cover is bimodal with a wide spread, as in the real patch (std 0.44)
    assert 0.3 < np.concatenate([w, s]).std() < 0.55


def test_dn_ranges_per_class(small_year):
    s2, gt = small_year
    refl = s2.bands.astype(np.float32) - s2.offset[:, None, None, None]
    clear = np.isin(s2.scl, CLEAR)
    summer = (s2.dates >= np.datetime64("2021-06-15")) & (s2.dates <= np.datetime64("2021-08-15"))
    for c in range(len(CLASS_NAMES)):
        m = clear & (gt.land_cover == c)[None]
        assert m.sum() > 1000, CLASS_NAMES[c]
        v = refl[m]
        assert v.min() >= 0 and v.max() < 10000, CLASS_NAMES[c]

    def med(c: int, band: int) -> float:
        m = (clear & (gt.land_cover == c)[None])[summer]
        return float(np.median(refl[summer][m][:, band]))

    assert med(WATER, B08) < 400
    assert 200 < med(WATER, B02) < 900
    assert med(DECIDUOUS, B08) > 2800 and med(DECIDUOUS, B04) < 700
    assert 1000 < med(BUILT_UP, B04) < 2500
    assert med(EVERGREEN, B08) < med(DECIDUOUS, B08)


def test_ndvi_phenology(small_year):
    s2, gt = small_year
    ndvi = _ndvi(s2.bands, s2.offset)
    doy = (s2.dates - s2.dates.astype("datetime64[Y]")).astype(int) + 1

    def series(c: int) -> np.ndarray:
        m = gt.land_cover == c
        return np.array([np.median(ndvi[t][m]) for t in range(doy.size)])

    cereal, maize = series(WINTER_CEREAL), series(MAIZE)
    assert doy[np.argmax(cereal)] < 170 < doy[np.argmax(maize)]
    assert cereal.max() > 0.7 and maize.max() > 0.7
    assert maize[doy < 120].max() < 0.4  # maize fields are bare in spring
    dec, eve = series(DECIDUOUS), series(EVERGREEN)
    assert np.ptp(eve) < 0.2 < np.ptp(dec)


def test_within_parcel_variation(small_year):
    s2, gt = small_year
    ndvi = _ndvi(s2.bands, s2.offset)
    t = int(np.argmin(np.abs(s2.dates - np.datetime64("2021-07-10")).astype(int)))
    pid = gt.parcel_id[gt.land_cover == MAIZE]
    biggest = np.bincount(np.unique(pid, return_inverse=True)[1]).argmax()
    m = gt.parcel_id == np.unique(pid)[biggest]
    assert 0.005 < ndvi[t][m].std() < 0.1


def test_s1_backscatter_by_class(small: SyntheticSource):
    dates = small.s1_dates(TILE, 2021, "ascending")[14:18]
    vals = small.read_s1(TILE, dates, "ascending").values
    gt = small.ground_truth(TILE, 2021)
    db = 10 * np.log10(vals)

    def med(c: int, pol: int) -> float:
        return float(np.median(db[:, gt.land_cover == c, pol]))

    assert med(WATER, 0) < med(DECIDUOUS, 0) - 8
    assert med(WATER, 1) < med(EVERGREEN, 1) - 8
    assert med(BUILT_UP, 0) > med(MAIZE, 0)
    for c in range(len(CLASS_NAMES)):
        assert -25 <= med(c, 0) <= 0, CLASS_NAMES[c]
        assert -32 <= med(c, 1) <= -8, CLASS_NAMES[c]


def test_speckle_is_unit_mean_gamma():
    dates = SyntheticSource().s1_dates(TILE, 2023, "descending")[:2]
    noisy = (
        SyntheticSource(SyntheticWorldConfig(s1_looks=4)).read_s1(TILE, dates, "descending").values
    )
    clean = (
        SyntheticSource(SyntheticWorldConfig(s1_looks=0)).read_s1(TILE, dates, "descending").values
    )
    ratio = noisy / clean
    assert abs(ratio.mean() - 1.0) < 0.01
    assert abs(ratio.std() - 0.5) < 0.02  # 1 / sqrt(ENL)
    assert abs(np.corrcoef(ratio[0, ..., 0].ravel(), ratio[1, ..., 0].ravel())[0, 1]) < 0.02


def test_burned_parcels_lose_nir(small: SyntheticSource):
    gt = small.ground_truth(TILE, 2021)
    unburned_before = small.ground_truth(TILE, 2020).burn_doy == 0
    burned = (
        (gt.burn_doy >= 160) & (gt.burn_doy <= 250) & np.isin(gt.land_cover, (DECIDUOUS, EVERGREEN))
    )
    burned &= unburned_before
    assert burned.sum() > 500
    assert np.all(
        gt.burn_doy[~np.isin(gt.land_cover, (2, 3, 4, 5, 6, 7))] == 0
    )  # water/built never burn
    days = np.array(
        [np.datetime64("2021-01-01") + int(d) - 1 for d in np.unique(gt.burn_doy[burned])]
    )
    before = small.read_s2(TILE, days - 10)
    after = small.read_s2(TILE, days + 10)
    doy = gt.burn_doy
    for k, d in enumerate(np.unique(doy[burned])):
        m = burned & (doy == d)
        nir0 = np.median(before.bands[k, ..., B08][m].astype(float) - before.offset[k])
        nir1 = np.median(after.bands[k, ..., B08][m].astype(float) - after.offset[k])
        assert nir1 < 0.6 * nir0
    s1b = small.read_s1(TILE, days[:1] - 10, "ascending").values[0, ..., 1]
    s1a = small.read_s1(TILE, days[:1] + 10, "ascending").values[0, ..., 1]
    m = burned & (doy == np.unique(doy[burned])[0])
    assert np.median(s1a[m]) < 0.6 * np.median(s1b[m])


def test_canopy_height(small_year):
    _, gt = small_year
    h = gt.canopy_height
    forest = np.isin(gt.land_cover, (DECIDUOUS, EVERGREEN))
    assert 6 <= h[forest].min() and h[forest].max() <= 45 and h[forest].std() > 3
    assert np.all(h[gt.land_cover == WATER] == 0)
    assert 1.5 < np.median(h[gt.land_cover == MAIZE]) < 3.5


def test_default_world_has_six_classes_in_5km():
    gt = SyntheticSource().ground_truth(
        Tile(zone=32, south=False, x0=600320, y0=5300480, size_px=512), 2023
    )
    counts = np.bincount(gt.land_cover.ravel(), minlength=len(CLASS_NAMES))
    assert (counts > 0.005 * counts.sum()).sum() >= 6
    # parcels are ~250 m: many of them, each spanning many pixels
    n_parcels = np.unique(gt.parcel_id).size
    assert 200 < n_parcels < 1500


def test_parcel_ids_unique_across_zones():
    src = SyntheticSource()
    a = src.ground_truth(
        Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256), 2023
    ).parcel_id
    b = src.ground_truth(
        Tile(zone=32, south=False, x0=302080, y0=5785600, size_px=256), 2023
    ).parcel_id
    assert not np.intersect1d(a, b).size
