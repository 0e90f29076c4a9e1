"""d-pixel extraction: a tile's scenes and masks -> TESSERA's arrays in one Zarr group.

Layout (``{work}/dpixels/{tile}/{key}.zarr``), following the reference d-pixel contract
(``reference/tessera.md`` section 3):

=====================  ======  ================  ==========================================
array                  dtype   shape             meaning
=====================  ======  ================  ==========================================
``bands``              uint16  (T, H, W, 10)     S2 L2A DN, TESSERA band order, offset removed
``masks``              uint8   (T, H, W)         1 = clear
``doys``               uint16  (T,)              day of year 1..366
``sar_ascending``      int16   (Ta, H, W, 2)     [VV, VH], TESSERA dB encoding, 0 = no data
``sar_ascending_doy``  uint16  (Ta,)             day of year
``sar_descending``     int16   (Td, H, W, 2)     as above
``sar_descending_doy`` uint16  (Td,)             day of year
=====================  ======  ================  ==========================================

Chunks hold every timestep of a ``chunk_px`` square of pixels, so reading all observations
of a block of pixels is one read per chunk. Only scenes kept by the cloud mask are included.
The +1000 DN offset of processing baseline 04.00 is removed here, exactly once, using the
per-date offset that acquisition recorded.
"""

from __future__ import annotations

import time

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from tasks.acquire import ORBITS
from tasks.config import DPixelConfig, StorageConfig
from tasks.grid import SHARD_PX
from tasks.refs import DPixelRef, MaskRef, SceneRef
from tasks.sources.base import S2_BANDS
from tasks.stop import arm_worker, check_stop
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    join,
    normalise,
    zarr_store,
)
from tessera_model.constants import encode_s1

CODE = ("tasks.dpixels", "tessera_model.constants")


def remove_offset(dn: np.ndarray, offset: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Subtract each date's DN offset once, clipping at 0.

    Args:
        dn: uint16 (T, ..., C) digital numbers as delivered.
        offset: int (T,) offset carried by each date (1000 or 0).
        out: where to write the result (``dn`` itself: in place, no temporary).

    Returns:
        uint16 array of the same shape (``out`` when given).
    """
    off = np.asarray(offset).astype(np.uint16).reshape((-1,) + (1,) * (dn.ndim - 1))
    # stays uint16: max(dn, off) - off == clip(dn - off, 0)
    res = np.maximum(dn, off, out=out)
    return np.subtract(res, off, out=res)


def day_of_year(days_since_epoch: np.ndarray) -> np.ndarray:
    """Day of year 1..366 (uint16) of int days since 1970-01-01."""
    d = np.asarray(days_since_epoch, dtype="datetime64[D]")
    return (d - d.astype("datetime64[Y]")).astype(np.int64).astype(np.uint16) + 1


def _write_strips(arr: zarr.Array, block: np.ndarray, y: int, x: int, rows: int) -> None:
    """Write a (T, bh, bw, ...) block at (y, x) a few chunk rows at a time: Zarr copies each
    chunk out of a non-contiguous block before encoding it, so one call for the whole block
    would hold a second copy of it."""
    for r in range(0, block.shape[1], rows):
        arr[:, y + r : y + r + rows, x : x + block.shape[2]] = block[:, r : r + rows]


def _encode_s1_dates(linear: np.ndarray) -> np.ndarray:
    """:func:`~tessera_model.constants.encode_s1` of (T, ...) linear backscatter, a date at a
    time (it works in float64: a whole block at once would make several float64 copies)."""
    out = np.empty(linear.shape, np.int16)
    for i in range(linear.shape[0]):
        out[i] = encode_s1(linear[i])
    return out


def dpixel_uri(scene: SceneRef, mask: MaskRef, cfg: DPixelConfig, storage: StorageConfig) -> tuple[str, str]:
    key = content_key("dpixels", code_version(*CODE), scene.key, mask.key, cfg)
    return join(normalise(storage.work_uri), "dpixels", scene.tile.id, f"{key}.zarr"), key


def extract_dpixels(scene: SceneRef, mask: MaskRef, cfg: DPixelConfig, storage: StorageConfig) -> DPixelRef:
    """Write a tile's d-pixel group from its scenes and cloud masks.

    Works block by block (256-px squares, every timestep), so memory is bounded by a block.
    """
    uri, key = dpixel_uri(scene, mask, cfg, storage)
    return commit_stage(uri, storage, DPixelRef,
                        lambda: _write_dpixels(scene, mask, cfg, storage, uri, key))

def _write_dpixels(scene: SceneRef, mask: MaskRef, cfg: DPixelConfig, storage: StorageConfig,
                   uri: str, key: str) -> DPixelRef:
    arm_worker()
    t0 = time.perf_counter()
    sc = zarr.open_group(zarr_store(scene.uri, storage, read_only=True), mode="r")
    mk = zarr.open_group(zarr_store(mask.uri, storage, read_only=True), mode="r")
    keep = np.flatnonzero(mk["keep"][:])
    offset = sc["s2_offset"][:][keep]
    tile = scene.tile
    h, w, c = tile.height, tile.width, cfg.chunk_px
    comp = BloscCodec(cname="zstd", clevel=cfg.compression_level, shuffle="bitshuffle")
    out = zarr.open_group(zarr_store(uri, storage), mode="w")

    def arr(name: str, shape: tuple[int, ...], dtype: str) -> zarr.Array:
        chunks = (max(1, shape[0]), min(c, h), min(c, w)) + shape[3:]
        return out.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                                compressors=comp)

    t = len(keep)
    bands = arr("bands", (t, h, w, len(S2_BANDS)), "uint16")
    masks = arr("masks", (t, h, w), "uint8")
    out.create_array("doys", data=day_of_year(sc["s2_dates"][:][keep]))
    sar = {}
    for orbit in ORBITS:
        n = sc[f"s1_{orbit}"].shape[0]
        sar[orbit] = arr(f"sar_{orbit}", (n, h, w, 2), "int16")
        out.create_array(f"sar_{orbit}_doy", data=day_of_year(sc[f"s1_{orbit}_dates"][:]))

    block = max(SHARD_PX, c)
    strip = min(c, h)  # rows of whole output chunks written at once (bounds zarr's copies)
    valid_sum = 0
    for y in range(0, h, block):
        for x in range(0, w, block):
            check_stop(f"d-pixels of tile {tile.id}")
            win = (slice(y, y + block), slice(x, x + block))
            if t:  # every kept date of the block, offset removed in place
                dn = sc["s2_bands"].get_orthogonal_selection((keep, *win, slice(None)))
                _write_strips(bands, remove_offset(dn, offset, out=dn), y, x, strip)
                del dn
                m = mk["valid"].get_orthogonal_selection((keep, *win))
                _write_strips(masks, m, y, x, strip)
                valid_sum += int(np.count_nonzero(m))
            for orbit in ORBITS:
                if sar[orbit].shape[0]:
                    code = _encode_s1_dates(sc[f"s1_{orbit}"][(slice(None), *win)])
                    _write_strips(sar[orbit], code, y, x, strip)
    out.attrs.update({
        "tile_id": tile.id, "crs": tile.crs, "transform": list(tile.transform),
        "year": scene.year, "offset_removed": True, "s2_bands": list(S2_BANDS),
    })
    ref = DPixelRef(
        uri=uri, key=key, tile=tile, n_s2=t,
        n_s1_ascending=sar["ascending"].shape[0], n_s1_descending=sar["descending"].shape[0],
        mean_valid_s2=valid_sum / (h * w), seconds=round(time.perf_counter() - t0, 3),
    )
    return ref
