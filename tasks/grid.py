"""The tile grid: regions -> tiles on the 10 m grid of each UTM zone.

Every UTM zone has one pixel grid: 10 m pixels whose edges sit on multiples of 10 m in the
zone's easting/northing, grouped into 256 x 256 pixel shards whose edges sit on multiples of
2,560 m. Tiles are squares of ``size_px`` pixels (a multiple of 256) aligned to multiples of
their own size, so a tile is a whole number of shards and publishing never touches a shard
that another tile owns.

A region that crosses zone boundaries gets tiles in each zone it touches. Following TESSERA's
"native UTM" rule, a pixel belongs to the zone whose 6-degree longitude band holds its centre
(and to the hemisphere of its centre's latitude), so each pixel of the region is covered once.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import shapely
from pydantic import BaseModel, ConfigDict, Field
from pyproj import CRS, Geod, Transformer
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

PIXEL_M = 10.0
"""Ground sampling distance of the grid, metres."""
SHARD_PX = 256
"""Pixels per shard side in the published zone stores (2.56 km)."""
SHARD_M = SHARD_PX * PIXEL_M


class Tile(BaseModel):
    """One square tile of the zone grid.

    ``x0``/``y0`` are the easting of the left edge and the northing of the top edge, metres,
    both multiples of ``size_px * 10``.
    """

    model_config = ConfigDict(frozen=True)

    zone: int = Field(ge=1, le=60, description="UTM zone number.")
    south: bool = Field(description="True for the southern hemisphere (EPSG:327zz).")
    x0: int = Field(description="Easting of the left edge, metres.")
    y0: int = Field(description="Northing of the top edge, metres.")
    size_px: int = Field(ge=SHARD_PX, description="Tile side in pixels, a multiple of 256.")

    @property
    def id(self) -> str:
        """Stable, human-readable id, e.g. ``31N-E0302080-N5785600-256``."""
        hemi = "S" if self.south else "N"
        return f"{self.zone:02d}{hemi}-E{self.x0:07d}-N{self.y0:07d}-{self.size_px}"

    @classmethod
    def from_id(cls, tile_id: str) -> Tile:
        """Parse an id made by :attr:`id`."""
        try:
            zh, e, n, size = tile_id.split("-")
            return cls(
                zone=int(zh[:2]),
                south=zh[2] == "S",
                x0=int(e[1:]),
                y0=int(n[1:]),
                size_px=int(size),
            )
        except (ValueError, IndexError) as exc:
            raise ValueError(
                f"Expected a tile id like '31N-E0302080-N5785600-256'. Got {tile_id!r}."
            ) from exc

    @property
    def epsg(self) -> int:
        return (32700 if self.south else 32600) + self.zone

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    @property
    def width(self) -> int:
        return self.size_px

    @property
    def height(self) -> int:
        return self.size_px

    @property
    def x1(self) -> int:
        return self.x0 + int(self.size_px * PIXEL_M)

    @property
    def y1(self) -> int:
        """Northing of the bottom edge."""
        return self.y0 - int(self.size_px * PIXEL_M)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(min easting, min northing, max easting, max northing), metres."""
        return (float(self.x0), float(self.y1), float(self.x1), float(self.y0))

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL-style affine (a, b, c, d, e, f) as in ``spatial:transform``: [10, 0, x0, 0, -10, y0]."""
        return (PIXEL_M, 0.0, float(self.x0), 0.0, -PIXEL_M, float(self.y0))

    def eastings(self) -> np.ndarray:
        """Pixel-centre eastings, shape (W,)."""
        return self.x0 + PIXEL_M * (np.arange(self.width) + 0.5)

    def northings(self) -> np.ndarray:
        """Pixel-centre northings, shape (H,), descending."""
        return self.y0 - PIXEL_M * (np.arange(self.height) + 0.5)

    def __str__(self) -> str:
        return self.id


def zone_of_lon(lon: np.ndarray | float) -> np.ndarray:
    """UTM zone number (1..60) of each longitude (no Norway/Svalbard exceptions)."""
    z = np.floor((np.asarray(lon, dtype=np.float64) + 180.0) / 6.0).astype(np.int64) + 1
    return np.clip(z, 1, 60)


def utm_epsg(zone: int, south: bool) -> int:
    return (32700 if south else 32600) + zone


def _to_utm(zone: int, south: bool) -> Transformer:
    return Transformer.from_crs(CRS.from_epsg(4326), CRS.from_epsg(utm_epsg(zone, south)), always_xy=True)


def _to_lonlat(zone: int, south: bool) -> Transformer:
    return Transformer.from_crs(CRS.from_epsg(utm_epsg(zone, south)), CRS.from_epsg(4326), always_xy=True)


def zone_band(zone: int, south: bool) -> Polygon:
    """The lon/lat polygon of a zone's half (north or south of the equator)."""
    lon0 = -180.0 + 6.0 * (zone - 1)
    return box(lon0, -80.0, lon0 + 6.0, 0.0) if south else box(lon0, 0.0, lon0 + 6.0, 84.0)


def region_area_km2(geom: BaseGeometry) -> float:
    """Geodesic area of a lon/lat geometry on WGS84, km^2."""
    area, _ = Geod(ellps="WGS84").geometry_area_perimeter(geom)
    return abs(area) / 1e6


def zones_of(geom: BaseGeometry) -> list[tuple[int, bool]]:
    """The (zone, south) pairs whose bands intersect a lon/lat geometry, sorted."""
    minx, miny, maxx, maxy = geom.bounds
    out = []
    for zone in range(int(zone_of_lon(minx)), int(zone_of_lon(maxx)) + 1):
        for south in (False, True):
            part = geom.intersection(zone_band(zone, south))
            if not part.is_empty and part.area > 0:
                out.append((zone, south))
    return out


def plan_tiles(geom: BaseGeometry, size_px: int = SHARD_PX) -> list[Tile]:
    """Tiles of ``size_px`` pixels covering a lon/lat geometry, in every zone it touches.

    Args:
        geom: Region polygon in EPSG:4326 (lon, lat).
        size_px: Tile side in pixels; a multiple of 256.

    Returns:
        Tiles sorted by (zone, hemisphere, northing descending, easting), each intersecting
        the part of the region in its zone.
    """
    if size_px % SHARD_PX:
        raise ValueError(f"Expected tile size a multiple of {SHARD_PX} px. Got {size_px}.")
    step = int(size_px * PIXEL_M)
    tiles: list[Tile] = []
    for zone, south in zones_of(geom):
        part = geom.intersection(zone_band(zone, south))
        part = part.segmentize(0.01)  # densify so the projected outline follows the curve
        fwd = _to_utm(zone, south)
        proj = shapely.transform(part, lambda xy, f=fwd: np.column_stack(f.transform(xy[:, 0], xy[:, 1])))
        minx, miny, maxx, maxy = proj.bounds
        ix0, ix1 = math.floor(minx / step), math.ceil(maxx / step)
        iy0, iy1 = math.floor(miny / step), math.ceil(maxy / step)
        iys, ixs = np.meshgrid(np.arange(iy1, iy0, -1), np.arange(ix0, ix1), indexing="ij")
        iys, ixs = iys.ravel(), ixs.ravel()  # top edges north to south, then west to east
        cells = shapely.box(ixs * step, (iys - 1) * step, (ixs + 1) * step, iys * step)
        hit = shapely.intersects(proj, cells)
        tiles += [Tile(zone=zone, south=south, x0=int(x) * step, y0=int(y) * step, size_px=size_px)
                  for x, y in zip(ixs[hit], iys[hit], strict=True)]
    return tiles


class TileGeometry:
    """Lon/lat of a tile's pixel centres, computed once (vectorised)."""

    def __init__(self, tile: Tile) -> None:
        self.tile = tile

    @cached_property
    def lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        """(lon, lat) of every pixel centre, each shape (H, W)."""
        ee, nn = np.meshgrid(self.tile.eastings(), self.tile.northings())
        lon, lat = _to_lonlat(self.tile.zone, self.tile.south).transform(ee, nn)
        return np.asarray(lon), np.asarray(lat)


def native_mask(tile: Tile) -> np.ndarray:
    """Pixels of a tile whose centre lies in the tile's own zone band and hemisphere, bool (H, W).

    Tiles near a zone edge extend past it; the pixels beyond belong to the neighbouring zone
    (native-UTM rule) and are no-data here, so each place is published once per zone.
    """
    lon, lat = TileGeometry(tile).lonlat
    in_hemi = (lat < 0) if tile.south else (lat >= 0)
    return (zone_of_lon(lon) == tile.zone) & in_hemi


def region_mask(tile: Tile, geom: BaseGeometry) -> np.ndarray:
    """Pixels of a tile that belong to the region in this tile's zone, bool (H, W).

    A pixel belongs when its centre lies inside ``geom`` and inside the tile's zone band
    (native-UTM rule), so a pixel of the region is covered by exactly one zone.
    """
    lon, lat = TileGeometry(tile).lonlat
    inside = shapely.contains_xy(geom, lon, lat) | shapely.intersects_xy(geom.boundary, lon, lat)
    in_zone = zone_of_lon(lon) == tile.zone
    in_hemi = (lat < 0) if tile.south else (lat >= 0)
    return inside & in_zone & in_hemi
