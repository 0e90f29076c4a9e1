"""Zone grids and their coordinates: names, extents, CF grid mapping.

A zone grid (:class:`ZoneExtent`) is the union of its tiles snapped outward to whole 256-px
shards, in the zone's UTM CRS; a southern zone is its own group ``utm{zone:02d}s``. The
coordinate arrays (``easting``/``northing`` pixel centres, uncompressed, one chunk) and the
``spatial_ref`` grid-mapping variable are written from it (:func:`_write_coords`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict
from pyproj import CRS

from tasks.errors import DataError
from tasks.grid import PIXEL_M, SHARD_PX, Tile
from tasks.storage import join


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
