"""Cloud masking: TESSERA's SCL rule, an optional dilation buffer, per-scene valid fractions.

A pixel of a Sentinel-2 scene is valid unless its SCL code is in the invalid set
(default {0, 1, 2, 3, 8, 9}: no data, saturated, dark area, cloud shadow, cloud medium and
high probability; thin cirrus, snow and water stay valid). The invalid area can be grown by
a disk of ``dilation_px`` pixels. Scenes whose valid fraction is at or below the threshold
(by default: no valid pixel at all) are dropped.
"""

from __future__ import annotations

import time

import numpy as np
import zarr
from scipy import ndimage

from tasks.config import MaskConfig, StorageConfig
from tasks.refs import MaskRef, SceneRef
from tasks.stop import arm_worker, check_stop
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    join,
    normalise,
    zarr_store,
)

CODE = ("tasks.mask",)
CLOUD_SCL = (8, 9, 10)
"""SCL codes counted as cloud in the reports (medium, high probability, thin cirrus)."""


def disk(radius: int) -> np.ndarray:
    """A boolean disk structuring element of the given radius in pixels."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def valid_mask(scl: np.ndarray, invalid_scl: tuple[int, ...], dilation_px: int = 0) -> np.ndarray:
    """Valid-pixel mask from SCL codes.

    Args:
        scl: SCL codes, uint8 (..., H, W).
        invalid_scl: Codes that make a pixel invalid.
        dilation_px: Grow the invalid area by a disk of this radius (per scene).

    Returns:
        bool (..., H, W), True where valid.
    """
    invalid = np.isin(scl, np.asarray(invalid_scl, dtype=scl.dtype))
    if dilation_px > 0:
        st = disk(dilation_px)
        st = st.reshape((1,) * (invalid.ndim - 2) + st.shape)
        invalid = ndimage.binary_dilation(invalid, structure=st)
    return ~invalid


def mask_uri(scene: SceneRef, cfg: MaskConfig, storage: StorageConfig) -> tuple[str, str]:
    key = content_key("mask", code_version(*CODE), scene.key, cfg)
    return join(normalise(storage.work_uri), "masks", scene.tile.id, f"{key}.zarr"), key


def cloud_mask(scene: SceneRef, cfg: MaskConfig, storage: StorageConfig) -> MaskRef:
    """Compute a tile's valid masks and choose the scenes to keep.

    Writes ``valid`` uint8 (T, H, W) for every scene, ``keep`` bool (T,) and
    ``valid_fraction`` float32 (T,). One scene at a time is held in memory.
    """
    uri, key = mask_uri(scene, cfg, storage)
    return commit_stage(uri, storage, MaskRef, lambda: _write_masks(scene, cfg, storage, uri, key))

def _write_masks(scene: SceneRef, cfg: MaskConfig, storage: StorageConfig, uri: str,
                 key: str) -> MaskRef:
    arm_worker()
    t0 = time.perf_counter()
    src = zarr.open_group(zarr_store(scene.uri, storage, read_only=True), mode="r")
    scl = src["s2_scl"]
    t, h, w = scl.shape
    out = zarr.open_group(zarr_store(uri, storage), mode="w")
    valid_arr = out.create_array("valid", shape=(t, h, w), dtype="uint8",
                                 chunks=(1,) + scl.chunks[1:], fill_value=0)
    frac = np.zeros(t, dtype=np.float32)
    cloudy = 0
    for i in range(t):
        check_stop(f"cloud masks of tile {scene.tile.id}")
        codes = scl[i]
        valid = valid_mask(codes, cfg.invalid_scl, cfg.dilation_px)
        valid_arr[i] = valid.view(np.uint8)
        frac[i] = valid.mean()
        cloudy += int(np.isin(codes, CLOUD_SCL).sum())
    keep = frac > cfg.min_scene_valid_fraction
    out.create_array("keep", data=keep)
    out.create_array("valid_fraction", data=frac)
    ref = MaskRef(
        uri=uri, key=key, tile=scene.tile, n_kept=int(keep.sum()), n_dropped=int((~keep).sum()),
        mean_valid_fraction=float(frac.mean()) if t else 0.0,
        cloud_fraction=cloudy / max(1, t * h * w), seconds=round(time.perf_counter() - t0, 3),
    )
    return ref
