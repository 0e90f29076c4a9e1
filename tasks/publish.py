"""Publish: quantise float embeddings to int8 and commit them into ``tessera:`` v1 zone stores.

Layout (contract: ``shared/reference/tessera.md`` section 5, convention ``tessera:`` v1 from
github ucam-eo/zarr-convention-tessera): one Zarr v3 store per year ``{output}/{year}.zarr``;
one group per populated UTM zone, ``utm{zone:02d}``, holding

- ``embeddings`` int8 (H, W, 128), fill 0, dims [northing, easting, band];
- ``scales`` float32 (H, W), fill NaN (NaN = no data, and "not yet committed");
- ``easting`` (W,) / ``northing`` (H,) float64 pixel centres (northing descending) and
  ``band`` (B,) int32, uncompressed and unsharded;
- ``spatial_ref``: a 0-d CF grid-mapping variable, so xarray/rioxarray find the CRS and
  transform on every array (``grid_mapping: "spatial_ref"``), beside the convention's
  ``proj:``/``spatial:`` group attributes.

Data arrays are sharded 256 x 256 pixels (the tile grid of :mod:`tasks.grid`), with 64 x 64
inner chunks and Blosc zstd. A zone grid is snapped to whole shards and every tile is a whole
number of shards, so a tile's write never touches a shard another tile owns (no
read-modify-write, tiles publish in parallel).

Southern hemisphere: the convention names groups for the north only. A southern zone gets the
group ``utm{zone:02d}s`` and carries ``proj:code`` EPSG:327zz, so the two halves of a zone
never share a grid (their northings differ by the 10,000 km false northing).

Growing a zone grid (:func:`prepare_zone_stores`). A zone grid is the union of its tiles
snapped to whole shards. New tiles east or south of it are a resize: the arrays' shapes grow,
no byte of data moves, and the coordinate arrays and ``spatial:`` attributes are rewritten.
New tiles west or north move the origin: Zarr indexes from the origin, so every existing
shard must take a new key. Shards are moved as whole objects (a server-side copy on S3, no
decode) by a journaled, resumable protocol (:func:`_move_origin`): stage a copy of every shard,
retract all scales (the zone reads as absent, never as misplaced data), resize and re-key,
then copy the scales back LAST. A crash anywhere is resumed by the next prepare. We chose this
over a fixed zone-wide origin (which never moves) because that would make every zone group
~930,000 x 80,000 px with MB-sized coordinate arrays and million-chunk dask graphs for every
reader; origin moves are rare (a build grows a zone once) and cost two object copies per
shard. The price: during a move the zone reads as empty (all scales NaN) for the time of the
copies back, never as misplaced data.

Commit protocol per tile (:func:`publish_tile`): retract (record removed, scales -> NaN),
write ALL int8 embedding blocks, then the scales of the whole tile (the commit: a reader
treats a NaN scale as absent), then the per-tile record
``{year}.zarr/.tessera/tiles/{tile_id}.json`` (content hash), then ``tessera:n_tiles``. A
publish killed before its scales leaves the tile absent; killed during the scales write, only
complete, correct pixels of the new content are visible; a re-run finishes it (no record, so
no skip). Publishing the same content again is a no-op. Quantisation is
:mod:`tessera_model.quantise` (section 4); this module does no arithmetic on the values.

Determinism: the published bytes are a function of the input embeddings, the model version
and the publish config only. No wall-clock time, host name, random id or machine path is
written under the output root: records hold content hashes and grid offsets, Zarr metadata
holds constants and the grid. When a tile was published (and into which output root) is
provenance, written beside the work root's commit markers instead:
``{work_uri}/provenance/{year}/tiles/{tile_id}.json`` (:data:`PROVENANCE_DIR`). Leases (which do
carry times and random ids) are deleted when released, so none remain after a publish.

Concurrency: writers take a lease in ``{year}.zarr/.tessera/locks/{group}/`` (write a lease
object, then list; :class:`ZoneLease`). Publishers hold shared leases (different tiles own
different shards, so they write in parallel); creating, growing or re-keying a zone takes an
exclusive one. Leases older than ``PublishConfig.lease_ttl_s`` are ignored (a crashed
writer); live writers renew theirs between blocks. ``tessera:n_tiles`` is recounted from the tile records until a recount after the
write agrees, so concurrent publishers converge on the true count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import xarray as xr
import zarr
from pydantic import BaseModel, ConfigDict
from pyproj import CRS
from zarr.codecs import BloscCodec

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import DataError, StorageError
from tasks.grid import PIXEL_M, SHARD_PX, Tile
from tasks.liveness import known_dead, this_process
from tasks.refs import EmbeddingRef, PublishRef
from tasks.storage import content_key, get_fs, join, write_bytes_atomic, zarr_store

__all__ = [
    "DATASET_VERSION",
    "MATRYOSHKA_DIMS",
    "N_BANDS",
    "PROVENANCE_DIR",
    "ZoneExtent",
    "ZoneLease",
    "check_publish_model",
    "dequantise_zone",
    "grid_mapping_attrs",
    "model_attrs",
    "model_family_of",
    "open_zone",
    "prepare_zone_stores",
    "provenance_uri",
    "publish_tile",
    "quantisation_rule",
    "read_tile_record",
    "refresh_n_tiles",
    "year_store_uri",
    "zone_group_name",
]

DATASET_VERSION = "v1"
"""``tessera:dataset_version`` written and accepted."""
N_BANDS = 128
MATRYOSHKA_DIMS = (16, 32, 64, 128)
"""Prefix sizes K a v2 embedding may be published at (tessera-v2.md section 1)."""
"""Embedding dimensions of the v1.0 model."""
INNER_CHUNK_PX = 64
"""Inner chunk side within a 256 x 256 shard (readers fetching small windows)."""
BLOCK_SHARDS = 4
"""Shards per write block along easting: a block is 256 rows x up to 1,024 columns
(128 MiB of float32 input), which bounds publish memory whatever the tile size."""
RECORDS_DIR = ".tessera/tiles"
"""Per-tile commit records, relative to the year store."""
LOCKS_DIR = ".tessera/locks"
"""Writer leases, one folder per zone group, relative to the year store."""
PROVENANCE_DIR = "provenance"
"""Publication times per tile, relative to the WORK root (never published)."""
GROW_DIR = ".tessera/grow"
"""Journals and staged shards of origin moves, relative to the year store."""
DATA_ARRAYS = ("embeddings", "rgb", "scales")
"""Sharded arrays of a zone group; ``scales`` is last on purpose (it commits pixels)."""
PUBLISH_FORMAT = 2
"""Bump when the bytes written for the same input change; part of the skip key.
2: tile records without ``published_at``/``source_key`` (now in the work root's provenance)."""

#: The ``zarr_conventions`` registry of a year store and its zone groups (convention v1).
ZARR_CONVENTIONS: list[dict[str, str]] = [
    {
        "schema_url": "https://raw.githubusercontent.com/ucam-eo/zarr-convention-tessera/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/ucam-eo/zarr-convention-tessera/blob/v1/README.md",
        "uuid": "e7f90d5f-019e-4a38-802f-9fa695e26c71",
        "name": "tessera:",
        "description": "Quantised geospatial embedding vectors with per-pixel dequantisation scales",
    },
    {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/geo-proj/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/geo-proj/blob/v1/README.md",
        "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
        "name": "proj:",
        "description": "Coordinate reference system information for geospatial data",
    },
    {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
        "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
        "name": "spatial:",
        "description": "Spatial coordinate information",
    },
]


# --------------------------------------------------------------------------------------------
# Zone grid
# --------------------------------------------------------------------------------------------


def zone_group_name(tile: Tile) -> str:
    """Group name of a tile's zone: ``utm31`` (north) or ``utm31s`` (south, EPSG:327zz)."""
    return _group_name(tile.zone, tile.south)


def _group_name(zone: int, south: bool) -> str:
    return f"utm{zone:02d}{'s' if south else ''}"


def year_store_uri(output_uri: str, year: int) -> str:
    """URI of the year store ``{output_uri}/{year}.zarr``."""
    return join(output_uri, f"{year}.zarr")


class ZoneExtent(BaseModel):
    """The pixel grid of one zone group: whole 256-px shards in the zone's UTM CRS.

    ``x0``/``y0`` are the easting of the left edge and the northing of the top edge, metres.
    """

    model_config = ConfigDict(frozen=True)

    zone: int
    south: bool
    x0: int
    y0: int
    width: int
    height: int

    @classmethod
    def from_tiles(cls, tiles: Sequence[Tile]) -> ZoneExtent:
        """Union of the tiles' extents snapped outward to the 256-px shard grid.

        Raises:
            DataError: if the tiles are not all of one zone and hemisphere.
        """
        zones = sorted({(t.zone, t.south) for t in tiles})
        if len(zones) != 1:
            raise DataError(f"Expected tiles of one zone and hemisphere. Got {zones}.")
        step = SHARD_PX * PIXEL_M
        left = math.floor(min(t.x0 for t in tiles) / step) * step
        right = math.ceil(max(t.x1 for t in tiles) / step) * step
        top = math.ceil(max(t.y0 for t in tiles) / step) * step
        bottom = math.floor(min(t.y1 for t in tiles) / step) * step
        return cls(
            zone=zones[0][0],
            south=zones[0][1],
            x0=int(left),
            y0=int(top),
            width=round((right - left) / PIXEL_M),
            height=round((top - bottom) / PIXEL_M),
        )

    def union(self, tiles: Sequence[Tile]) -> ZoneExtent:
        """The smallest shard-aligned grid covering this one and the tiles (same zone)."""
        if not tiles:
            return self
        other = ZoneExtent.from_tiles(tiles)
        if (other.zone, other.south) != (self.zone, self.south):
            raise DataError(f"Expected tiles of zone {self.group}. Got zone {other.group}.")
        left, top = min(self.x0, other.x0), max(self.y0, other.y0)
        right = max(self.bbox[2], other.bbox[2])
        bottom = min(self.bbox[1], other.bbox[1])
        return ZoneExtent(
            zone=self.zone,
            south=self.south,
            x0=left,
            y0=top,
            width=round((right - left) / PIXEL_M),
            height=round((top - bottom) / PIXEL_M),
        )

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> ZoneExtent:
        """Read the extent back from a zone group's ``proj:``/``spatial:`` attributes."""
        a, _, c, _, _, f = attrs["spatial:transform"]
        h, w = attrs["spatial:shape"]
        epsg = int(str(attrs["proj:code"]).split(":")[1])
        return cls(
            zone=epsg % 100, south=epsg // 100 == 327, x0=int(c), y0=int(f), width=w, height=h
        )

    @property
    def group(self) -> str:
        return _group_name(self.zone, self.south)

    @property
    def epsg(self) -> int:
        return (32700 if self.south else 32600) + self.zone

    @property
    def transform(self) -> list[float]:
        """``spatial:transform`` [10, 0, x0, 0, -10, y0]."""
        return [PIXEL_M, 0.0, float(self.x0), 0.0, -PIXEL_M, float(self.y0)]

    @property
    def bbox(self) -> list[float]:
        """``spatial:bbox`` [min easting, min northing, max easting, max northing]."""
        return [
            float(self.x0),
            float(self.y0 - self.height * PIXEL_M),
            float(self.x0 + self.width * PIXEL_M),
            float(self.y0),
        ]

    def covers(self, tile: Tile) -> bool:
        """Whether a tile lies wholly inside this grid (same zone and hemisphere)."""
        x_min, y_min, x_max, y_max = self.bbox
        return (
            (tile.zone, tile.south) == (self.zone, self.south)
            and tile.x0 >= x_min
            and tile.x1 <= x_max
            and tile.y0 <= y_max
            and tile.y1 >= y_min
        )

    def offset(self, tile: Tile) -> tuple[int, int]:
        """(row, column) of a tile's top-left pixel in this grid."""
        return round((self.y0 - tile.y0) / PIXEL_M), round((tile.x0 - self.x0) / PIXEL_M)


# --------------------------------------------------------------------------------------------
# Store creation
# --------------------------------------------------------------------------------------------


def model_family_of(model_version: str) -> str:
    """The TESSERA family a build's ``model_version`` belongs to.

    Given checkpoints are named ``{preset}-{sha256[:8]}`` (``v2-medium-3823be7d``), trained
    ones ``{spec.version}-{key[:8]}`` (v1.0-family architectures).
    """
    preset = model_version.rsplit("-", 1)[0]
    if preset.startswith("v2-"):
        return "v2"
    if preset.startswith("v1.1"):
        return "v1.1"
    return "v1.0"


def quantisation_rule(model_version: str) -> str:
    """The int8 rule of the model's version (:mod:`tessera_model.quantise`)."""
    return "v2" if model_family_of(model_version) == "v2" else "v1"


def model_attrs(model_version: str, n_bands: int) -> dict[str, Any]:
    """What a zone group records about the model: family, version, size, checkpoint hash, K."""
    preset, digest = (model_version.rsplit("-", 1) + [""])[:2]
    family = model_family_of(model_version)
    return {
        "tessera:model_version": model_version,
        "tessera:model_family": family,
        "tessera:model_preset": preset,
        "tessera:model_size": preset.split("-", 1)[1] if family == "v2" else "",
        "tessera:checkpoint_sha256_prefix": digest,
        "tessera:n_bands": n_bands,
        "tessera:matryoshka_dims": n_bands if family == "v2" else None,
        "tessera:quantisation": quantisation_rule(model_version),
    }


def check_publish_model(model_version: str, n_bands: int) -> None:
    """Refuse a Matryoshka prefix for a model that has none (before any work).

    Raises:
        DataError: ``n_bands`` < 128 for a v1.0/v1.1 model, or not one of 16/32/64/128.
    """
    if n_bands not in MATRYOSHKA_DIMS:
        raise DataError(f"Expected publish.dims in {list(MATRYOSHKA_DIMS)}. Got {n_bands}.")
    family = model_family_of(model_version)
    if n_bands != N_BANDS and family != "v2":
        raise DataError(
            f"Expected publish.dims {N_BANDS} for a {family} model ({model_version}): only v2 "
            f"students have Matryoshka prefixes. Got publish.dims={n_bands}."
        )


def _root_attrs(year: int) -> dict[str, Any]:
    return {
        "zarr_conventions": ZARR_CONVENTIONS,
        "tessera:dataset_version": DATASET_VERSION,
        "tessera:year": year,
    }


def _zone_attrs(
    ext: ZoneExtent, year: int, n_bands: int, model_version: str, build_version: str
) -> dict[str, Any]:
    return {
        **_root_attrs(year),
        "tessera:utm_zone": ext.zone,
        **model_attrs(model_version, n_bands),
        "tessera:n_tiles": 0,
        "tessera:build_version": build_version,
        "tessera:has_rgb_preview": False,
        "proj:code": f"EPSG:{ext.epsg}",
        "spatial:dimensions": ["northing", "easting"],
        "spatial:transform": ext.transform,
        "spatial:shape": [ext.height, ext.width],
        "spatial:bbox": ext.bbox,
        "spatial:registration": "pixel",
    }


def grid_mapping_attrs(crs: CRS, transform: Sequence[float] | None = None) -> dict[str, Any]:
    """CF grid-mapping attributes of a ``spatial_ref`` variable for a CRS.

    What rioxarray's ``write_crs`` writes and reads back (``crs_wkt``, ``spatial_ref`` and the
    CF parameters), so ``.rio.crs`` works on any array whose ``grid_mapping`` names it,
    without this module importing rioxarray.

    Args:
        crs: The coordinate reference system.
        transform: Optional ``spatial:transform`` [a, b, c, d, e, f]; written as GDAL's
            ``GeoTransform`` (c a b f d e) so readers need not infer it from coordinates.

    Returns:
        The attributes, in a fixed order (deterministic metadata bytes).
    """
    attrs: dict[str, Any] = dict(crs.to_cf())
    wkt = crs.to_wkt()
    attrs["crs_wkt"] = wkt
    attrs["spatial_ref"] = wkt
    if transform is not None:
        a, b, c, d, e, f = transform
        attrs["GeoTransform"] = f"{c!r} {a!r} {b!r} {f!r} {d!r} {e!r}"  # GDAL order
    return attrs


def _grid_mapping_attrs(ext: ZoneExtent) -> dict[str, Any]:
    """CF grid mapping of a zone's ``spatial_ref`` (CRS and transform)."""
    return grid_mapping_attrs(CRS.from_epsg(ext.epsg), ext.transform)


def _open_root(store_uri: str, storage: StorageConfig, mode: str = "r+") -> zarr.Group | None:
    try:
        return zarr.open_group(zarr_store(store_uri, storage), mode=mode)  # type: ignore[arg-type]
    except FileNotFoundError:
        return None


def _check_root(root: zarr.Group, store_uri: str, year: int) -> None:
    version = root.attrs.get("tessera:dataset_version")
    if version != DATASET_VERSION:
        raise DataError(
            f"{store_uri}: Expected tessera:dataset_version {DATASET_VERSION!r}. Got {version!r}."
        )
    got_year = root.attrs.get("tessera:year")
    if got_year != year:
        raise DataError(f"{store_uri}: Expected tessera:year {year}. Got {got_year!r}.")


def _check_zone(group: zarr.Group, where: str, model_version: str, n_bands: int) -> ZoneExtent:
    got = group.attrs.get("tessera:model_version")
    if got != model_version:
        raise DataError(
            f"{where}: Expected tessera:model_version {model_version!r} (this build). "
            f"Got {got!r} in the existing zone group. Versions are never mixed in one store: "
            "publish to another storage.output_uri, or remove the old store first."
        )
    got_bands = group.attrs.get("tessera:n_bands")
    if got_bands != n_bands:
        raise DataError(
            f"{where}: Expected tessera:n_bands {n_bands} (publish.dims of this build). Got "
            f"{got_bands!r} in the existing zone group. A store holds one K: publish to "
            "another storage.output_uri."
        )
    return ZoneExtent.from_attrs(dict(group.attrs))


def _create_zone(
    root: zarr.Group,
    ext: ZoneExtent,
    year: int,
    n_bands: int,
    model_version: str,
    cfg: PublishConfig,
) -> zarr.Group:
    group = root.create_group(
        ext.group, attributes=_zone_attrs(ext, year, n_bands, model_version, cfg.build_version)
    )
    h, w = ext.height, ext.width
    gm = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}

    def blosc() -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=cfg.compression_level, shuffle="shuffle")

    group.create_array(
        "embeddings",
        shape=(h, w, n_bands),
        dtype="int8",
        chunks=(INNER_CHUNK_PX, INNER_CHUNK_PX, n_bands),
        shards=(SHARD_PX, SHARD_PX, n_bands),
        compressors=blosc(),
        fill_value=0,
        dimension_names=["northing", "easting", "band"],
        attributes={**gm, "long_name": "int8 quantised embedding (dequantise as q * scale)"},
    )
    group.create_array(
        "scales",
        shape=(h, w),
        dtype="float32",
        chunks=(INNER_CHUNK_PX, INNER_CHUNK_PX),
        shards=(SHARD_PX, SHARD_PX),
        compressors=blosc(),
        fill_value=float("nan"),
        dimension_names=["northing", "easting"],
        attributes={**gm, "long_name": "per-pixel dequantisation scale (NaN = no data)"},
    )
    coords: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        (
            "easting",
            ext.x0 + PIXEL_M * (np.arange(w, dtype=np.float64) + 0.5),
            {"standard_name": "projection_x_coordinate", "axis": "X", "units": "m"},
        ),
        (
            "northing",
            ext.y0 - PIXEL_M * (np.arange(h, dtype=np.float64) + 0.5),
            {"standard_name": "projection_y_coordinate", "axis": "Y", "units": "m"},
        ),
        ("band", np.arange(n_bands, dtype=np.int32), {"long_name": "embedding dimension"}),
    ]
    for name, values, attrs in coords:
        _put_coord(group, name, values, attrs)
    group.create_array(
        "spatial_ref",
        shape=(),
        dtype="int32",
        compressors=None,
        fill_value=0,
        dimension_names=[],
        attributes=_grid_mapping_attrs(ext),
    )
    return group


# --------------------------------------------------------------------------------------------
# Leases (writer coordination on any fsspec store, no conditional writes needed)
# --------------------------------------------------------------------------------------------


def _LEASE_BODY() -> bytes:  # noqa: N802 - reads as a constant
    """A lease's content: the writer's identity (host, pid, process start), no secret."""
    return json.dumps(this_process(), sort_keys=True).encode()


class ZoneLease:
    """A writer lease on one zone group of a year store: shared (publish) or exclusive (grow).

    Protocol (correct on any store with read-after-write listing, as S3 and local disks are):
    write ``{s|x}-{time_ns}-{uuid}`` into ``.tessera/locks/{group}/``, then list the folder.
    A shared lease holds when no live exclusive one is listed; an exclusive one when nothing
    else live is listed. Otherwise it deletes itself and retries after a random back-off. Of
    two writers that both write then list, at least one sees the other, so a conflicting pair
    never both hold. Leases older than ``ttl_s`` are ignored (crashed writers), and a lease
    whose writer is known dead (it names a process of this host that is gone, e.g. a build
    killed with ``kill -9``) is removed at once, so a resume on the same machine does not
    wait out the TTL.

    Use as a context manager::

        with ZoneLease(store_uri, "utm31", storage, exclusive=True):
            ...
    """

    def __init__(
        self,
        store_uri: str,
        group: str,
        storage: StorageConfig,
        *,
        exclusive: bool,
        ttl_s: float = 300.0,
        timeout_s: float = 900.0,
    ) -> None:
        self.dir_uri = join(store_uri, LOCKS_DIR, group)
        self.storage = storage
        self.exclusive = exclusive
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._path: str | None = None
        self._since = 0.0

    def _live(self, names: list[str], now_ns: int) -> list[str]:
        live = []
        for n in names:
            try:
                t_ns = int(n.split("-")[1])
            except (IndexError, ValueError):
                continue
            if now_ns - t_ns < self.ttl_s * 1e9:
                live.append(n)
        return live

    def __enter__(self) -> ZoneLease:
        fs, dir_path = get_fs(self.dir_uri, self.storage)
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            name = f"{'x' if self.exclusive else 's'}-{time.time_ns()}-{uuid.uuid4().hex}"
            uri = join(self.dir_uri, name)
            write_bytes_atomic(uri, _LEASE_BODY(), self.storage)
            _, path = get_fs(uri, self.storage)
            names = [p.rsplit("/", 1)[-1] for p in _ls(fs, dir_path)]
            names = [n for n in names if n[:2] in ("x-", "s-")]  # not temporary files
            others = [n for n in self._live(names, time.time_ns()) if n != name]
            others = [n for n in others if not self._reap_dead(fs, dir_path, n)]
            conflict = bool(others) if self.exclusive else any(n[0] == "x" for n in others)
            if not conflict:
                self._path, self._since = path, time.monotonic()
                return self
            fs.rm(path)
            if time.monotonic() > deadline:
                kind = "exclusive" if self.exclusive else "shared"
                raise StorageError(
                    f"{self.dir_uri}: Expected to take a {kind} lease within "
                    f"{self.timeout_s:.0f} s. Got conflicting leases {others[:3]} (another "
                    "build writing this zone; stale leases expire after "
                    f"{self.ttl_s:.0f} s)."
                )
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)

    def _reap_dead(self, fs: Any, dir_path: str, name: str) -> bool:
        """Remove the lease ``name`` if its writer is known dead; True if it was removed."""
        try:
            with fs.open(f"{dir_path}/{name}", "rb") as f:
                holder = json.loads(f.read() or b"{}")
        except (FileNotFoundError, ValueError):
            return False
        if not isinstance(holder, dict) or not known_dead(holder):
            return False
        try:
            fs.rm(f"{dir_path}/{name}")
        except FileNotFoundError:
            pass
        return True

    def renew(self) -> None:
        """Keep a long hold alive: past a third of the TTL, write a fresh lease, drop the old.

        Writers call it between blocks, so a live writer's lease never looks stale.
        """
        if self._path is None or time.monotonic() - self._since < self.ttl_s / 3:
            return
        fs, _ = get_fs(self.dir_uri, self.storage)
        name = f"{'x' if self.exclusive else 's'}-{time.time_ns()}-{uuid.uuid4().hex}"
        uri = join(self.dir_uri, name)
        write_bytes_atomic(uri, _LEASE_BODY(), self.storage)
        old, (_, self._path), self._since = self._path, get_fs(uri, self.storage), time.monotonic()
        fs.rm(old)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._path is not None:
            fs, _ = get_fs(self.dir_uri, self.storage)
            try:
                fs.rm(self._path)
            except FileNotFoundError:
                pass
            self._path = None


def _ls(fs: Any, path: str) -> list[str]:
    """Names under a folder, bypassing fsspec's listing cache; [] when it does not exist."""
    try:
        fs.invalidate_cache(path)
        return list(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def _lease(
    store_uri: str, group: str, cfg: PublishConfig, storage: StorageConfig, *, exclusive: bool
) -> ZoneLease:
    return ZoneLease(
        store_uri,
        group,
        storage,
        exclusive=exclusive,
        ttl_s=cfg.lease_ttl_s,
        timeout_s=cfg.lease_timeout_s,
    )


# --------------------------------------------------------------------------------------------
# Growing a zone grid
# --------------------------------------------------------------------------------------------


def _journal_uri(store_uri: str, group: str) -> str:
    return join(store_uri, GROW_DIR, f"{group}.json")


def _read_json(uri: str, storage: StorageConfig) -> dict[str, Any] | None:
    fs, path = get_fs(uri, storage)
    try:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _shard_keys(fs: Any, array_path: str) -> list[tuple[str, tuple[int, ...]]]:
    """(path, chunk index) of every stored shard of an array (v3 default keys ``c/i/j[/k]``)."""
    base = array_path.rstrip("/") + "/c"
    try:
        fs.invalidate_cache(base)
        paths = fs.find(base)
    except FileNotFoundError:
        return []
    out = []
    for p in paths:
        rel = p[len(base) + 1 :] if p.startswith(base) else p.split("/c/", 1)[-1]
        try:
            out.append((p, tuple(int(x) for x in rel.split("/"))))
        except ValueError:
            continue
    return sorted(out, key=lambda kv: kv[1])


def _put_coord(group: zarr.Group, name: str, values: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write one 1-D coordinate array: uncompressed, unsharded, one chunk (the convention)."""
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=values.shape,
        compressors=None,
        filters=None,
        fill_value=0,
        dimension_names=[name],
        attributes=attrs,
        overwrite=True,
    )
    arr[:] = values


def _write_coords(group: zarr.Group, ext: ZoneExtent) -> None:
    """(Re)write ``easting``/``northing`` for a grid and the ``spatial_ref`` transform."""
    coords = (
        (
            "easting",
            ext.x0 + PIXEL_M * (np.arange(ext.width, dtype=np.float64) + 0.5),
            {"standard_name": "projection_x_coordinate", "axis": "X", "units": "m"},
        ),
        (
            "northing",
            ext.y0 - PIXEL_M * (np.arange(ext.height, dtype=np.float64) + 0.5),
            {"standard_name": "projection_y_coordinate", "axis": "Y", "units": "m"},
        ),
    )
    for name, values, attrs in coords:
        _put_coord(group, name, values, attrs)
    sref = group["spatial_ref"]
    sref.attrs.update(_grid_mapping_attrs(ext))


def _spatial_attrs(ext: ZoneExtent) -> dict[str, Any]:
    return {
        "proj:code": f"EPSG:{ext.epsg}",
        "spatial:transform": ext.transform,
        "spatial:shape": [ext.height, ext.width],
        "spatial:bbox": ext.bbox,
    }


def _grow_zone(
    store_uri: str,
    group: zarr.Group,
    old: ZoneExtent,
    new: ZoneExtent,
    storage: StorageConfig,
    lease: ZoneLease,
) -> None:
    """Grow a zone grid to ``new`` (covering ``old``); call under an exclusive lease.

    East/south: resize only. West/north: :func:`_move_origin` first.
    """
    if new.x0 != old.x0 or new.y0 != old.y0:
        _move_origin(store_uri, old.group, old, new, storage, lease)
        return
    for name in DATA_ARRAYS:
        if name in group:
            arr = group[name]
            arr.resize((new.height, new.width, *arr.shape[2:]))
    _write_coords(group, new)
    group.attrs.update(_spatial_attrs(new))


def _move_origin(
    store_uri: str,
    name: str,
    old: ZoneExtent,
    new: ZoneExtent,
    storage: StorageConfig,
    lease: ZoneLease,
) -> None:
    """Move a zone grid's origin west/north by whole shards, resumably (exclusive lease held).

    Journal ``.tessera/grow/{group}.json`` records ``old``/``new`` and the phase:

    1. ``staging``: copy every shard of every data array to ``.tessera/grow/{group}/`` (the
       array is untouched, so a crash here is redone from scratch);
    2. ``moving``: delete the scales shards (the zone now reads as absent), then the other
       shards; resize the arrays and rewrite coordinates, ``spatial_ref``, group attributes
       and tile records (a consistent new grid with every tile absent); copy staged shards
       to their new keys, ``scales`` LAST; delete the staging copies and the journal. Every step is idempotent, so a crash is resumed by
       rerunning phase 2 from the journal.
    """
    fs, store_path = get_fs(store_uri, storage)
    journal = _journal_uri(store_uri, name)
    stage_uri = join(store_uri, GROW_DIR, name)
    _, stage_path = get_fs(stage_uri, storage)
    rec = {"group": name, "old": old.model_dump(), "new": new.model_dump(), "phase": "staging"}
    write_bytes_atomic(journal, json.dumps(rec).encode(), storage)
    if fs.exists(stage_path):
        fs.rm(stage_path, recursive=True)
    for arr_name in DATA_ARRAYS:
        for path, idx in _shard_keys(fs, f"{store_path}/{name}/{arr_name}"):
            dst = f"{stage_path}/{arr_name}/c/" + "/".join(map(str, idx))
            _copy(fs, path, dst)
            lease.renew()
    rec["phase"] = "moving"
    write_bytes_atomic(journal, json.dumps(rec).encode(), storage)
    _finish_move(store_uri, name, storage, lease)


def _copy(fs: Any, src: str, dst: str) -> None:
    """Copy one object (server-side on S3); parents made where the filesystem needs them."""
    fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
    fs.copy(src, dst)


def _finish_move(store_uri: str, name: str, storage: StorageConfig, lease: ZoneLease) -> None:
    """Phase 2 of :func:`_move_origin`, from its journal (idempotent)."""
    rec = _read_json(_journal_uri(store_uri, name), storage)
    if rec is None:
        return
    old, new = ZoneExtent(**rec["old"]), ZoneExtent(**rec["new"])
    fs, store_path = get_fs(store_uri, storage)
    _, stage_path = get_fs(join(store_uri, GROW_DIR, name), storage)
    if rec["phase"] == "staging":  # crashed while staging: the arrays are intact, redo
        _move_origin(store_uri, name, old, new, storage, lease)
        return
    d_row = round((new.y0 - old.y0) / (SHARD_PX * PIXEL_M))
    d_col = round((old.x0 - new.x0) / (SHARD_PX * PIXEL_M))
    # scales first: from here the zone reads as absent until its scales come back
    for arr_name in ("scales", "embeddings", "rgb"):
        for path, _ in _shard_keys(fs, f"{store_path}/{name}/{arr_name}"):
            fs.rm(path)
    # the new grid, complete and consistent (every tile absent) before any shard returns
    group = zarr.open_group(zarr_store(join(store_uri, name), storage), mode="r+")
    for arr_name in DATA_ARRAYS:
        if arr_name in group:
            arr = group[arr_name]
            arr.resize((new.height, new.width, *arr.shape[2:]))
    _write_coords(group, new)
    group.attrs.update(_spatial_attrs(new))
    _rewrite_record_offsets(store_uri, new, storage)
    for arr_name in DATA_ARRAYS:  # scales last: the commit
        for path, idx in _shard_keys(fs, f"{stage_path}/{arr_name}"):
            moved = (idx[0] + d_row, idx[1] + d_col, *idx[2:])
            _copy(fs, path, f"{store_path}/{name}/{arr_name}/c/" + "/".join(map(str, moved)))
            lease.renew()
    if fs.exists(stage_path):
        fs.rm(stage_path, recursive=True)
    _, jpath = get_fs(_journal_uri(store_uri, name), storage)
    fs.rm(jpath)


def _rewrite_record_offsets(store_uri: str, ext: ZoneExtent, storage: StorageConfig) -> None:
    fs, path = get_fs(join(store_uri, RECORDS_DIR), storage)
    prefix = f"{ext.zone:02d}{'S' if ext.south else 'N'}-"
    for p in _ls(fs, path):
        fname = p.rsplit("/", 1)[-1]
        if not (fname.startswith(prefix) and fname.endswith(".json")):
            continue
        uri = join(store_uri, RECORDS_DIR, fname)
        rec = _read_json(uri, storage)
        if rec is None:
            continue
        r0, c0 = ext.offset(Tile.from_id(rec["tile_id"]))
        if (rec.get("row_offset"), rec.get("col_offset")) != (r0, c0):
            rec.update(row_offset=r0, col_offset=c0)
            write_bytes_atomic(uri, json.dumps(rec, sort_keys=True, indent=1).encode(), storage)


def _check_no_move(store_uri: str, name: str, storage: StorageConfig) -> None:
    if _read_json(_journal_uri(store_uri, name), storage) is not None:
        raise StorageError(
            f"{join(store_uri, name)}: Expected a zone grid at rest. Got an unfinished origin "
            "move (a crashed prepare_zone_stores); run prepare_zone_stores again to finish it."
        )


def prepare_zone_stores(
    tiles: Sequence[Tile],
    year: int,
    cfg: PublishConfig,
    storage: StorageConfig,
    model_version: str,
    n_bands: int | None = None,
) -> list[str]:
    """Create, validate or grow the year store and one zone group per zone of the tiles.

    A new group's grid is the union of its tiles' extents snapped to whole 256-px shards; an
    existing group is grown to cover new tiles (east/south: resize; west/north: a journaled
    origin move, see the module docstring). Each zone is changed under an exclusive
    :class:`ZoneLease`; an unfinished origin move left by a crash is completed first.

    Args:
        tiles: Tiles that will be published (any zones, any order).
        year: The year; the store is ``{storage.output_uri}/{year}.zarr``.
        cfg: Publish config (compression level, build version, lease timing).
        storage: Storage roots.
        model_version: Recorded as ``tessera:model_version`` (with the family, preset, size,
            checkpoint hash prefix and int8 rule derived from it); an existing group must match.
        n_bands: Embedding dimensions B (default ``cfg.dims``, the Matryoshka prefix K); an
            existing group must match.

    Returns:
        The zone group names (e.g. ``["utm30", "utm31"]``), sorted; each lives at
        ``{storage.output_uri}/{year}.zarr/{name}``.

    Raises:
        DataError: an existing store of another ``tessera:dataset_version`` or year, or an
            existing zone group of another ``tessera:model_version`` or band count.
        StorageError: a lease could not be taken in time.
    """
    if n_bands is None:  # from the config: checked against the model (an explicit B is not)
        n_bands = cfg.dims
        check_publish_model(model_version, n_bands)
    store_uri = year_store_uri(storage.output_uri, year)
    if not tiles:
        return []
    root = _open_root(store_uri, storage)
    if root is None:
        with _lease(store_uri, "_root", cfg, storage, exclusive=True):
            root = _open_root(store_uri, storage)
            if root is None:
                root = zarr.create_group(
                    zarr_store(store_uri, storage), attributes=_root_attrs(year), zarr_format=3
                )
    _check_root(root, store_uri, year)
    by_zone: dict[tuple[int, bool], list[Tile]] = {}
    for t in tiles:
        by_zone.setdefault((t.zone, t.south), []).append(t)
    names: list[str] = []
    for (zone, south), zone_tiles in sorted(by_zone.items()):
        name = _group_name(zone, south)
        where = join(store_uri, name)
        with _lease(store_uri, name, cfg, storage, exclusive=True) as lease:
            _finish_move(store_uri, name, storage, lease)
            root = zarr.open_group(zarr_store(store_uri, storage), mode="r+")
            if name in root:
                group = root[name]
                if not isinstance(group, zarr.Group):
                    raise DataError(f"{where}: Expected a zone group. Got an array.")
                ext = _check_zone(group, where, model_version, n_bands)
                new = ext.union(zone_tiles)
                if new != ext:
                    _grow_zone(store_uri, group, ext, new, storage, lease)
            else:
                _create_zone(
                    root, ZoneExtent.from_tiles(zone_tiles), year, n_bands, model_version, cfg
                )
        names.append(name)
    return sorted(names)


# --------------------------------------------------------------------------------------------
# Publishing one tile
# --------------------------------------------------------------------------------------------


def _blocks(height: int, width: int) -> Iterator[tuple[slice, slice]]:
    """Write blocks of a tile, shard row by shard row: (rows, cols) slices, row-major."""
    step_c = SHARD_PX * BLOCK_SHARDS
    for r in range(0, height, SHARD_PX):
        for c in range(0, width, step_c):
            yield slice(r, min(r + SHARD_PX, height)), slice(c, min(c + step_c, width))


def _record_uri(store_uri: str, tile: Tile) -> str:
    return join(store_uri, RECORDS_DIR, f"{tile.id}.json")


def provenance_uri(work_uri: str, year: int, tile: Tile) -> str:
    """Where :func:`publish_tile` notes when (and into which output root) it wrote a tile.

    ``{work_uri}/provenance/{year}/tiles/{tile_id}.json``: in the work root, beside the
    stages' commit markers, because a wall-clock time in the published bytes would make two
    identical builds differ.
    """
    return join(work_uri, PROVENANCE_DIR, str(year), "tiles", f"{tile.id}.json")


def read_tile_record(
    output_uri: str, year: int, tile: Tile, storage: StorageConfig
) -> dict[str, Any] | None:
    """The commit record of a published tile, or None when it is not published."""
    return _read_json(_record_uri(year_store_uri(output_uri, year), tile), storage)


def _count_tiles(store_uri: str, zone: int, south: bool, storage: StorageConfig) -> int:
    """Committed tiles of one zone group, counted from the records (tile ids start "31N-")."""
    fs, path = get_fs(join(store_uri, RECORDS_DIR), storage)
    prefix = f"{zone:02d}{'S' if south else 'N'}-"
    names = [p.rsplit("/", 1)[-1] for p in _ls(fs, path)]
    return sum(1 for n in names if n.startswith(prefix) and n.endswith(".json"))


def _content_sha256(src: zarr.Array, shape: tuple[int, int, int]) -> str:
    """SHA-256 of a tile's float32 embedding, streamed block by block (same order as writes)."""
    h = hashlib.sha256(json.dumps(list(shape)).encode())
    for rows, cols in _blocks(shape[0], shape[1]):
        block = np.ascontiguousarray(src[rows, cols, :], dtype=np.float32)
        h.update(block.tobytes())
    return h.hexdigest()


def _quantise(e: np.ndarray, rule: str = "v1") -> tuple[np.ndarray, np.ndarray]:
    from tessera_model.quantise import quantise  # the one implementation (section 4)

    q, s = quantise(e, rule=rule)  # type: ignore[arg-type]
    return np.asarray(q, dtype=np.int8), np.asarray(s, dtype=np.float32)


def publish_tile(
    emb: EmbeddingRef,
    year: int,
    cfg: PublishConfig,
    storage: StorageConfig,
    model_version: str,
) -> PublishRef:
    """Quantise one tile's float embeddings and commit them into its zone group.

    The zone group must exist and cover the tile (:func:`prepare_zone_stores`). Under a shared
    :class:`ZoneLease`: retract, write every int8 embedding block (a shard row, at most 4
    shards wide, so input memory is bounded by the block), then the whole tile's scales (the
    commit; a pixel is visible only once its scale is written), then the record. A publish
    that dies before its scales leaves the tile absent, and a re-run completes it. A tile
    already published with the same content (SHA-256 of the float input), model version and
    format is skipped; different content replaces it cleanly (the record and the scales are
    retracted first). The record holds no time, path or cache key (same input, same bytes);
    when, where to and from which work-root embedding a tile was published goes to
    :func:`provenance_uri` in the work root.

    Args:
        emb: Reference to a Zarr group with ``embedding`` float32 (H, W, B), NaN rows = no
            data, for ``emb.tile``.
        year: The year store to publish into.
        cfg: Publish config.
        storage: Storage roots (``output_uri`` holds the year stores).
        model_version: Must equal the zone group's ``tessera:model_version``.

    Returns:
        A :class:`PublishRef` naming the zone group; ``skipped`` when nothing was written.

    Raises:
        DataError: wrong input shape, version mismatch, or a tile outside the zone grid.
        StorageError: the year store or zone group does not exist.
    """
    tile = emb.tile
    store_uri = year_store_uri(storage.output_uri, year)
    name = zone_group_name(tile)
    where = join(store_uri, name)
    root = _open_root(store_uri, storage)
    if root is None or name not in root:
        raise StorageError(
            f"tile {tile.id}: Expected zone group {where} (run prepare_zone_stores first). Got none."
        )
    _check_root(root, store_uri, year)
    group = root[name]
    if not isinstance(group, zarr.Group):
        raise DataError(f"{where}: Expected a zone group. Got an array.")
    n_bands = int(group.attrs["tessera:n_bands"])
    _check_zone(group, where, model_version, n_bands)

    src_group = zarr.open_group(zarr_store(emb.uri, storage, read_only=True), mode="r")
    if "embedding" not in src_group:
        raise DataError(f"tile {tile.id}: Expected array 'embedding' in {emb.uri}. Got none.")
    src = src_group["embedding"]
    full = int(src.shape[-1]) if isinstance(src, zarr.Array) and src.ndim == 3 else N_BANDS
    shape = (tile.height, tile.width, n_bands)
    in_shape = (tile.height, tile.width, full)
    if not isinstance(src, zarr.Array) or tuple(src.shape) != in_shape or full < n_bands:
        got = tuple(src.shape) if isinstance(src, zarr.Array) else "a group"
        raise DataError(
            f"tile {tile.id}: Expected embedding shape {in_shape[:2]} x >= {n_bands}. Got {got}."
        )
    coverage = src_group.attrs.get("coverage_rule")
    zone_rule = group.attrs.get("tessera:coverage_rule")
    if coverage is not None and zone_rule is not None and coverage != zone_rule:
        raise DataError(
            f"{where}: Expected tessera:coverage_rule {zone_rule!r} (the store's). Got "
            f"{coverage!r} for tile {tile.id}: one store, one coverage rule."
        )
    rule = quantisation_rule(model_version)

    sha = _content_sha256(src, in_shape)
    extra = () if (n_bands, rule) == (N_BANDS, "v1") else (n_bands, rule)
    key = content_key("publish", PUBLISH_FORMAT, sha, model_version, name, *extra)
    ref = PublishRef(uri=where, key=key, tile=tile, store_uri=store_uri, group=name)
    record_uri = _record_uri(store_uri, tile)
    old = read_tile_record(storage.output_uri, year, tile, storage)
    if old is not None and old.get("publish_key") == key:
        return ref.model_copy(update={"skipped": True})

    with _lease(store_uri, name, cfg, storage, exclusive=False) as lease:
        _check_no_move(store_uri, name, storage)
        # (re)open under the lease: no grid change can happen until it is released
        group = zarr.open_group(zarr_store(where, storage), mode="r+")
        ext = ZoneExtent.from_attrs(dict(group.attrs))
        if not ext.covers(tile):
            raise DataError(
                f"tile {tile.id}: Expected a tile inside zone grid {where} (bbox {ext.bbox}); "
                f"run prepare_zone_stores with it first. Got tile bounds {list(tile.bounds)}."
            )
        if coverage is not None and group.attrs.get("tessera:coverage_rule") is None:
            group.attrs.update({"tessera:coverage_rule": coverage})
        emb_arr, scales_arr = group["embeddings"], group["scales"]
        r0, c0 = ext.offset(tile)
        rows_all, cols_all = slice(r0, r0 + tile.height), slice(c0, c0 + tile.width)
        # 1. Retract: drop the record, then the scales (whole NaN shards are deleted).
        fs, rec_path = get_fs(record_uri, storage)
        if old is not None:
            fs.rm(rec_path)
            _converge_n_tiles(store_uri, where, ext, storage)
        scales_arr[rows_all, cols_all] = np.full((tile.height, tile.width), np.nan, np.float32)
        # 2. Every embedding block; the tile's scales wait in memory (4 B/pixel).
        scales = np.full((tile.height, tile.width), np.nan, np.float32)
        for rows, cols in _blocks(tile.height, tile.width):
            q, s = _quantise(np.asarray(src[rows, cols, :n_bands], dtype=np.float32), rule)
            emb_arr[r0 + rows.start : r0 + rows.stop, c0 + cols.start : c0 + cols.stop, :] = q
            scales[rows, cols] = s
            lease.renew()
        # 3. The commit: the scales of the whole tile, then the record.
        scales_arr[rows_all, cols_all] = scales
        n_valid = int(np.isfinite(scales).sum())
        record = {
            "tile_id": tile.id,
            "group": name,
            "row_offset": r0,
            "col_offset": c0,
            "shape": list(shape),
            "bounds": list(tile.bounds),
            "epsg": ext.epsg,
            "year": year,
            "content_sha256": sha,
            "publish_key": key,
            "publish_format": PUBLISH_FORMAT,
            **({"coverage_rule": coverage} if coverage is not None else {}),
            **({"quantisation": rule} if rule != "v1" else {}),
            "model_version": model_version,
            "n_valid": n_valid,
            "n_nodata": tile.height * tile.width - n_valid,
        }
        write_bytes_atomic(
            record_uri, json.dumps(record, sort_keys=True, indent=1).encode(), storage
        )
        _converge_n_tiles(store_uri, where, ext, storage)
    provenance = {
        "tile_id": tile.id,
        "year": year,
        "output_uri": storage.output_uri,
        "publish_key": key,
        "content_sha256": sha,
        "source_key": emb.key,
        "source_uri": emb.uri,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time())),
    }
    write_bytes_atomic(
        provenance_uri(storage.work_uri, year, tile),
        json.dumps(provenance, sort_keys=True, indent=1).encode(),
        storage,
    )
    return ref


def _converge_n_tiles(
    store_uri: str, where: str, ext: ZoneExtent, storage: StorageConfig, max_rounds: int = 20
) -> int:
    """Write ``tessera:n_tiles`` = the record count until a recount after the write agrees.

    Concurrent publishers each end with a recount that includes every record written before
    their last attribute write, so the last write standing is the true count.
    """
    n = _count_tiles(store_uri, ext.zone, ext.south, storage)
    for _ in range(max_rounds):
        group = zarr.open_group(zarr_store(where, storage), mode="r+")
        if group.attrs.get("tessera:n_tiles") != n:
            group.attrs.update({"tessera:n_tiles": n})
        again = _count_tiles(store_uri, ext.zone, ext.south, storage)
        if again == n:
            return n
        n = again
    return n


def refresh_n_tiles(output_uri: str, year: int, group: str, storage: StorageConfig) -> int:
    """Recount ``tessera:n_tiles`` of a zone group from the tile records and store it.

    :func:`publish_tile` updates the count itself; call this once after publishing tiles of
    one zone concurrently, where two updates may race.

    Returns:
        The number of committed tiles of the group.
    """
    store_uri = year_store_uri(output_uri, year)
    root = _open_root(store_uri, storage)
    if root is None or group not in root:
        raise StorageError(f"Expected zone group {join(store_uri, group)}. Got none.")
    zg = root[group]
    ext = ZoneExtent.from_attrs(dict(zg.attrs))
    n = _count_tiles(store_uri, ext.zone, ext.south, storage)
    if zg.attrs.get("tessera:n_tiles") != n:
        zg.attrs.update({"tessera:n_tiles": n})
    return n


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def open_zone(output_uri: str, year: int, group: str | int, storage: StorageConfig) -> xr.Dataset:
    """Open a zone group as an xarray Dataset (lazy), CRS and transform via ``spatial_ref``.

    With dask installed the arrays are chunked one shard per chunk (256 x 256 x B): default
    small chunks make window reads several times slower. Without dask they are lazily indexed.

    Args:
        output_uri: Root holding ``{year}.zarr``.
        year: The year.
        group: Group name (``"utm31"``, ``"utm31s"``) or a northern zone number.
        storage: Storage config (S3 endpoint).

    Returns:
        Dataset with ``embeddings`` int8 (northing, easting, band) and ``scales`` float32
        (northing, easting); ``ds.rio.crs`` and ``ds["scales"].rio.transform()`` work.
    """
    name = group if isinstance(group, str) else _group_name(group, False)
    store = zarr_store(year_store_uri(output_uri, year), storage, read_only=True)
    chunks: dict[str, int] | None = None
    if importlib.util.find_spec("dask") is not None:
        chunks = {"northing": SHARD_PX, "easting": SHARD_PX, "band": -1}
    return xr.open_zarr(store, group=name, consolidated=False, chunks=chunks)


def dequantise_zone(ds: xr.Dataset) -> xr.DataArray:
    """Dequantised float32 embeddings of a (window of a) zone Dataset.

    Uses :func:`tessera_model.quantise.dequantise`; pixels with a NaN scale read as NaN.
    Select a window first: without dask this loads what it is given.

    Args:
        ds: A Dataset from :func:`open_zone` (or a selection of it).

    Returns:
        float32 DataArray (northing, easting, band).
    """
    from tessera_model.quantise import dequantise

    def _deq(q: np.ndarray, s: np.ndarray) -> np.ndarray:
        return np.asarray(dequantise(q, s), dtype=np.float32)

    out = xr.apply_ufunc(
        _deq,
        ds["embeddings"],
        ds["scales"],
        input_core_dims=[["band"], []],
        output_core_dims=[["band"]],
        dask="parallelized",
        output_dtypes=[np.float32],
    )
    return out.rename("embedding").transpose("northing", "easting", "band")
