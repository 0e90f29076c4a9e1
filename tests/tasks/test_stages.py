"""Acquisition, cloud masking and d-pixel extraction on a fake source."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tasks.acquire import acquire
from tasks.config import DPixelConfig, MaskConfig, SourceConfig, StorageConfig
from tasks.dpixels import day_of_year, extract_dpixels, remove_offset
from tasks.grid import Tile
from tasks.mask import cloud_mask, valid_mask
from tasks.sources.base import SceneSource

from .fakes import FakeSource

TILE = Tile(zone=31, south=False, x0=296960, y0=5788160, size_px=256)


@pytest.fixture
def storage(tmp_path):
    return StorageConfig(output_uri=str(tmp_path / "out"), work_uri=str(tmp_path / "work"))


def test_fake_is_a_scene_source():
    assert isinstance(FakeSource(), SceneSource)


def test_valid_mask_rule_and_dilation():
    scl = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], np.uint8)
    v = valid_mask(scl, (0, 1, 2, 3, 8, 9))
    assert v.tolist() == [[False] * 4 + [True] * 4 + [False, False, True, True]]
    img = np.full((9, 9), 4, np.uint8)
    img[4, 4] = 9
    assert (~valid_mask(img, (9,), 0)).sum() == 1
    assert (~valid_mask(img, (9,), 1)).sum() == 5  # a radius-1 disk
    assert (~valid_mask(img, (9,), 2)).sum() == 13


def test_remove_offset_once_and_clip():
    dn = np.array([[1500, 900], [1500, 900]], np.uint16)[:, None, :]
    out = remove_offset(dn, np.array([1000, 0]))
    assert out[0].tolist() == [[500, 0]]
    assert out[1].tolist() == [[1500, 900]]


def test_day_of_year():
    d = np.array(["2024-01-01", "2024-12-31", "2023-12-31"], "datetime64[D]").astype(np.int64)
    assert day_of_year(d).tolist() == [1, 366, 365]


def test_stage_chain(storage):
    src = FakeSource()
    scenes = acquire(TILE, 2022, SourceConfig(), storage, scene_source=src)
    assert (scenes.n_s2, scenes.n_s1_ascending, scenes.n_s1_descending) == (3, 2, 2)
    m = cloud_mask(scenes, MaskConfig(dilation_px=1), storage)
    assert (m.n_kept, m.n_dropped) == (2, 1)  # the all-cloud date is dropped
    dp = extract_dpixels(scenes, m, DPixelConfig(chunk_px=64), storage)
    g = zarr.open_group(dp.uri, mode="r")
    assert g["bands"].dtype == np.uint16 and g["bands"].shape == (2, 256, 256, 10)
    assert g["bands"].chunks == (2, 64, 64, 10)
    assert g["doys"][:].tolist() == [10, 32]
    # offset removed exactly once: date 2 carried +1000 and must read back as 100*b + 3
    assert g["bands"][1, 5, 5].tolist() == [100 * b + 3 for b in range(10)]
    assert g["bands"][0, 5, 5].tolist() == [100 * b + 1 for b in range(10)]
    masks = g["masks"][:]
    assert masks.dtype == np.uint8
    assert masks[0, 15, 15] == 0 and masks[0, 9, 15] == 0 and masks[0, 8, 15] == 1  # buffer
    assert masks[1].all()
    sar = g["sar_ascending"][:]
    assert sar.dtype == np.int16 and sar.shape == (2, 256, 256, 2)
    assert sar[0, 0, 0].tolist() == [0, 0]  # no data stays 0
    assert sar[0, 1, 1, 0] == round((20 * np.log10(0.1) + 50) * 200)
    assert g["sar_ascending_doy"][:].tolist() == [5, 15]
    assert g.attrs["offset_removed"] is True and g.attrs["crs"] == "EPSG:32631"


def test_rerun_is_skipped_and_partial_is_replaced(storage):
    src = FakeSource()
    a = acquire(TILE, 2022, SourceConfig(), storage, scene_source=src)
    b = acquire(TILE, 2022, SourceConfig(), storage, scene_source=None)  # served from storage
    assert a == b
    # a leftover without the commit marker is not trusted: it is rebuilt
    import shutil
    from pathlib import Path

    from tasks.storage import done_uri

    Path(done_uri(a.uri)).unlink()
    zarr.open_group(a.uri, mode="r+")["s2_bands"][0] = 0
    c = acquire(TILE, 2022, SourceConfig(), storage, scene_source=src)
    assert c.model_copy(update={"seconds": 0.0}) == a.model_copy(update={"seconds": 0.0})
    assert zarr.open_group(a.uri, mode="r")["s2_bands"][0, 0, 0, 0] == 1
    shutil.rmtree(a.uri)
