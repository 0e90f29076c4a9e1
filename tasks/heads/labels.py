"""Labels in: points or polygons with a class or a value, from the common vector formats.

Formats, chosen by the file's suffix (no GDAL/geopandas needed):

- GeoParquet (``.parquet``, ``.geoparquet``): WKB geometry column named by the ``geo``
  metadata (GeoParquet 1.x), CRS from its PROJJSON (default OGC:CRS84).
- GeoPackage (``.gpkg``): the first features table (or ``layer``), read with ``sqlite3``;
  geometry blobs are the GeoPackage header + WKB; CRS from ``gpkg_spatial_ref_sys``.
- GeoJSON (``.geojson``, ``.json``): a FeatureCollection; CRS EPSG:4326 (RFC 7946) unless a
  legacy ``crs`` member names another.
- CSV (``.csv``): points from ``lon``/``lat`` columns (or ``longitude``/``latitude``, ``x``/``y``),
  in EPSG:4326 unless ``crs`` says otherwise.

Every geometry is reprojected to lon/lat (EPSG:4326, x = lon). A label set holds one kind of
geometry (points, or polygons and multipolygons) and one label type: text or integer
classes, or numeric values (regression). Errors name the file and the column or row.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely
from pyproj import CRS, Transformer

from tasks.config import StorageConfig
from tasks.errors import ConfigError, DataError
from tasks.storage import get_fs

__all__ = ["LabelSet", "Task", "check_counts", "labels_from_arrays", "read_labels"]

Task = Literal["classification", "regression"]
FORMATS = {".parquet": "parquet", ".geoparquet": "parquet", ".gpkg": "gpkg",
           ".geojson": "geojson", ".json": "geojson", ".csv": "csv"}
"""File suffix -> reader."""
_LON_NAMES = ("lon", "longitude", "x")
_LAT_NAMES = ("lat", "latitude", "y")


@dataclass(frozen=True)
class LabelSet:
    """Validated labels in lon/lat.

    Attributes:
        geometry: (N,) shapely geometries, EPSG:4326 (x = lon, y = lat).
        value: (N,) int64 class codes (index into ``classes``) or float64 values.
        polygon_id: (N,) int64 feature ids (the ``id_column``, else the row number).
        task: "classification" or "regression".
        classes: class names, code order (classification); () for regression.
        kind: "point" or "polygon".
        source: where the labels came from (a URI or a description).
    """

    geometry: np.ndarray
    value: np.ndarray
    polygon_id: np.ndarray
    task: Task
    classes: tuple[str, ...]
    kind: Literal["point", "polygon"]
    source: str

    def __len__(self) -> int:
        return int(self.geometry.shape[0])


@dataclass
class _Table:
    columns: dict[str, list[Any]]
    geometry: list[Any]  # shapely geometries (or None)
    crs: CRS


def read_labels(
    uri: str,
    column: str,
    storage: StorageConfig | None = None,
    task: Task | Literal["auto"] = "auto",
    id_column: str | None = None,
    crs: str | int | None = None,
    layer: str | None = None,
) -> LabelSet:
    """Read and validate a label file.

    Args:
        uri: Local path or ``s3://`` URI of a GeoParquet, GeoPackage, GeoJSON or CSV file.
        column: The label column (class or value).
        storage: Storage config for remote URIs.
        task: "classification", "regression", or "auto" (text and integers are classes,
            other numbers values).
        id_column: Column of feature (parcel) ids; default the row number.
        crs: CRS of the coordinates when the file does not say (CSV default EPSG:4326);
            overrides the file's own.
        layer: GeoPackage table (default the first features table).

    Raises:
        ConfigError: unknown format, column or id column (field ``label_column`` /
            ``id_column``).
        DataError: empty file, empty labels, mixed label or geometry types, invalid
            geometries.
    """
    storage = storage or StorageConfig()
    suffix = Path(uri.split("?")[0]).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise ConfigError("labels_uri", f"Expected one of {sorted(FORMATS)} as the file suffix. Got {uri!r}.")
    fs, path = get_fs(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError("labels_uri", f"Expected an existing label file. Got {uri!r} (not found).") from None
    if not data.strip():
        raise DataError(f"Expected at least one labelled feature in {uri}. Got an empty file.")
    table = {"parquet": _read_parquet, "gpkg": _read_gpkg, "geojson": _read_geojson,
             "csv": _read_csv}[fmt](data, uri, layer)
    if crs is not None:
        table.crs = CRS.from_user_input(crs)
    return _validate(table, uri, column, task, id_column)


def labels_from_arrays(
    geometry: Sequence[Any], value: Sequence[Any], source: str, crs: str | int = 4326,
    task: Task | Literal["auto"] = "auto", polygon_id: Sequence[int] | None = None,
) -> LabelSet:
    """A validated label set from in-memory geometries and labels (same checks as files)."""
    cols: dict[str, list[Any]] = {"label": list(value)}
    if polygon_id is not None:
        cols["id"] = list(polygon_id)
    table = _Table(cols, list(geometry), CRS.from_user_input(crs))
    return _validate(table, source, "label", task, "id" if polygon_id is not None else None)


def check_counts(labels: LabelSet, min_per_class: int, field: str = "min_polygons_per_class") -> None:
    """Raise when a class has fewer than ``min_per_class`` features (classification only).

    Raises:
        DataError: naming every class below the minimum, with its count.
    """
    if labels.task != "classification":
        if len(labels) < min_per_class:
            raise DataError(f"{field}: Expected at least {min_per_class} labelled features. "
                            f"Got {len(labels)} in {labels.source}.")
        return
    counts = np.bincount(labels.value, minlength=len(labels.classes))
    low = [f"{labels.classes[i]!r}: {int(c)}" for i, c in enumerate(counts) if c < min_per_class]
    if low:
        raise DataError(f"{field}: Expected at least {min_per_class} labelled features per class "
                        f"in {labels.source}. Got {', '.join(low)}.")


# --- validation ----------------------------------------------------------------------------


def _validate(t: _Table, uri: str, column: str, task: Task | Literal["auto"],
              id_column: str | None) -> LabelSet:
    n = len(t.geometry)
    if n == 0:
        raise DataError(f"Expected at least one labelled feature in {uri}. Got an empty file.")
    for field, name in (("label_column", column), ("id_column", id_column)):
        if name is not None and name not in t.columns:
            raise ConfigError(field, f"Expected a column of {uri}: one of {sorted(t.columns)}. "
                              f"Got {name!r}.")
    raw = t.columns[column]
    empty = [i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and np.isnan(v))
             or (isinstance(v, str) and not v.strip())]
    if empty:
        raise DataError(f"Expected a label in every row of column {column!r} of {uri}. Got "
                        f"{len(empty)} empty (rows {empty[:5]}).")
    missing = [i for i, g in enumerate(t.geometry) if g is None or g.is_empty]
    if missing:
        raise DataError(f"Expected a geometry in every row of {uri}. Got {len(missing)} "
                        f"empty (rows {missing[:5]}).")
    geoms = np.asarray(t.geometry, dtype=object)
    types = shapely.get_type_id(geoms)
    point = np.isin(types, (0, 4))  # Point, MultiPoint
    poly = np.isin(types, (3, 6))  # Polygon, MultiPolygon
    if not (point | poly).all():
        bad = int(np.flatnonzero(~(point | poly))[0])
        raise DataError(f"Expected points or polygons in {uri}. Got a "
                        f"{shapely.get_type_id(geoms[bad])} geometry type id "
                        f"({geoms[bad].geom_type}) in row {bad}.")
    if point.any() and poly.any():
        raise DataError(f"Expected one geometry type in {uri} (points or polygons). Got "
                        f"{int(point.sum())} points and {int(poly.sum())} polygons.")
    invalid = np.flatnonzero(~shapely.is_valid(geoms))
    if invalid.size:
        raise DataError(f"Expected valid geometries in {uri}. Got {invalid.size} invalid "
                        f"(rows {invalid[:5].tolist()}: {shapely.is_valid_reason(geoms[invalid[0]])}).")
    geoms = _to_lonlat(geoms, t.crs)
    is_text = [isinstance(v, str) for v in raw]
    if any(is_text) and not all(is_text):
        i = is_text.index(not is_text[0])
        raise DataError(f"Expected one type in column {column!r} of {uri}. Got text and numbers "
                        f"(row 0: {raw[0]!r}, row {i}: {raw[i]!r}).")
    if all(is_text):
        kind: Task = "classification"
    else:
        arr = np.asarray(raw, dtype=np.float64)
        integral = bool(np.all(arr == np.round(arr))) and not any(isinstance(v, float) for v in raw)
        kind = "classification" if integral else "regression"
    if task != "auto":
        if task == "regression" and all(is_text):
            raise DataError(f"Expected numbers in column {column!r} of {uri} for regression. "
                            f"Got text (row 0: {raw[0]!r}).")
        kind = task
    if kind == "classification":
        names = [str(v) if isinstance(v, str) else str(int(v)) for v in raw]
        classes = tuple(sorted(set(names), key=lambda s: (not s.lstrip("-").isdigit(),
                                                          int(s) if s.lstrip("-").isdigit() else 0, s)))
        code = {c: i for i, c in enumerate(classes)}
        value = np.asarray([code[s] for s in names], np.int64)
    else:
        classes = ()
        value = np.asarray(raw, np.float64)
    if id_column is not None:
        try:
            pid = np.asarray(t.columns[id_column], np.int64)
        except (TypeError, ValueError):
            raise DataError(f"Expected integer ids in column {id_column!r} of {uri}. Got "
                            f"{t.columns[id_column][:3]!r}.") from None
    else:
        pid = np.arange(n, dtype=np.int64)
    return LabelSet(geometry=geoms, value=value, polygon_id=pid, task=kind, classes=classes,
                    kind="point" if point.all() else "polygon", source=uri)


def _to_lonlat(geoms: np.ndarray, crs: CRS) -> np.ndarray:
    wgs = CRS.from_epsg(4326)
    if crs == wgs or crs == CRS.from_user_input("OGC:CRS84"):
        return geoms
    tr = Transformer.from_crs(crs, wgs, always_xy=True)

    def fn(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, fn)


# --- readers -------------------------------------------------------------------------------


def _read_csv(data: bytes, uri: str, layer: str | None) -> _Table:
    import io

    import pyarrow.csv as pacsv

    try:
        tbl = pacsv.read_csv(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid for any bad CSV
        raise DataError(f"Expected a CSV file with a header row at {uri}. Got: {exc}") from None
    cols = {name: tbl.column(name).to_pylist() for name in tbl.column_names}
    lower = {k.lower(): k for k in cols}
    lon = next((lower[n] for n in _LON_NAMES if n in lower), None)
    lat = next((lower[n] for n in _LAT_NAMES if n in lower), None)
    if lon is None or lat is None:
        raise ConfigError("labels_uri", f"Expected lon/lat columns (one of {_LON_NAMES} and one of "
                          f"{_LAT_NAMES}) in {uri}. Got columns {sorted(cols)}.")
    try:
        x = np.asarray(cols[lon], np.float64)
        y = np.asarray(cols[lat], np.float64)
    except (TypeError, ValueError):
        raise DataError(f"Expected numbers in columns {lon!r}/{lat!r} of {uri}.") from None
    geoms = list(shapely.points(x, y)) if len(x) else []
    return _Table(cols, geoms, CRS.from_epsg(4326))


def _read_geojson(data: bytes, uri: str, layer: str | None) -> _Table:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DataError(f"Expected GeoJSON at {uri}. Got invalid JSON ({exc}).") from None
    feats = obj.get("features") if isinstance(obj, dict) else None
    if feats is None:
        raise DataError(f"Expected a GeoJSON FeatureCollection at {uri}. Got "
                        f"{obj.get('type') if isinstance(obj, dict) else type(obj).__name__}.")
    names: list[str] = []
    for f in feats:
        for k in (f.get("properties") or {}):
            if k not in names:
                names.append(k)
    cols = {k: [(f.get("properties") or {}).get(k) for f in feats] for k in names}
    if feats and all("id" in f for f in feats) and "id" not in cols:
        cols["id"] = [f["id"] for f in feats]
    geoms = [shapely.geometry.shape(f["geometry"]) if f.get("geometry") else None for f in feats]
    crs = CRS.from_epsg(4326)
    legacy = (obj.get("crs") or {}).get("properties", {}).get("name")
    if legacy:
        crs = CRS.from_user_input(legacy)
    return _Table(cols, geoms, crs)


def _read_parquet(data: bytes, uri: str, layer: str | None) -> _Table:
    import io

    import pyarrow.parquet as pq

    try:
        tbl = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"Expected a (Geo)Parquet file at {uri}. Got: {exc}") from None
    meta = json.loads((tbl.schema.metadata or {}).get(b"geo", b"{}"))
    gcol = meta.get("primary_column") or ("geometry" if "geometry" in tbl.column_names else None)
    if gcol is None or gcol not in tbl.column_names:
        raise DataError(f"Expected a GeoParquet geometry column in {uri}. Got columns "
                        f"{tbl.column_names} and no 'geo' metadata.")
    info = (meta.get("columns") or {}).get(gcol, {})
    if info.get("encoding", "WKB").upper() != "WKB":
        raise DataError(f"Expected WKB geometry encoding in {uri}. Got {info.get('encoding')!r}.")
    crs_json = info.get("crs", "OGC:CRS84")
    crs = CRS.from_user_input("OGC:CRS84") if crs_json is None else (
        CRS.from_json_dict(crs_json) if isinstance(crs_json, dict) else CRS.from_user_input(crs_json))
    wkb = tbl.column(gcol).to_pylist()
    geoms = [shapely.from_wkb(b) if b is not None else None for b in wkb]
    cols = {n: tbl.column(n).to_pylist() for n in tbl.column_names if n != gcol}
    return _Table(cols, geoms, crs)


def _gpkg_wkb(blob: bytes) -> bytes:
    """The WKB inside a GeoPackage geometry blob (header: 'GP', version, flags, srs, envelope)."""
    if blob[:2] != b"GP":
        return blob
    env = (blob[3] >> 1) & 0b111
    size = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}.get(env, 0)
    return blob[8 + size:]


def _read_gpkg(data: bytes, uri: str, layer: str | None) -> _Table:
    with tempfile.NamedTemporaryFile(suffix=".gpkg") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            con = sqlite3.connect(f"file:{tmp.name}?mode=ro", uri=True)
            try:
                return _gpkg_table(con, uri, layer)
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"Expected a GeoPackage (SQLite) at {uri}. Got: {exc}") from None


def _gpkg_table(con: sqlite3.Connection, uri: str, layer: str | None) -> _Table:
    rows = con.execute("SELECT c.table_name, g.column_name, g.srs_id FROM gpkg_contents c "
                       "JOIN gpkg_geometry_columns g ON g.table_name = c.table_name "
                       "WHERE c.data_type = 'features' ORDER BY c.table_name").fetchall()
    if not rows:
        raise DataError(f"Expected a features table in the GeoPackage {uri}. Got none.")
    if layer is not None:
        rows = [r for r in rows if r[0] == layer]
        if not rows:
            raise ConfigError("layer", f"Expected a features table of {uri}. Got {layer!r}.")
    table, gcol, srs_id = rows[0]
    srs = con.execute("SELECT organization, organization_coordsys_id, definition FROM "
                      "gpkg_spatial_ref_sys WHERE srs_id = ?", (srs_id,)).fetchone()
    crs = CRS.from_epsg(4326)
    if srs is not None:
        org, code, definition = srs
        if org and str(org).upper() == "EPSG" and int(code) > 0:
            crs = CRS.from_epsg(int(code))
        elif definition and definition != "undefined":
            crs = CRS.from_user_input(definition)
    cur = con.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - the name comes from gpkg_contents
    names = [d[0] for d in cur.description]
    records = cur.fetchall()
    gi = names.index(gcol)
    geoms = [shapely.from_wkb(_gpkg_wkb(r[gi])) if r[gi] is not None else None for r in records]
    cols = {n: [r[i] for r in records] for i, n in enumerate(names) if i != gi}
    return _Table(cols, geoms, crs)
