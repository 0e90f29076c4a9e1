"""Band statistics of every TESSERA version, by name (one table, with provenance).

Every set is in d-pixel units (S2 L2A DN with the baseline-04.00 offset removed, band order
:data:`~tessera_model.constants.S2_BANDS`; S1 in the int16 dB code, ``[VV, VH]``) and is applied
as ``(x - mean) / std`` in float32 (the reference's ``+ 1e-9`` on the std vanishes in float32).

- ``v1.0``: ``shared/reference/tessera.md`` section 3 (one S1 set for ascending and descending),
  defined in :mod:`tessera_model.constants`.
- ``v1.1-mpc`` / ``v1.1-aws``: ``shared/reference/tessera-v2.md`` section 6 (reference
  ``tessera_infer_QAT/src/datasets/v1_1_norm_stats.py``; the AWS set as refreshed 2026-05-03).
- ``v2``: ``tessera-v2.md`` section 2 (reference ``tessera_infer_v2/student/infer.py``; its
  docstrings call them "v1.1 stats", they are not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from tessera_model.constants import S1_MEAN, S1_STD, S2_MEAN, S2_STD


@dataclass(frozen=True)
class BandStats:
    """Means and stds of one model version: S2 (10,), S1 ascending and descending (2,)."""

    s2_mean: tuple[float, ...]
    s2_std: tuple[float, ...]
    s1_asc_mean: tuple[float, ...]
    s1_asc_std: tuple[float, ...]
    s1_desc_mean: tuple[float, ...]
    s1_desc_std: tuple[float, ...]

    def s2(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``(mean, std)`` float32 (10,)."""
        return np.asarray(self.s2_mean, np.float32), np.asarray(self.s2_std, np.float32)

    def s1(self, descending: npt.NDArray[np.bool_]) -> tuple[
        npt.NDArray[np.float32], npt.NDArray[np.float32]
    ]:
        """Per-step ``(mean, std)`` float32 (T1, 2) for steps flagged ascending/descending.

        Args:
            descending: (T1,) bool, True for a descending-orbit step.
        """
        d = np.asarray(descending, bool)[:, None]
        mean = np.where(d, np.float32(self.s1_desc_mean), np.float32(self.s1_asc_mean))
        std = np.where(d, np.float32(self.s1_desc_std), np.float32(self.s1_asc_std))
        return mean.astype(np.float32), std.astype(np.float32)


NORMALISATION: Final[dict[str, BandStats]] = {
    "v1.0": BandStats(S2_MEAN, S2_STD, S1_MEAN, S1_STD, S1_MEAN, S1_STD),
    "v1.1-mpc": BandStats(
        s2_mean=(2683.4553, 2223.3630, 2432.0950, 3633.1970, 3602.1755,
                 3006.4324, 3400.2710, 3515.6392, 2456.9163, 1983.8783),
        s2_std=(2739.5217, 2846.2993, 2690.8250, 2290.0439, 2088.8970,
                2673.1106, 2381.4521, 2229.5225, 1601.0942, 1495.3545),
        s1_asc_mean=(5588.3291, 3025.6270),
        s1_asc_std=(1713.4646, 1693.0471),
        s1_desc_mean=(5552.9683, 2955.0520),
        s1_desc_std=(1685.5857, 1677.6414),
    ),
    "v1.1-aws": BandStats(
        s2_mean=(2793.6589, 2356.7776, 2551.0496, 3741.9229, 3713.7844,
                 3120.1997, 3516.3342, 3637.0342, 2501.0283, 2038.1504),
        s2_std=(2810.0093, 2933.8835, 2755.6360, 2344.5027, 2145.7986,
                2743.9019, 2438.8601, 2286.5977, 1680.7367, 1585.5529),
        s1_asc_mean=(5697.0859, 2838.6687),
        s1_asc_std=(1671.3737, 1789.4116),
        s1_desc_mean=(5759.1367, 2873.2854),
        s1_desc_std=(1583.2858, 1747.8390),
    ),
    "v2": BandStats(
        s2_mean=(1633.0042, 1341.1090, 1539.5536, 3054.8269, 3117.4658,
                 2004.1648, 2694.7275, 2945.1504, 2266.6079, 1657.3094),
        s2_std=(1999.4603, 2014.7549, 1929.2201, 1754.2493, 1649.9807,
                1936.8988, 1748.6041, 1708.6991, 1207.5250, 1108.6046),
        s1_asc_mean=(5909.3921, 3405.0322),
        s1_asc_std=(1507.1750, 1531.2615),
        s1_desc_mean=(5816.1382, 3277.7576),
        s1_desc_std=(1554.6475, 1546.4733),
    ),
}  # fmt: skip


def band_stats(name: str) -> BandStats:
    """The statistics named ``name`` (a key of :data:`NORMALISATION`)."""
    if name not in NORMALISATION:
        raise ValueError(f"Expected a normalisation in {sorted(NORMALISATION)}. Got {name!r}.")
    return NORMALISATION[name]
