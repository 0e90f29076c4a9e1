"""Tests of the reference d-pixel folder export/import (tasks/dpixel_folder.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from tasks.config import StorageConfig
from tasks.dpixel_folder import export_dpixel_folders, import_dpixel_folder, patch_windows
from tasks.errors import DataError
from tasks.grid import Tile
from tessera_model.constants import S2_BANDS

TILE = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
STORAGE = StorageConfig(output_uri="unused-out", work_uri="unused-work")
# Section 3 of the contract: name -> (dtype, shape given T, Ta, Td, H, W)
TABLE = {
    "bands": (np.uint16, lambda t, a, d, h, w: (t, h, w, 10)),
    "masks": (np.uint8, lambda t, a, d, h, w: (t, h, w)),
    "doys": (np.uint16, lambda t, a, d, h, w: (t,)),
    "sar_ascending": (np.int16, lambda t, a, d, h, w: (a, h, w, 2)),
    "sar_ascending_doy": (np.uint16, lambda t, a, d, h, w: (a,)),
    "sar_descending": (np.int16, lambda t, a, d, h, w: (d, h, w, 2)),
    "sar_descending_doy": (np.uint16, lambda t, a, d, h, w: (d,)),
}


def _fake_group(path: Path, t: int = 5, ta: int = 3, td: int = 0, seed: int = 0) -> str:
    """A d-pixel group in the layout tasks/dpixels.py writes, with random content."""
    rng = np.random.default_rng(seed)
    h = w = TILE.size_px
    g = zarr.open_group(str(path), mode="w")
    sizes = {"bands": t, "masks": t, "sar_ascending": ta, "sar_descending": td}
    for name, (dtype, shape_of) in TABLE.items():
        shape = shape_of(t, ta, td, h, w)
        info = np.iinfo(dtype)
        data = rng.integers(
            max(info.min, 0), min(info.max, 20000), size=shape, dtype=dtype, endpoint=True
        )
        if name in sizes:
            chunks = (max(1, sizes[name]), 64, 64, *shape[3:])
            g.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0)[...] = data
        else:
            g.create_array(name, data=data)
    g.attrs.update(
        {
            "tile_id": TILE.id,
            "crs": TILE.crs,
            "transform": list(TILE.transform),
            "year": 2024,
            "offset_removed": True,
            "s2_bands": list(S2_BANDS),
        }
    )
    return str(path)


def _assert_groups_equal(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    for name in TABLE:
        xa, xb = ga[name][...], gb[name][...]
        assert xa.dtype == xb.dtype and xa.shape == xb.shape, name
        np.testing.assert_array_equal(xa, xb, err_msg=name)


def test_patch_windows_cover_tile_once() -> None:
    wins = list(patch_windows(256, 256, 100))
    assert [w.name for w in wins[:4]] == [
        "0_0_100_100",
        "100_0_200_100",
        "200_0_256_100",
        "0_100_100_200",
    ]
    cover = np.zeros((256, 256), int)
    for w in wins:
        cover[w.rows, w.cols] += 1
    assert (cover == 1).all()


def test_export_import_round_trip_whole_tile(tmp_path: Path) -> None:
    src = _fake_group(tmp_path / "src.zarr")
    folders = export_dpixel_folders(src, tmp_path / "folders", STORAGE)
    assert [f.name for f in folders] == ["0_0_256_256"]
    back = import_dpixel_folder(folders[0], str(tmp_path / "back.zarr"), STORAGE)
    _assert_groups_equal(src, back)
    g = zarr.open_group(back, mode="r")
    assert g["bands"].chunks == (5, 64, 64, 10)
    assert g.attrs["tile_id"] == TILE.id and g.attrs["crs"] == "EPSG:32631"


def test_export_files_dtypes_shapes_and_roi(tmp_path: Path) -> None:
    src = _fake_group(tmp_path / "src.zarr", t=4, ta=2, td=3)
    folders = export_dpixel_folders(src, tmp_path / "folders", STORAGE, patch_px=100)
    assert len(folders) == 9
    g = zarr.open_group(src, mode="r")
    for folder in folders:
        x0, y0, x1, y1 = map(int, folder.name.split("_"))
        h, w = y1 - y0, x1 - x0
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{n}.npy" for n in TABLE] + ["roi.tiff"]
        )
        for name, (dtype, shape_of) in TABLE.items():
            arr = np.load(folder / f"{name}.npy")
            assert arr.dtype == dtype, name
            assert arr.shape == shape_of(4, 2, 3, h, w), name
            want = g[name][...] if arr.ndim == 1 else g[name][:, y0:y1, x0:x1]
            np.testing.assert_array_equal(arr, want, err_msg=name)
        with rasterio.open(folder / "roi.tiff") as r:
            assert r.crs.to_epsg() == 32631
            assert r.dtypes == ("uint8",) and (r.height, r.width) == (h, w)
            assert tuple(r.transform)[:6] == (
                10.0,
                0.0,
                TILE.x0 + 10.0 * x0,
                0.0,
                -10.0,
                TILE.y0 - 10.0 * y0,
            )


def test_import_of_a_patch_keeps_values_and_geolocation(tmp_path: Path) -> None:
    src = _fake_group(tmp_path / "src.zarr")
    folder = export_dpixel_folders(src, tmp_path / "folders", STORAGE, patch_px=100)[4]
    assert folder.name == "100_100_200_200"
    back = zarr.open_group(
        import_dpixel_folder(folder, str(tmp_path / "p.zarr"), STORAGE, chunk_px=32), mode="r"
    )
    g = zarr.open_group(src, mode="r")
    np.testing.assert_array_equal(back["bands"][...], g["bands"][:, 100:200, 100:200])
    np.testing.assert_array_equal(
        back["sar_ascending"][...], g["sar_ascending"][:, 100:200, 100:200]
    )
    assert back["sar_descending"].shape == (0, 100, 100, 2)
    assert back.attrs["tile_id"] == f"{TILE.id}/100_100_200_200"
    assert back.attrs["transform"] == [10.0, 0.0, TILE.x0 + 1000.0, 0.0, -10.0, TILE.y0 - 1000.0]
    assert back.attrs["year"] == 2024 and back.attrs["offset_removed"] is True


def test_import_year_argument_wins(tmp_path: Path) -> None:
    src = _fake_group(tmp_path / "src.zarr")
    folder = export_dpixel_folders(src, tmp_path / "f", STORAGE)[0]
    back = import_dpixel_folder(folder, str(tmp_path / "b.zarr"), STORAGE, year=2021)
    assert zarr.open_group(back, mode="r").attrs["year"] == 2021


def test_import_rejects_wrong_dtype_naming_file(tmp_path: Path) -> None:
    src = _fake_group(tmp_path / "src.zarr")
    folder = export_dpixel_folders(src, tmp_path / "f", STORAGE)[0]
    np.save(folder / "masks.npy", np.load(folder / "masks.npy").astype(np.int32))
    with pytest.raises(DataError, match="masks dtype uint8"):
        import_dpixel_folder(folder, str(tmp_path / "b.zarr"), STORAGE)


def test_import_rejects_mismatched_timesteps(tmp_path: Path) -> None:
    src = _fake_group(tmp_path / "src.zarr")
    folder = export_dpixel_folders(src, tmp_path / "f", STORAGE)[0]
    np.save(folder / "doys.npy", np.arange(1, 4, dtype=np.uint16))
    with pytest.raises(DataError, match="bands"):
        import_dpixel_folder(folder, str(tmp_path / "b.zarr"), STORAGE)
