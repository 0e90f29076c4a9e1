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
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pystac
from pydantic import BaseModel, ConfigDict
from pyproj import Transformer
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

from tasks.config import PublishConfig, StorageConfig
from tasks.grid import Tile
from tasks.publish import RECORDS_DIR, ZoneLease, year_store_uri
from tasks.storage import get_fs, join, write_bytes_atomic

__all__ = ["MANIFEST_COLUMNS", "CatalogRef", "read_manifest", "update_catalog"]

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
        ("published_at", pa.timestamp("s", tz="UTC")),
        ("n_valid", pa.int64()),
        ("row_offset", pa.int64()),
        ("col_offset", pa.int64()),
        ("store_uri", pa.string()),
    ]
)
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
"""Manifest columns: native UTM bounds (x/y) and lon/lat bounds of each tile."""


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


def _row(rec: dict[str, Any], year: int, store_uri: str) -> dict[str, Any]:
    tile = Tile.from_id(rec["tile_id"])
    lon0, lat0, lon1, lat1 = _lonlat_bounds(tile)
    x0, y0, x1, y1 = tile.bounds
    stamp = rec.get("published_at")
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
        "published_at": datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        if stamp
        else None,
        "n_valid": rec["n_valid"],
        "row_offset": rec["row_offset"],
        "col_offset": rec["col_offset"],
        "store_uri": store_uri,
    }


def _item(row: dict[str, Any], year: int) -> pystac.Item:
    tile = Tile.from_id(row["tile_id"])
    lon0, lat0, lon1, lat1 = row["lon_min"], row["lat_min"], row["lon_max"], row["lat_max"]
    t = Transformer.from_crs(tile.epsg, 4326, always_xy=True)
    x0, y1, x1, y0 = tile.bounds  # (min x, min y, max x, max y)
    ring = [list(t.transform(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    item = pystac.Item(
        id=tile.id,
        geometry={"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        bbox=[lon0, lat0, lon1, lat1],
        datetime=None,
        start_datetime=datetime(year, 1, 1, tzinfo=UTC),
        end_datetime=datetime(year, 12, 31, 23, 59, 59, tzinfo=UTC),
        properties={
            "tessera:year": year,
            "tessera:model_version": row["model_version"],
            "tessera:content_sha256": row["content_sha256"],
            "tessera:n_valid": row["n_valid"],
            "tessera:zone_group": row["group"],
            "tessera:row_offset": row["row_offset"],
            "tessera:col_offset": row["col_offset"],
        },
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(
        code=f"EPSG:{tile.epsg}",
        bbox=list(tile.bounds),
        shape=[tile.height, tile.width],
        transform=list(tile.transform),
    )
    RasterExtension.add_to(item)
    group_uri = join(row["store_uri"], row["group"])
    for key, dtype, nodata, title in (
        ("embeddings", DataType.INT8, None, "int8 embeddings (H, W, 128), dequantise q * scale"),
        ("scales", DataType.FLOAT32, "nan", "float32 per-pixel scales (NaN = no data)"),
    ):
        asset = pystac.Asset(
            href=join(group_uri, key),
            media_type="application/vnd+zarr",
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
    return item


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
        rows = [_row(r, year, store_uri) for r in _records(store_uri, storage)]
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        manifest_uri = join(year_uri, "manifest.parquet")
        write_bytes_atomic(manifest_uri, buf.getvalue(), storage)

        items = [_item(r, year) for r in rows]
        if items:
            lon0 = min(r["lon_min"] for r in rows)
            lat0 = min(r["lat_min"] for r in rows)
            lon1 = max(r["lon_max"] for r in rows)
            lat1 = max(r["lat_max"] for r in rows)
        else:
            lon0, lat0, lon1, lat1 = -180.0, -90.0, 180.0, 90.0
        collection = pystac.Collection(
            id=f"tessera-{year}",
            description=f"TESSERA int8 embeddings, {year}, tessera: v1 Zarr ({store_uri}).",
            extent=pystac.Extent(
                pystac.SpatialExtent([[lon0, lat0, lon1, lat1]]),
                pystac.TemporalExtent(
                    [[datetime(year, 1, 1, tzinfo=UTC), datetime(year, 12, 31, tzinfo=UTC)]]
                ),
            ),
            license="CC-BY-4.0",
        )
        for item in items:
            item_uri = join(year_uri, "items", f"{item.id}.json")
            item.set_self_href(item_uri)
            collection.add_link(pystac.Link("item", item_uri, media_type="application/json"))
            item.set_collection(collection)
            d = item.to_dict(include_self_link=False, transform_hrefs=False)
            write_bytes_atomic(item_uri, json.dumps(d, indent=1, allow_nan=False).encode(), storage)
        collection_uri = join(year_uri, "collection.json")
        col = collection.to_dict(include_self_link=False, transform_hrefs=False)
        write_bytes_atomic(
            collection_uri, json.dumps(col, indent=1, allow_nan=False).encode(), storage
        )

        catalog_uri = join(root_uri, "catalog.json")
        years = sorted({*_catalog_years(catalog_uri, storage), year})
        catalog = pystac.Catalog(id="tessera", description="TESSERA published embeddings.")
        for y in years:
            catalog.add_link(
                pystac.Link("child", join(root_uri, str(y), "collection.json"), "application/json")
            )
        cat = catalog.to_dict(include_self_link=False, transform_hrefs=False)
        write_bytes_atomic(
            catalog_uri, json.dumps(cat, indent=1, allow_nan=False).encode(), storage
        )
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


def read_manifest(output_uri: str, year: int, storage: StorageConfig) -> pa.Table:
    """The manifest of a year (an empty table with the schema when there is none)."""
    fs, path = get_fs(join(_catalog_root(output_uri), str(year), "manifest.parquet"), storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        return MANIFEST_SCHEMA.empty_table()
