from __future__ import annotations

import numpy as np

from tessera_model import S1_BANDS, S2_BANDS, S2_MEAN, S2_STD, decode_s1, encode_s1


def test_band_orders() -> None:
    assert S2_BANDS == ("B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12")
    assert S1_BANDS == ("VV", "VH")
    assert len(S2_MEAN) == len(S2_STD) == 10
    assert S2_MEAN[S2_BANDS.index("B08")] == 3010.13


def test_encode_s1_values() -> None:
    x = np.array([1.0, 0.1, 0.01, 1e-4, 1e-9, 0.0, -1.0, np.nan, 1e3])
    got = encode_s1(x)
    assert got.dtype == np.int16
    # (20*log10(x) + 50) * 200: 0 dB -> 10000, -20 dB -> 6000, -40 dB -> 2000, -80 dB -> 0
    np.testing.assert_array_equal(got, [10000, 6000, 2000, 0, 0, 0, 0, 0, 22000])


def test_encode_s1_clips_high() -> None:
    assert encode_s1(np.array([1e10]))[0] == 32767


def test_decode_inverts_encode() -> None:
    x = np.geomspace(1e-2, 10, 50)  # above the -50 dB floor
    back = decode_s1(encode_s1(x))
    # one code step is 1/200 dB -> relative error < 0.06 %
    np.testing.assert_allclose(back, x, rtol=6e-4)
    assert np.isnan(decode_s1(np.array([0], np.int16)))[0]
