"""A tiny published store whose embeddings encode a known class map, and label files of it.

Two 256-px tiles of zone 31N (``T_A`` and ``T_B`` of the publish tests, a gap between them).
Parcels are 32 x 32 px squares of the zone grid; a parcel's class is ``(i + 2 j) % 3`` of its
parcel indices; a pixel's embedding is its class's mean vector plus noise, and 5 % of pixels
are no data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyproj import Transformer

from tasks.config import StorageConfig
from tasks.grid import PIXEL_M, Tile
from tasks.publish import prepare_zone_stores, publish_tile
from tests.tasks.test_publish import CFG, MODEL, T_A, T_B, YEAR, _write_emb

PARCEL_PX = 32
N_CLASSES = 3
TILES = (T_A, T_B)


def parcel_class(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return (i + 2 * j) % N_CLASSES


def tile_truth(tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """(class, parcel id) of every pixel of a tile, from absolute grid indices."""
    col = tile.x0 // int(PIXEL_M) + np.arange(tile.width)
    row = -(tile.y0 // int(PIXEL_M)) + np.arange(tile.height)
    i = col // PARCEL_PX
    j = row // PARCEL_PX
    jj, ii = np.meshgrid(j, i, indexing="ij")
    return parcel_class(ii, jj), (jj * 100_000 + ii)


def fake_embedding(tile: Tile, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(N_CLASSES, 128)).astype(np.float32)
    cls, _ = tile_truth(tile)
    e = means[cls] + rng.normal(scale=1.5, size=(tile.height, tile.width, 128)).astype(np.float32)
    e[rng.random((tile.height, tile.width)) < 0.05] = np.nan
    return e


def parcel_polygons(tile: Tile, n: int = 12) -> tuple[list, list[int], list[int]]:
    """The first ``n`` whole parcels of a tile as UTM polygons, their classes and ids."""
    from shapely.geometry import box

    geoms, classes, ids = [], [], []
    for k in range(n):
        i = tile.x0 // int(PIXEL_M) // PARCEL_PX + k % 8
        j = -(tile.y0 // int(PIXEL_M)) // PARCEL_PX + k // 8
        x0 = i * PARCEL_PX * PIXEL_M
        y0 = -j * PARCEL_PX * PIXEL_M
        geoms.append(box(x0 + 1, y0 - PARCEL_PX * PIXEL_M + 1, x0 + PARCEL_PX * PIXEL_M - 1, y0 - 1))
        classes.append(int(parcel_class(np.int64(i), np.int64(j))))
        ids.append(int(j * 100_000 + i))
    return geoms, classes, ids


@pytest.fixture(scope="session")
def fake_store(tmp_path_factory: pytest.TempPathFactory) -> StorageConfig:
    root = tmp_path_factory.mktemp("heads-store")
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    prepare_zone_stores(list(TILES), YEAR, CFG, storage, MODEL)
    for s, t in enumerate(TILES):
        publish_tile(_write_emb(root, t, fake_embedding(t, s + 1)), YEAR, CFG, storage, MODEL)
    return storage


def to_lonlat(geoms: list) -> list:
    import shapely

    tr = Transformer.from_crs(32631, 4326, always_xy=True)

    def fn(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return list(shapely.transform(np.asarray(geoms, dtype=object), fn))


def write_gpkg(path: Path, geoms: list, props: dict[str, list], epsg: int) -> None:
    """A minimal GeoPackage (features table, SRS, GP header + WKB geometries) via sqlite3."""
    import sqlite3
    import struct

    import shapely

    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT, srs_id INTEGER PRIMARY KEY,
            organization TEXT, organization_coordsys_id INTEGER, definition TEXT, description TEXT);
        CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT, identifier TEXT,
            description TEXT, last_change TEXT, min_x REAL, min_y REAL, max_x REAL, max_y REAL,
            srs_id INTEGER);
        CREATE TABLE gpkg_geometry_columns (table_name TEXT, column_name TEXT,
            geometry_type_name TEXT, srs_id INTEGER, z INTEGER, m INTEGER);
    """)
    con.execute("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, 'EPSG', ?, 'undefined', '')",
                (f"EPSG:{epsg}", epsg, epsg))
    con.execute("INSERT INTO gpkg_contents (table_name, data_type, srs_id) VALUES "
                "('parcels', 'features', ?)", (epsg,))
    con.execute("INSERT INTO gpkg_geometry_columns VALUES ('parcels', 'geom', 'GEOMETRY', ?, 0, 0)",
                (epsg,))
    cols = ", ".join(f'"{k}"' for k in props)
    con.execute(f"CREATE TABLE parcels (fid INTEGER PRIMARY KEY, geom BLOB, {cols})")
    for n, g in enumerate(geoms):
        minx, miny, maxx, maxy = g.bounds
        blob = b"GP" + bytes([0, 0b00000011]) + struct.pack("<i", epsg) + \
            struct.pack("<4d", minx, maxx, miny, maxy) + shapely.to_wkb(g)
        vals = [props[k][n] for k in props]
        con.execute(f"INSERT INTO parcels (geom, {cols}) VALUES (?{', ?' * len(vals)})", [blob, *vals])
    con.commit()
    con.close()
