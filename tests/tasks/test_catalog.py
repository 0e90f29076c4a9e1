"""Tests of the parquet manifest and the STAC catalogue (tasks/catalog.py)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import zarr
from pystac.errors import STACValidationError
from pystac.validation import validate_dict

from tasks.catalog import (
    MANIFEST_COLUMNS,
    local_stac_validator,
    read_manifest,
    update_catalog,
    validate_catalog,
)
from tasks.config import StorageConfig
from tasks.errors import DataError
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
    assert row["store_path"] == f"{YEAR}.zarr" and "published_at" not in row

    cat = pystac.Catalog.from_file(ref.catalog_uri)
    col = pystac.Collection.from_file(ref.collection_uri)
    assert [link.href.endswith(f"{YEAR}/collection.json") for link in cat.get_child_links()] == [
        True
    ]
    items = [pystac.Item.from_file(link.get_absolute_href()) for link in col.get_item_links()]
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
    assert d["assets"]["embeddings"]["href"] == f"../../../{YEAR}.zarr/utm31/embeddings"
    assert item.assets["scales"].get_absolute_href() == str(
        Path(storage.output_uri) / f"{YEAR}.zarr" / "utm31" / "scales"
    )
    assert d["properties"]["start_datetime"] == f"{YEAR}-01-01T00:00:00Z"
    assert d["properties"]["end_datetime"] == f"{YEAR}-12-31T23:59:59Z"
    assert np.allclose(item.bbox, [row["lon_min"], row["lat_min"], row["lon_max"], row["lat_max"]])


def test_catalog_of_empty_store_and_no_uncommitted_tile(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, CFG, storage, MODEL)
    ref = update_catalog(storage.output_uri, YEAR, storage)
    assert ref.n_tiles == 0 and read_manifest(storage.output_uri, YEAR, storage).num_rows == 0
    assert json.loads(Path(ref.collection_uri).read_text())["type"] == "Collection"
    assert read_manifest(storage.output_uri, 1999, storage).num_rows == 0


def _two_tile_catalog(tmp_path: Path) -> StorageConfig:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_B], YEAR, CFG, storage, MODEL)
    for t, seed in ((T_A, 1), (T_B, 2)):
        publish_tile(_write_emb(tmp_path, t, _embedding(t, seed)), YEAR, CFG, storage, MODEL)
    update_catalog(storage.output_uri, YEAR, storage)
    update_catalog(storage.output_uri, YEAR - 1, storage)  # a second year, no tiles
    return storage


def _hrefs(d: dict[str, Any]) -> list[str]:
    return [link["href"] for link in d.get("links", [])] + [
        a["href"] for a in d.get("assets", {}).values()
    ]


def test_catalog_is_self_contained_and_validates_offline(tmp_path: Path) -> None:
    storage = _two_tile_catalog(tmp_path)
    # catalogue + 2 collections + 2 items, against the STAC core and extension JSON schemas
    assert validate_catalog(storage.output_uri, storage) == 5
    files = sorted((Path(storage.output_uri) / "catalog").rglob("*.json"))
    assert len(files) == 5
    for f in files:
        d = json.loads(f.read_text())
        assert all(h.startswith(("./", "../")) for h in _hrefs(d)), f
        assert "self" not in [link["rel"] for link in d["links"]]
    # pystac's own whole-tree validation agrees (it needs the local validator registered:
    # validate_all has no validator argument)
    cat = pystac.Catalog.from_file(str(Path(storage.output_uri) / "catalog" / "catalog.json"))
    assert cat.catalog_type == pystac.CatalogType.SELF_CONTAINED
    validator = local_stac_validator()
    for obj in [cat, *cat.get_children(), *cat.get_items(recursive=True)]:
        assert obj.validate(validator=validator)
    # the extension schemas really are applied: a bad proj:shape fails
    item_file = next(f for f in files if "/items/" in f.as_posix())
    item = json.loads(item_file.read_text())
    item["properties"]["proj:shape"] = "256 x 256"
    with pytest.raises(STACValidationError, match="projection"):
        validate_dict(item, validator=validator)
    # and an absolute href is refused
    item = json.loads(item_file.read_text())
    item["assets"]["scales"]["href"] = str(tmp_path / "x")
    item_file.write_text(json.dumps(item))
    with pytest.raises(DataError, match="relative"):
        validate_catalog(storage.output_uri, storage)


def _read_all(catalog_href: str) -> dict[str, pystac.Item]:
    cat = pystac.Catalog.from_file(catalog_href)
    return {i.id: i for i in cat.get_items(recursive=True)}


def test_catalog_reads_after_copy_and_over_http(tmp_path: Path) -> None:
    storage = _two_tile_catalog(tmp_path / "build")
    copy = tmp_path / "elsewhere" / "copied-out"
    shutil.copytree(storage.output_uri, copy)
    shutil.rmtree(storage.output_uri)  # nothing may point back to the original

    items = _read_all(str(copy / "catalog" / "catalog.json"))
    assert sorted(items) == sorted([T_A.id, T_B.id])
    href = items[T_A.id].assets["embeddings"].get_absolute_href()
    assert href == str(copy / f"{YEAR}.zarr" / "utm31" / "embeddings")
    assert zarr.open_array(href, mode="r").shape[-1] == 128
    assert validate_catalog(str(copy), StorageConfig(output_uri=str(copy))) == 5

    handler = functools.partial(_QuietHandler, directory=str(copy))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        items = _read_all(f"{base}/catalog/catalog.json")
        assert sorted(items) == sorted([T_A.id, T_B.id])
        href = items[T_B.id].assets["scales"].get_absolute_href()
        assert href == f"{base}/{YEAR}.zarr/utm31/scales"
        with urllib.request.urlopen(f"{href}/zarr.json") as r:
            assert json.loads(r.read())["data_type"] == "float32"
        col = pystac.Collection.from_file(f"{base}/catalog/{YEAR}/collection.json")
        store = col.assets["zarr"].get_absolute_href()
        assert store == f"{base}/{YEAR}.zarr"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_stac_items_say_how_the_tile_was_embedded(tmp_path: Path) -> None:
    """The coverage rule and the inference mode of a tile's record are item properties
    (absent when the record has none, as for tiles embedded before they were recorded)."""
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A, T_B], YEAR, CFG, storage, MODEL)
    emb = _write_emb(tmp_path, T_A, _embedding(T_A, 1))
    zarr.open_group(emb.uri, mode="r+").attrs.update(
        {"coverage_rule": "v1.0-reference;min_valid_s2=0;min_valid_s1=0", "inference": "int8-dynamic"})
    publish_tile(emb, YEAR, CFG, storage, MODEL)
    ref = update_catalog(storage.output_uri, YEAR, storage)
    col = pystac.Collection.from_file(ref.collection_uri)
    (item,) = [pystac.Item.from_file(link.get_absolute_href()) for link in col.get_item_links()]
    assert item.properties["tessera:coverage_rule"] == "v1.0-reference;min_valid_s2=0;min_valid_s1=0"
    assert item.properties["tessera:inference"] == "int8-dynamic"
    assert validate_catalog(storage.output_uri, storage) >= 1

    storage2 = _storage(tmp_path, "out2")
    prepare_zone_stores([T_B], YEAR, CFG, storage2, MODEL)
    publish_tile(_write_emb(tmp_path, T_B, _embedding(T_B, 2)), YEAR, CFG, storage2, MODEL)
    col = pystac.Collection.from_file(update_catalog(storage2.output_uri, YEAR, storage2).collection_uri)
    (item,) = [pystac.Item.from_file(link.get_absolute_href()) for link in col.get_item_links()]
    assert "tessera:coverage_rule" not in item.properties
    assert "tessera:inference" not in item.properties
