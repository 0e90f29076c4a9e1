"""Acquisition: scenes of one tile and year from the configured source into work storage.

Writes one Zarr group per tile (``{work}/scenes/{tile}/{key}.zarr``) holding the S2 DN as
delivered (with their per-date offset recorded, not yet removed), the SCL codes, and S1
linear backscatter per orbit direction. Dates are stored as days since 1970-01-01 (int32).
Arrays are chunked one date by one 256-px block, and filled a few dates at a time, so peak
memory is bounded by that block of dates, not by the year.
"""

from __future__ import annotations

import time

import numpy as np
import zarr

from tasks.config import SourceConfig, StorageConfig
from tasks.grid import SHARD_PX, Tile
from tasks.refs import SceneRef
from tasks.sources.base import S1_BANDS, S2_BANDS, Orbit, SceneSource
from tasks.stop import arm_worker, check_stop
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    join,
    normalise,
    zarr_store,
)

CODE = (
    "tasks.acquire", "tasks.grid", "tasks.sources.base", "tasks.sources.synthetic",
    "tasks.sources._noise", "tasks.sources.sentinelhub", "tasks.sources._sh_config",
    "tasks.sources._sh_requests", "tasks.sources.stac", "tasks.sources._stac_config",
    "tasks.sources._stac_http",
)
"""Modules whose source is part of this stage's cache key."""
ORBITS: tuple[Orbit, ...] = ("ascending", "descending")
DATES_PER_BLOCK = 8


def make_source(cfg: SourceConfig, storage: StorageConfig | None = None) -> SceneSource:
    """The scene source named by the config.

    For 'sentinelhub', credentials are resolved here (from the env variables or Prefect
    Secret block the config names) and responses are cached under ``{work}/sh-responses``
    when ``storage`` is given.
    """
    if cfg.kind == "synthetic":
        from tasks.sources.synthetic import SyntheticSource

        return SyntheticSource(cfg.synthetic)
    if cfg.kind == "sentinelhub":
        from tasks.sources.sentinelhub import make_sentinelhub_source, response_cache_uri

        cache = response_cache_uri(storage.work_uri) if storage else None
        return make_sentinelhub_source(cfg.sentinelhub, cache, storage)
    if cfg.kind == "stac":
        from tasks.sources.stac import make_stac_source
        from tasks.sources.stac import response_cache_uri as stac_cache_uri

        cache = stac_cache_uri(storage.work_uri) if storage else None
        return make_stac_source(cfg.stac, cache, storage)
    raise ValueError(f"Expected a known source kind. Got {cfg.kind!r}.")  # pragma: no cover


def scenes_uri(tile: Tile, year: int, source: SourceConfig, storage: StorageConfig) -> tuple[str, str]:
    """(URI, content key) of a tile's scenes."""
    key = content_key("scenes", code_version(*CODE), tile.id, year, source)
    return join(normalise(storage.work_uri), "scenes", tile.id, f"{key}.zarr"), key


def _days(dates: np.ndarray) -> np.ndarray:
    return np.asarray(dates, dtype="datetime64[D]").astype(np.int64).astype(np.int32)


def acquire(tile: Tile, year: int, source: SourceConfig, storage: StorageConfig,
            scene_source: SceneSource | None = None) -> SceneRef:
    """Fetch a tile's S2 and S1 scenes for a year into work storage.

    Returns the existing result when one with the same key is complete (skip), otherwise
    removes any partial leftover and writes afresh; the commit marker is written last.

    Args:
        tile: The tile.
        year: Calendar year.
        source: Source config (also part of the content key).
        storage: Storage roots.
        scene_source: An already-built source to use instead of the one ``source`` names
            (tests inject fakes here).
    """
    uri, key = scenes_uri(tile, year, source, storage)
    return commit_stage(uri, storage, SceneRef,
                        lambda: _write_scenes(tile, year, source, storage, uri, key, scene_source))

def _write_scenes(tile: Tile, year: int, source: SourceConfig, storage: StorageConfig, uri: str,
                  key: str, scene_source: SceneSource | None) -> SceneRef:
    arm_worker()
    t0 = time.perf_counter()
    src = scene_source or make_source(source, storage)
    if (prefetch := getattr(src, "prefetch", None)) is not None:
        prefetch(tile, year)  # download everything first: a failure leaves no partial scenes
    root = zarr.open_group(zarr_store(uri, storage), mode="w")
    h, w = tile.height, tile.width
    block = min(SHARD_PX, h)

    s2_dates = src.s2_dates(tile, year)
    t = len(s2_dates)
    bands = root.create_array("s2_bands", shape=(t, h, w, len(S2_BANDS)), dtype="uint16",
                              chunks=(1, block, block, len(S2_BANDS)), fill_value=0)
    scl = root.create_array("s2_scl", shape=(t, h, w), dtype="uint8", chunks=(1, block, block),
                            fill_value=0)
    offsets = np.zeros(t, dtype=np.int16)
    what = f"scenes of tile {tile.id}"
    for i in range(0, t, DATES_PER_BLOCK):
        check_stop(what)
        stack = src.read_s2(tile, s2_dates[i : i + DATES_PER_BLOCK])
        bands[i : i + len(stack.dates)] = stack.bands
        scl[i : i + len(stack.dates)] = stack.scl
        offsets[i : i + len(stack.dates)] = stack.offset
    root.create_array("s2_offset", data=offsets)
    root.create_array("s2_dates", data=_days(s2_dates))

    counts = {}
    for orbit in ORBITS:
        dates = src.s1_dates(tile, year, orbit)
        counts[orbit] = len(dates)
        arr = root.create_array(f"s1_{orbit}", shape=(len(dates), h, w, len(S1_BANDS)),
                                dtype="float32", chunks=(1, block, block, len(S1_BANDS)),
                                fill_value=0.0)
        for i in range(0, len(dates), DATES_PER_BLOCK):
            check_stop(what)
            stack = src.read_s1(tile, dates[i : i + DATES_PER_BLOCK], orbit)
            arr[i : i + len(stack.dates)] = stack.values
        root.create_array(f"s1_{orbit}_dates", data=_days(dates))
    root.attrs.update({"tile_id": tile.id, "year": year, "source": src.name, "crs": tile.crs,
                       "transform": list(tile.transform), "s2_bands": list(S2_BANDS)})
    ref = SceneRef(uri=uri, key=key, tile=tile, year=year, n_s2=t,
                   n_s1_ascending=counts["ascending"], n_s1_descending=counts["descending"],
                   seconds=round(time.perf_counter() - t0, 3))
    return ref
