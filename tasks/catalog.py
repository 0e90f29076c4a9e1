"""Manifest (parquet) and STAC catalogue of the published tiles of a year store.

Source of truth: the per-tile commit records ``{year}.zarr/.tessera/tiles/{tile_id}.json``
that :func:`tasks.publish.publish_tile` writes right after a tile's scales (its commit). The
manifest and the catalogue are views regenerated from those records by
:func:`update_catalog`, so they never list a tile that is not committed, and re-running it
after a crash repairs them. Each file is replaced atomically (one PUT on S3, rename locally);
within a catalogue, items are written before the collection that links them, and the root
catalogue last. Regenerations of one year are serialised by an exclusive lease.

Layout under ``{output_uri}/catalog/``::

    catalog.json                      root catalogue, one child collection per year
    {year}/collection.json            extent = union of tiles, the year as temporal extent
    {year}/items/{tile_id}.json       one STAC item per tile (projection + raster extensions)
    {year}/manifest.parquet           one row per tile (columns: MANIFEST_COLUMNS)

The catalogue is *self-contained* (STAC best practice, pystac ``CatalogType.SELF_CONTAINED``):
every href is relative (links to ``./``/``../`` JSON files, assets to ``../../../{year}.zarr``),
there are no self links, so the output root can be copied, moved or served over HTTP as is.
Nothing here depends on where or when it was built: no absolute path, no wall-clock time
(items carry the year as ``start_datetime``/``end_datetime``), so two builds with the same
config and seed write the same bytes. :func:`validate_catalog` checks all of it against the
STAC JSON schemas offline (pystac's bundled core schemas and the extension schemas in
``tasks/schemas/``).
"""

from __future__ import annotations

import io
import json
import posixpath
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pystac
from pydantic import BaseModel, ConfigDict
from pyproj import Transformer
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from pystac.validation import JsonSchemaSTACValidator, validate_dict

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import DataError
from tasks.grid import Tile
from tasks.publish import RECORDS_DIR, ZoneLease, year_store_uri
from tasks.storage import get_fs, join, write_bytes_atomic

__all__ = [
    "MANIFEST_COLUMNS",
    "CatalogRef",
    "local_stac_validator",
    "read_manifest",
    "update_catalog",
    "validate_catalog",
]

SCHEMAS_DIR = Path(__file__).with_name("schemas")
"""Offline copies of the STAC extension schemas our items declare (see its README)."""
_ROOT = "/tessera-output"
"""A stand-in absolute path for the output root: hrefs are computed against it, then made
relative, so no real path of any machine ever reaches the catalogue."""
_JSON = pystac.MediaType.JSON
_ZARR = "application/vnd+zarr"

MANIFEST_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("zone", pa.int16()),
        ("south", pa.bool_()),
        ("group", pa.string()),
        ("epsg", pa.int32()),
        ("x_min", pa.float64()),
        ("y_min", pa.float64()),
        ("x_max", pa.float64()),
        ("y_max", pa.float64()),
        ("lon_min", pa.float64()),
        ("lat_min", pa.float64()),
        ("lon_max", pa.float64()),
        ("lat_max", pa.float64()),
        ("year", pa.int16()),
        ("model_version", pa.string()),
        ("content_sha256", pa.string()),
        ("n_valid", pa.int64()),
        ("row_offset", pa.int64()),
        ("col_offset", pa.int64()),
        ("store_path", pa.string()),
    ]
)
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
"""Manifest columns: native UTM bounds (x/y) and lon/lat bounds of each tile; ``store_path``
is the year store relative to the output root (``2024.zarr``), ``group`` its zone group."""


class CatalogRef(BaseModel):
    """What :func:`update_catalog` wrote."""

    model_config = ConfigDict(frozen=True)

    manifest_uri: str
    catalog_uri: str
    collection_uri: str
    n_tiles: int


def _catalog_root(output_uri: str) -> str:
    return join(output_uri, "catalog")


def _records(store_uri: str, storage: StorageConfig) -> list[dict[str, Any]]:
    fs, path = get_fs(join(store_uri, RECORDS_DIR), storage)
    try:
        fs.invalidate_cache(path)
        paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for p in paths:
        with fs.open(p, "rb") as f:
            out.append(json.loads(f.read()))
    return out


def _lonlat_bounds(tile: Tile) -> tuple[float, float, float, float]:
    t = Transformer.from_crs(tile.epsg, 4326, always_xy=True)
    return t.transform_bounds(*tile.bounds, densify_pts=21)


def _row(rec: dict[str, Any], year: int) -> dict[str, Any]:
    tile = Tile.from_id(rec["tile_id"])
    lon0, lat0, lon1, lat1 = _lonlat_bounds(tile)
    x0, y0, x1, y1 = tile.bounds
    return {
        "tile_id": tile.id,
        "zone": tile.zone,
        "south": tile.south,
        "group": rec["group"],
        "epsg": tile.epsg,
        "x_min": x0,
        "y_min": y0,
        "x_max": x1,
        "y_max": y1,
        "lon_min": lon0,
        "lat_min": lat0,
        "lon_max": lon1,
        "lat_max": lat1,
        "year": year,
        "model_version": rec["model_version"],
        "content_sha256": rec["content_sha256"],
        "n_valid": rec["n_valid"],
        "row_offset": rec["row_offset"],
        "col_offset": rec["col_offset"],
        "store_path": f"{year}.zarr",
        "n_bands": int(rec.get("shape", [0, 0, 128])[-1]),  # item property only (K < 128)
        # item properties only, where the record has them: which pixels were embedded and how
        **{k: rec[k] for k in ("coverage_rule", "inference") if rec.get(k) is not None},
    }


def _year_span(year: int) -> tuple[datetime, datetime]:
    """First and last second of a year, UTC: the time a year's embeddings describe."""
    return datetime(year, 1, 1, tzinfo=UTC), datetime(year, 12, 31, 23, 59, 59, tzinfo=UTC)


def _item(row: dict[str, Any], year: int) -> pystac.Item:
    tile = Tile.from_id(row["tile_id"])
    lon0, lat0, lon1, lat1 = row["lon_min"], row["lat_min"], row["lon_max"], row["lat_max"]
    t = Transformer.from_crs(tile.epsg, 4326, always_xy=True)
    x0, y1, x1, y0 = tile.bounds  # (min x, min y, max x, max y)
    ring = [list(t.transform(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    start, end = _year_span(year)
    item = pystac.Item(
        id=tile.id,
        geometry={"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        bbox=[lon0, lat0, lon1, lat1],
        datetime=None,
        start_datetime=start,
        end_datetime=end,
        properties={
            "tessera:year": year,
            "tessera:model_version": row["model_version"],
            "tessera:content_sha256": row["content_sha256"],
            "tessera:n_valid": row["n_valid"],
            "tessera:zone_group": row["group"],
            "tessera:row_offset": row["row_offset"],
            "tessera:col_offset": row["col_offset"],
            **({"tessera:n_bands": row["n_bands"]} if row.get("n_bands", 128) != 128 else {}),
            **{f"tessera:{k}": row[k] for k in ("coverage_rule", "inference") if k in row},
        },
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(
        code=f"EPSG:{tile.epsg}",
        bbox=list(tile.bounds),
        shape=[tile.height, tile.width],
        transform=list(tile.transform),
    )
    item.set_self_href(f"{_ROOT}/catalog/{year}/items/{tile.id}.json")
    RasterExtension.add_to(item)
    group_href = f"{_ROOT}/{row['store_path']}/{row['group']}"
    for key, dtype, nodata, title in (
        ("embeddings", DataType.INT8, None, "int8 embeddings (H, W, B), dequantise q * scale"),
        ("scales", DataType.FLOAT32, "nan", "float32 per-pixel scales (NaN = no data)"),
    ):
        asset = pystac.Asset(
            href=f"{group_href}/{key}",
            media_type=_ZARR,
            roles=["data"],
            title=title,
            extra_fields={
                "tessera:window": {
                    "rows": [row["row_offset"], row["row_offset"] + tile.height],
                    "cols": [row["col_offset"], row["col_offset"] + tile.width],
                }
            },
        )
        item.add_asset(key, asset)
        band = RasterBand.create(data_type=dtype, spatial_resolution=10.0)
        if nodata is not None:
            band.properties["nodata"] = nodata  # raster v1.1: the string "nan" (valid JSON)
        RasterExtension.ext(asset).apply([band])
    item.make_asset_hrefs_relative()
    return item


def _collection(year: int, rows: list[dict[str, Any]]) -> pystac.Collection:
    if rows:
        lon0 = min(r["lon_min"] for r in rows)
        lat0 = min(r["lat_min"] for r in rows)
        lon1 = max(r["lon_max"] for r in rows)
        lat1 = max(r["lat_max"] for r in rows)
    else:
        lon0, lat0, lon1, lat1 = -180.0, -90.0, 180.0, 90.0
    start, end = _year_span(year)
    collection = pystac.Collection(
        id=f"tessera-{year}",
        description=(
            f"TESSERA int8 embeddings, {year}: the tessera: v1 Zarr store {year}.zarr at "
            "the root of this output (asset 'zarr'); one item per published tile."
        ),
        extent=pystac.Extent(
            pystac.SpatialExtent([[lon0, lat0, lon1, lat1]]),
            pystac.TemporalExtent([[start, end]]),
        ),
        license="CC-BY-4.0",
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    collection.set_self_href(f"{_ROOT}/catalog/{year}/collection.json")
    collection.add_asset(
        "zarr",
        pystac.Asset(
            href=f"{_ROOT}/{year}.zarr",
            media_type=_ZARR,
            roles=["data"],
            title=f"tessera: v1 Zarr store of {year} (one group per UTM zone)",
        ),
    )
    collection.make_asset_hrefs_relative()
    return collection


def _dump(obj: pystac.STACObject) -> bytes:
    """An object's JSON with relative hrefs and no self link (self-contained catalogue)."""
    d = obj.to_dict(include_self_link=False, transform_hrefs=True)
    return json.dumps(d, indent=1, allow_nan=False).encode()


def update_catalog(
    output_uri: str, year: int, storage: StorageConfig, cfg: PublishConfig | None = None
) -> CatalogRef:
    """Regenerate the manifest and STAC catalogue of one year from its tile records.

    Call after publishing (once per build, or after each tile): idempotent, and it repairs
    what a crash left stale.

    Returns:
        A :class:`CatalogRef` with the URIs written and the tile count.
    """
    cfg = cfg or PublishConfig()
    store_uri = year_store_uri(output_uri, year)
    root_uri = _catalog_root(output_uri)
    year_uri = join(root_uri, str(year))
    with ZoneLease(
        store_uri,
        "_catalog",
        storage,
        exclusive=True,
        ttl_s=cfg.lease_ttl_s,
        timeout_s=cfg.lease_timeout_s,
    ):
        rows = [_row(r, year) for r in _records(store_uri, storage)]
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        manifest_uri = join(year_uri, "manifest.parquet")
        write_bytes_atomic(manifest_uri, buf.getvalue(), storage)

        catalog_uri = join(root_uri, "catalog.json")
        years = sorted({*_catalog_years(catalog_uri, storage), year})
        catalog = pystac.Catalog(
            id="tessera",
            description="TESSERA published embeddings: one collection per year.",
            catalog_type=pystac.CatalogType.SELF_CONTAINED,
        )
        catalog.set_self_href(f"{_ROOT}/catalog/catalog.json")
        collection = _collection(year, rows)
        for y in years:  # other years' collections are linked, not rewritten
            if y == year:
                catalog.add_child(collection)
            else:
                href = f"{_ROOT}/catalog/{y}/collection.json"
                catalog.add_link(pystac.Link("child", href, media_type=_JSON))
        # add_child/add_item move self hrefs to pystac's default layout; ours is fixed
        collection.set_self_href(f"{_ROOT}/catalog/{year}/collection.json")
        items = [_item(r, year) for r in rows]
        for item in items:
            collection.add_item(item)
            item.set_self_href(f"{_ROOT}/catalog/{year}/items/{item.id}.json")
        for item in items:  # items before the collection that links them
            write_bytes_atomic(join(year_uri, "items", f"{item.id}.json"), _dump(item), storage)
        collection_uri = join(year_uri, "collection.json")
        write_bytes_atomic(collection_uri, _dump(collection), storage)
        write_bytes_atomic(catalog_uri, _dump(catalog), storage)
    return CatalogRef(
        manifest_uri=manifest_uri,
        catalog_uri=catalog_uri,
        collection_uri=collection_uri,
        n_tiles=len(rows),
    )


def _catalog_years(catalog_uri: str, storage: StorageConfig) -> list[int]:
    fs, path = get_fs(catalog_uri, storage)
    try:
        with fs.open(path, "rb") as f:
            d = json.loads(f.read())
    except FileNotFoundError:
        return []
    return [
        int(link["href"].rstrip("/").split("/")[-2])
        for link in d.get("links", [])
        if link.get("rel") == "child"
    ]


def local_stac_validator() -> JsonSchemaSTACValidator:
    """A pystac JSON-schema validator that needs no network.

    pystac bundles the STAC core schemas; the extension schemas our items declare are read
    from :data:`SCHEMAS_DIR`. Pass it as ``validator=`` to ``pystac.validation.validate_dict``
    (no global state is changed). A schema that is in neither place is fetched by pystac as
    usual, which fails offline with a message naming its URI.
    """
    validator = JsonSchemaSTACValidator()
    for f in sorted(SCHEMAS_DIR.glob("*.json")):
        schema = json.loads(f.read_text())
        validator.schema_cache[str(schema["$id"]).rstrip("#")] = schema
    return validator


def _check_relative(href: str, where: str) -> None:
    if "://" in href or href.startswith("/") or (len(href) > 1 and href[1] == ":"):
        raise DataError(
            f"{where}: Expected relative hrefs only (a self-contained catalogue). Got {href!r}."
        )


def validate_catalog(output_uri: str, storage: StorageConfig) -> int:
    """Validate the whole STAC catalogue of an output root against the STAC JSON schemas.

    Walks ``catalog/catalog.json``, every child collection and every item, validates each
    with :func:`local_stac_validator` (offline), and checks that the catalogue is
    self-contained: no self links, every link and asset href relative, every linked JSON file
    present.

    Args:
        output_uri: The output root (local path or ``s3://``).
        storage: Storage config.

    Returns:
        The number of STAC objects validated.

    Raises:
        DataError: a missing file, an absolute href or a self link.
        pystac.errors.STACValidationError: an object that does not match its schemas.
    """
    validator = local_stac_validator()
    todo = [join(_catalog_root(output_uri), "catalog.json")]
    n = 0
    while todo:
        uri = todo.pop(0)
        fs, path = get_fs(uri, storage)
        try:
            with fs.open(path, "rb") as f:
                d = json.loads(f.read())
        except FileNotFoundError:
            raise DataError(f"Expected a STAC file at {uri}. Got none.") from None
        validate_dict(d, href=uri, validator=validator)
        n += 1
        for link in d.get("links", []):
            if link.get("rel") == "self":
                raise DataError(f"{uri}: Expected no self link (self-contained). Got {link}.")
            _check_relative(link["href"], uri)
            if link.get("rel") in ("child", "item"):
                rel = posixpath.normpath(link["href"])
                todo.append(join(uri.rsplit("/", 1)[0], *rel.split("/")))
        for asset in d.get("assets", {}).values():
            _check_relative(asset["href"], uri)
    return n


def read_manifest(output_uri: str, year: int, storage: StorageConfig) -> pa.Table:
    """The manifest of a year (an empty table with the schema when there is none)."""
    fs, path = get_fs(join(_catalog_root(output_uri), str(year), "manifest.parquet"), storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        return MANIFEST_SCHEMA.empty_table()
