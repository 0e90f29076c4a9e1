"""Calibration of the synthetic Earth against the real eo-learn patch (run by hand, not a test).

    python -m tests.sources.calibrate_synthetic

Prints, for the real patch (shared/data/real/eo-learn-testpatch, 101 x 100 px, 68 dates) and
for 100 x 100 px windows of the synthetic world at comparable latitude, the share of cloudy
pixels per date (mean, standard deviation, median, share of dates < 5 % and > 95 %) and the
median NDVI per class and month.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.grid import Tile
from tasks.sources.synthetic import CLASS_NAMES, SyntheticSource

REAL = Path("/work/shared/data/real/eo-learn-testpatch")


def _summary(share: np.ndarray) -> str:
    return (
        f"n={share.size} mean={share.mean():.3f} std={share.std():.3f} median={np.median(share):.3f} "
        f"<5%={np.mean(share < 0.05):.2f} >95%={np.mean(share > 0.95):.2f}"
    )


def main() -> None:
    if REAL.exists():
        clm = np.load(REAL / "CLM.npy")[..., 0]
        months = np.array([int(t[5:7]) for t in json.loads((REAL / "timestamps.json").read_text())])
        share = clm.mean(axis=(1, 2))
        print("real      ", _summary(share))
        winter = np.isin(months, (11, 12, 1, 2))
        summer = np.isin(months, (5, 6, 7, 8))
        print(
            f"real       winter(NDJF) mean={share[winter].mean():.3f} summer(MJJA) mean={share[summer].mean():.3f}"
        )
    src = SyntheticSource()
    shares, months = [], []
    ndvi: dict[tuple[int, int], list[float]] = {}
    for k in range(8):  # tiles 150+ km apart in zone 33 at ~46 deg N, 2 years each
        tile = Tile(
            zone=33,
            south=False,
            x0=300_000 + 2560 * 60 * (k % 4),
            y0=5_100_000 - 2560 * 60 * (k // 4),
            size_px=256,
        )
        gt = src.ground_truth(tile, 2019)
        for year in (2019, 2020):
            dates = src.s2_dates(tile, year)
            s2 = src.read_s2(tile, dates)
            cloud = np.isin(s2.scl, (8, 9))
            shares.append(cloud[:, :100, :100].mean(axis=(1, 2)))
            months.append(dates.astype("datetime64[M]").astype(int) % 12 + 1)
            if year == 2019:
                refl = s2.bands.astype(np.float32) - s2.offset[:, None, None, None]
                nd = (refl[..., 3] - refl[..., 0]) / (refl[..., 3] + refl[..., 0] + 1e-6)
                clear = np.isin(s2.scl, (4, 5, 6))
                for t in range(dates.size):
                    for c in range(len(CLASS_NAMES)):
                        m = clear[t] & (gt.land_cover == c)
                        if m.sum() > 200:
                            ndvi.setdefault((c, int(months[-1][t])), []).append(
                                float(np.median(nd[t][m]))
                            )
    share = np.concatenate(shares)
    month = np.concatenate(months)
    print("synthetic ", _summary(share))
    winter = np.isin(month, (11, 12, 1, 2))
    summer = np.isin(month, (5, 6, 7, 8))
    print(
        f"synthetic  winter(NDJF) mean={share[winter].mean():.3f} summer(MJJA) mean={share[summer].mean():.3f}"
    )
    print("median NDVI of clear pixels per class and month (synthetic, 2019):")
    for c, name in enumerate(CLASS_NAMES):
        row = [np.median(ndvi[(c, mo)]) if (c, mo) in ndvi else np.nan for mo in range(1, 13)]
        print(f"  {name:17s}", " ".join(f"{v:5.2f}" for v in row))


if __name__ == "__main__":
    main()
