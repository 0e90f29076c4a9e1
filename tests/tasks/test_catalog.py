"""Tests of the parquet manifest and the STAC catalogue (tasks/catalog.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pystac

from tasks.catalog import MANIFEST_COLUMNS, read_manifest, update_catalog
from tasks.publish import prepare_zone_stores, publish_tile, read_tile_record
from tests.tasks.test_publish import CFG, MODEL, T_A, T_B, YEAR, _embedding, _storage, _write_emb


def test_manifest_and_stac_follow_committed_tiles(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_B], YEAR, CFG, storage, MODEL)
    publish_tile(_write_emb(tmp_path, T_A, _embedding(T_A, 1)), YEAR, CFG, storage, MODEL)
    ref = update_catalog(storage.output_uri, YEAR, storage)
    assert ref.n_tiles == 1
    m = read_manifest(storage.output_uri, YEAR, storage)
    assert m.column_names == MANIFEST_COLUMNS and m.num_rows == 1

    publish_tile(_write_emb(tmp_path, T_B, _embedding(T_B, 2)), YEAR, CFG, storage, MODEL)
    ref = update_catalog(storage.output_uri, YEAR, storage)
    m = read_manifest(storage.output_uri, YEAR, storage).to_pylist()
    assert ref.n_tiles == 2 and [r["tile_id"] for r in m] == sorted([T_A.id, T_B.id])
    row = m[0]
    rec = read_tile_record(storage.output_uri, YEAR, T_A, storage)
    assert rec is not None
    assert (row["zone"], row["epsg"], row["year"]) == (31, 32631, YEAR)
    assert row["model_version"] == MODEL and row["content_sha256"] == rec["content_sha256"]
    assert (row["x_min"], row["y_max"], row["x_max"], row["y_min"]) == (
        T_A.x0,
        T_A.y0,
        T_A.x1,
        T_A.y1,
    )
    assert 0.1 < row["lon_min"] < row["lon_max"] < 0.2 and 52.1 < row["lat_min"] < 52.2
    assert row["published_at"] is not None and row["published_at"].year >= 2024

    cat = pystac.Catalog.from_file(ref.catalog_uri)
    col = pystac.Collection.from_file(ref.collection_uri)
    assert [link.href.endswith(f"{YEAR}/collection.json") for link in cat.get_child_links()] == [
        True
    ]
    items = [pystac.Item.from_file(link.href) for link in col.get_item_links()]
    assert sorted(i.id for i in items) == sorted([T_A.id, T_B.id])
    item = next(i for i in items if i.id == T_A.id)
    d = item.to_dict()
    assert any("projection" in s for s in d["stac_extensions"])
    assert any("raster" in s for s in d["stac_extensions"])
    assert d["properties"]["proj:code"] == "EPSG:32631"
    assert d["properties"]["proj:shape"] == [256, 256]
    assert d["properties"]["proj:transform"][:6] == [10.0, 0.0, T_A.x0, 0.0, -10.0, T_A.y0]
    assert d["assets"]["embeddings"]["raster:bands"][0]["data_type"] == "int8"
    assert d["assets"]["scales"]["raster:bands"][0]["data_type"] == "float32"
    assert d["assets"]["scales"]["raster:bands"][0]["nodata"] == "nan"
    assert d["assets"]["embeddings"]["href"].endswith(f"{YEAR}.zarr/utm31/embeddings")
    assert np.allclose(item.bbox, [row["lon_min"], row["lat_min"], row["lon_max"], row["lat_max"]])


def test_catalog_of_empty_store_and_no_uncommitted_tile(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    ref = update_catalog(storage.output_uri, YEAR, storage)
    assert ref.n_tiles == 0 and read_manifest(storage.output_uri, YEAR, storage).num_rows == 0
    assert json.loads(Path(ref.collection_uri).read_text())["type"] == "Collection"
    assert read_manifest(storage.output_uri, 1999, storage).num_rows == 0
