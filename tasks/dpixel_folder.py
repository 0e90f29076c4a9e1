"""Export to and import from the reference TESSERA d-pixel folder layout.

Contract: ``shared/reference/tessera.md`` section 3. One folder per patch, named
``{x_min}_{y_min}_{x_max}_{y_max}`` in pixel offsets within the tile (column, row; the max
values are exclusive, so a full 500 px patch at the origin is ``0_0_500_500``; edge patches are
smaller), holding

=============================================== ======= ================ =====================
file                                            dtype   shape            meaning
=============================================== ======= ================ =====================
``bands.npy``                                   uint16  (T, H, W, 10)    S2 L2A DN, offset gone
``masks.npy``                                   uint8   (T, H, W)        1 = clear
``doys.npy``                                    uint16  (T,)             day of year
``sar_ascending.npy`` / ``sar_descending.npy``  int16   (Ta, H, W, 2)    [VV, VH] int16 dB code
``sar_*_doy.npy``                               uint16  (Ta,)            day of year
``roi.tiff``                                    uint8   (H, W)           the patch: CRS, transform
=============================================== ======= ================ =====================

Our d-pixel Zarr group (written by :mod:`tasks.dpixels`) holds the same arrays under the same
names (``bands`` chunked (T, c, c, 10)), plus group attributes ``tile_id``, ``crs``,
``transform`` (6 floats, [10, 0, x0, 0, -10, y0]), ``year``, ``offset_removed`` and
``s2_bands``. ``roi.tiff`` also carries two GDAL metadata tags of ours,
``TESSERA_TILE_ID`` and ``TESSERA_YEAR`` (reference readers ignore them), so that an export
followed by an import gives back the same group.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import zarr
from rasterio.transform import Affine
from zarr.codecs import BloscCodec

from tasks.config import StorageConfig
from tasks.errors import DataError
from tasks.grid import PIXEL_M, SHARD_PX, Tile
from tasks.storage import mark_done, zarr_store
from tessera_model.constants import S1_BANDS, S2_BANDS

__all__ = [
    "FOLDER_FILES",
    "PatchWindow",
    "export_dpixel_folders",
    "import_dpixel_folder",
    "patch_windows",
]

ORBITS = ("ascending", "descending")
#: Per file: dtype and the trailing (per-pixel) dimensions after (T, H, W); None = (T,) only.
FOLDER_FILES: dict[str, tuple[np.dtype[Any], tuple[int, ...] | None]] = {
    "bands": (np.dtype(np.uint16), (len(S2_BANDS),)),
    "masks": (np.dtype(np.uint8), ()),
    "doys": (np.dtype(np.uint16), None),
    "sar_ascending": (np.dtype(np.int16), (len(S1_BANDS),)),
    "sar_ascending_doy": (np.dtype(np.uint16), None),
    "sar_descending": (np.dtype(np.int16), (len(S1_BANDS),)),
    "sar_descending_doy": (np.dtype(np.uint16), None),
}
TAG_TILE_ID = "TESSERA_TILE_ID"
TAG_YEAR = "TESSERA_YEAR"


class PatchWindow:
    """A patch of a tile in pixel offsets: rows ``y_min:y_max``, columns ``x_min:x_max``."""

    __slots__ = ("x_max", "x_min", "y_max", "y_min")

    def __init__(self, x_min: int, y_min: int, x_max: int, y_max: int) -> None:
        self.x_min, self.y_min, self.x_max, self.y_max = x_min, y_min, x_max, y_max

    @property
    def name(self) -> str:
        """Folder name ``{x_min}_{y_min}_{x_max}_{y_max}``."""
        return f"{self.x_min}_{self.y_min}_{self.x_max}_{self.y_max}"

    @property
    def rows(self) -> slice:
        return slice(self.y_min, self.y_max)

    @property
    def cols(self) -> slice:
        return slice(self.x_min, self.x_max)


def patch_windows(height: int, width: int, patch_px: int) -> Iterator[PatchWindow]:
    """Patches of ``patch_px`` covering an (H, W) tile, row-major; edge patches are smaller."""
    if patch_px < 1:
        raise DataError(f"Expected patch_px >= 1. Got {patch_px}.")
    for y in range(0, height, patch_px):
        for x in range(0, width, patch_px):
            yield PatchWindow(x, y, min(x + patch_px, width), min(y + patch_px, height))


def _check(
    name: str, arr: np.ndarray | zarr.Array, h: int | None, w: int | None, where: str
) -> int:
    """Validate dtype and shape of one d-pixel array against the table; returns its T."""
    dtype, tail = FOLDER_FILES[name]
    if np.dtype(arr.dtype) != dtype:
        raise DataError(f"{where}: Expected {name} dtype {dtype}. Got {arr.dtype}.")
    shape = tuple(arr.shape)
    if tail is None:
        if len(shape) != 1:
            raise DataError(f"{where}: Expected {name} shape (T,). Got {shape}.")
        return shape[0]
    want = (shape[0] if shape else -1, h, w, *tail)
    if len(shape) != len(want) or shape[1:] != want[1:]:
        raise DataError(
            f"{where}: Expected {name} shape (T, {h}, {w}{''.join(f', {d}' for d in tail)}). Got {shape}."
        )
    return shape[0]


def _check_lengths(t: dict[str, int], where: str) -> None:
    pairs = [("bands", "doys"), ("masks", "doys")] + [(f"sar_{o}", f"sar_{o}_doy") for o in ORBITS]
    for a, b in pairs:
        if t[a] != t[b]:
            raise DataError(f"{where}: Expected {a} to have len({b})={t[b]} timesteps. Got {t[a]}.")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _write_roi(
    path: Path, crs: str, transform: Affine, h: int, w: int, tags: dict[str, str]
) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=h,
        width=w,
        count=1,
        dtype="uint8",
        crs=crs,
        transform=transform,
    ) as dst:
        dst.write(np.ones((1, h, w), dtype=np.uint8))
        dst.update_tags(**tags)


def export_dpixel_folders(
    group_uri: str, dest_dir: str | Path, storage: StorageConfig, patch_px: int = 500
) -> list[Path]:
    """Write a tile's d-pixel group as reference folders, one per patch, streaming patch by patch.

    Each folder is written under a temporary name and renamed into place, so a folder that
    exists is complete; an existing folder of the same name is replaced.

    Args:
        group_uri: Our d-pixel Zarr group (arrays and attributes as in the module docstring).
        dest_dir: Local directory to hold the patch folders (created if missing).
        storage: Storage config for reading ``group_uri``.
        patch_px: Patch side, pixels (the reference default is 500).

    Returns:
        The folders written, row-major by patch.

    Raises:
        DataError: the group lacks an array or attribute, or one has the wrong dtype/shape.
    """
    g = zarr.open_group(zarr_store(group_uri, storage, read_only=True), mode="r")
    attrs = dict(g.attrs)
    for key in ("crs", "transform"):
        if key not in attrs:
            raise DataError(f"{group_uri}: Expected group attribute {key!r}. Got none.")
    arrays: dict[str, zarr.Array] = {}
    for name in FOLDER_FILES:
        if name not in g:
            raise DataError(f"{group_uri}: Expected array {name!r}. Got none.")
        arr = g[name]
        if not isinstance(arr, zarr.Array):
            raise DataError(f"{group_uri}: Expected {name!r} to be an array. Got a group.")
        arrays[name] = arr
    h, w = arrays["masks"].shape[1:3]
    lengths = {n: _check(n, a, h, w, group_uri) for n, a in arrays.items()}
    _check_lengths(lengths, group_uri)
    base = Affine(*attrs["transform"])
    tags = {TAG_TILE_ID: str(attrs.get("tile_id", ""))}
    if attrs.get("year") is not None:
        tags[TAG_YEAR] = str(attrs["year"])
    timeseries = {n: a[:] for n, a in arrays.items() if FOLDER_FILES[n][1] is None}

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for win in patch_windows(h, w, patch_px):
        final = dest / win.name
        tmp = dest / f".{win.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        for name, arr in arrays.items():
            if FOLDER_FILES[name][1] is None:
                data = timeseries[name]
            else:
                data = arr[:, win.rows, win.cols]  # (T, h, w, ...): one patch, every timestep
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(data, dtype=FOLDER_FILES[name][0]))
        ph, pw = win.y_max - win.y_min, win.x_max - win.x_min
        _write_roi(
            tmp / "roi.tiff",
            attrs["crs"],
            base @ Affine.translation(win.x_min, win.y_min),
            ph,
            pw,
            tags,
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        out.append(final)
    return out


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _tile_id(crs: rasterio.crs.CRS, transform: Affine, h: int, w: int, tag: str, name: str) -> str:
    """The grid tile id when the patch is exactly one tile of our grid, else a patch id.

    A patch id is ``{source tile id}/{folder name}`` when roi.tiff names its source tile,
    else the folder name.
    """
    epsg = crs.to_epsg() if crs is not None else None
    a, b, c, d, e, f = transform[:6]
    if (
        epsg is not None
        and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760)
        and (a, b, d, e) == (PIXEL_M, 0.0, 0.0, -PIXEL_M)
        and h == w
        and h % SHARD_PX == 0
        and float(c).is_integer()
        and float(f).is_integer()
        and c % (h * PIXEL_M) == 0
        and f % (h * PIXEL_M) == 0
    ):
        return Tile(zone=epsg % 100, south=epsg > 32700, x0=int(c), y0=int(f), size_px=h).id
    return f"{tag}/{name}" if tag else name


def import_dpixel_folder(
    folder: str | Path,
    group_uri: str,
    storage: StorageConfig,
    chunk_px: int = 64,
    year: int | None = None,
) -> str:
    """Read one reference d-pixel folder and write it as our d-pixel Zarr group.

    Arrays keep their values and dtypes; ``bands``/``masks``/``sar_*`` are chunked
    (T, chunk_px, chunk_px, ...). CRS and transform come from ``roi.tiff``; ``offset_removed``
    is true (reference d-pixels are stored with the S2 offset removed). ``tile_id`` is the
    grid tile id when the patch is one tile of our grid, else ``{source tile}/{folder name}``
    (or the folder name alone). The group's attributes, then its commit marker, are written
    last; an existing group at ``group_uri`` is replaced.

    Args:
        folder: A reference patch folder (the table in the module docstring).
        group_uri: Where to write our group.
        storage: Storage config for ``group_uri``.
        chunk_px: Spatial chunk side of the per-pixel arrays.
        year: The year of the d-pixels; default: roi.tiff's ``TESSERA_YEAR`` tag, else None.

    Returns:
        ``group_uri``.

    Raises:
        DataError: a file is missing or has the wrong dtype/shape; roi.tiff lacks a CRS.
    """
    src = Path(folder)
    where = str(src)
    roi = src / "roi.tiff"
    if not roi.exists():
        raise DataError(f"{where}: Expected roi.tiff. Got none.")
    with rasterio.open(roi) as r:
        crs, transform, h, w, tags = r.crs, r.transform, r.height, r.width, r.tags()
    if crs is None:
        raise DataError(f"{where}: Expected roi.tiff with a CRS. Got none.")
    arrays: dict[str, np.ndarray] = {}
    for name in FOLDER_FILES:
        path = src / f"{name}.npy"
        if not path.exists():
            raise DataError(f"{where}: Expected {name}.npy. Got none.")
        arrays[name] = np.load(path, mmap_mode="r")
    lengths = {n: _check(n, a, h, w, where) for n, a in arrays.items()}
    _check_lengths(lengths, where)
    if year is None and tags.get(TAG_YEAR):
        year = int(tags[TAG_YEAR])

    comp = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    out = zarr.open_group(zarr_store(group_uri, storage), mode="w")
    for name, data in arrays.items():
        dtype, tail = FOLDER_FILES[name]
        if tail is None:
            out.create_array(name, data=np.asarray(data))
            continue
        chunks = (max(1, data.shape[0]), min(chunk_px, h), min(chunk_px, w), *tail)
        arr = out.create_array(
            name, shape=data.shape, dtype=dtype, chunks=chunks, fill_value=0, compressors=comp
        )
        for y in range(0, h, chunk_px):  # stream by rows of chunks, not the whole patch
            arr[:, y : y + chunk_px] = data[:, y : y + chunk_px]
    tile_id = _tile_id(crs, transform, h, w, tags.get(TAG_TILE_ID, ""), src.name)
    attrs = {
        "tile_id": tile_id,
        "crs": crs.to_string(),
        "transform": [float(v) for v in tuple(transform)[:6]],
        "year": year,
        "offset_removed": True,
        "s2_bands": list(S2_BANDS),
    }
    out.attrs.update(attrs)
    mark_done(group_uri, storage, {"source": "dpixel_folder", "folder": src.name, **attrs})
    return group_uri
