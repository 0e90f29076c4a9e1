"""Publish: quantise float embeddings to int8 and commit them into ``tessera:`` v1 zone stores.

Where things live (read them in this order):

- :mod:`~tasks.publish.conventions`: the layout's constants, the ``zarr_conventions``
  registry, and what a store records about the model (family, int8 rule, Matryoshka K).
- :mod:`~tasks.publish.coords`: zone grids (:class:`ZoneExtent`), group and store names, the
  coordinate arrays and the CF ``spatial_ref`` grid mapping.
- :mod:`~tasks.publish.zones`: creating, checking and growing the year store and its zone
  groups (:func:`prepare_zone_stores`, once per build before publishing).
- :mod:`~tasks.publish.grow`: growing a zone grid, including the journaled origin move.
- :mod:`~tasks.publish.leases`: writer leases on a zone group (:class:`ZoneLease`).
- :mod:`~tasks.publish.write`: publishing one tile (:func:`publish_tile`): one read of the
  float input that hashes, quantises and writes, then the commit.
- :mod:`~tasks.publish.records`: tile records, ``tessera:n_tiles`` and provenance.
- :mod:`~tasks.publish.read`: reading zone groups back (:func:`open_zone`,
  :func:`dequantise_zone`).
- :mod:`~tasks.publish._fs`: small storage helpers the modules share.

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

Growing a zone grid (:func:`prepare_zone_stores`, :mod:`~tasks.publish.grow`). A zone grid is
the union of its tiles snapped to whole shards. New tiles east or south of it are a resize:
the arrays' shapes grow, no byte of data moves, and the coordinate arrays and ``spatial:``
attributes are rewritten. New tiles west or north move the origin: Zarr indexes from the
origin, so every existing shard must take a new key. Shards are moved as whole objects (a
server-side copy on S3, no decode) by a journaled, resumable protocol: stage a copy of every
shard, retract all scales (the zone reads as absent, never as misplaced data), resize and
re-key, then copy the scales back LAST. A crash anywhere is resumed by the next prepare. We
chose this over a fixed zone-wide origin (which never moves) because that would make every
zone group ~930,000 x 80,000 px with MB-sized coordinate arrays and million-chunk dask graphs
for every reader; origin moves are rare (a build grows a zone once) and cost two object
copies per shard. The price: during a move the zone reads as empty (all scales NaN) for the
time of the copies back, never as misplaced data.

Commit protocol per tile (:func:`publish_tile`, :mod:`~tasks.publish.write`): retract (record
removed, scales -> NaN), write ALL int8 embedding blocks, then the scales of the whole tile
(the commit: a reader treats a NaN scale as absent), then the per-tile record
``{year}.zarr/.tessera/tiles/{tile_id}.json`` (content hash), then ``tessera:n_tiles``. A
publish killed before its scales leaves the tile absent; killed during the scales write, only
complete, correct pixels of the new content are visible; a re-run finishes it (no record, so
no skip). Publishing the same content again is a no-op. Quantisation is
:mod:`tessera_model.quantise` (section 4); this package does no arithmetic on the values.

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
writer); live writers renew theirs between blocks. ``tessera:n_tiles`` is recounted from the
tile records until a recount after the write agrees, so concurrent publishers converge on the
true count.
"""

from __future__ import annotations

from tasks.publish.conventions import (
    BLOCK_SHARDS,
    DATA_ARRAYS,
    DATASET_VERSION,
    GROW_DIR,
    INNER_CHUNK_PX,
    LOCKS_DIR,
    MATRYOSHKA_DIMS,
    N_BANDS,
    PROVENANCE_DIR,
    PUBLISH_FORMAT,
    RECORDS_DIR,
    ZARR_CONVENTIONS,
    check_publish_model,
    model_attrs,
    model_family_of,
    quantisation_rule,
)
from tasks.publish.coords import ZoneExtent, grid_mapping_attrs, year_store_uri, zone_group_name
from tasks.publish.leases import ZoneLease
from tasks.publish.read import dequantise_zone, open_zone
from tasks.publish.records import provenance_uri, read_tile_record, refresh_n_tiles
from tasks.publish.write import DEFAULT_INFERENCE, publish_tile
from tasks.publish.zones import prepare_zone_stores

__all__ = [
    "BLOCK_SHARDS",
    "DATASET_VERSION",
    "DATA_ARRAYS",
    "DEFAULT_INFERENCE",
    "GROW_DIR",
    "INNER_CHUNK_PX",
    "LOCKS_DIR",
    "MATRYOSHKA_DIMS",
    "N_BANDS",
    "PROVENANCE_DIR",
    "PUBLISH_FORMAT",
    "RECORDS_DIR",
    "ZARR_CONVENTIONS",
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
