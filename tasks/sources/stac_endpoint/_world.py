"""The catalogue the local STAC endpoint serves: granules, items and their COGs.

Each UTM zone is cut into square granules on a lattice (``granule_px`` wide, origins every
``granule_step_px``, so neighbours overlap like MGRS tiles). A granule's item on a date holds
COGs written from :class:`~tasks.sources.synthetic.SyntheticSource` for exactly the
granule's pixels, so any tile read back from the granules equals the synthetic source's tile.

Two flavours, as the real catalogues publish Sentinel-2 L2A:

- ``pc`` (Planetary Computer): asset keys ``B02`` ... ``SCL``; DN as in the product, i.e. with
  the +1000 offset wherever ``s2:processing_baseline`` >= 04.00; hrefs on Azure blob hosts,
  to be signed; Sentinel-1 RTC items (``vv``, ``vh``, linear power, ``sat:orbit_state``).
- ``es`` (Earth Search): asset keys ``blue`` ... ``scl``; the offset removed from the COGs
  (``earthsearch:boa_offset_applied: true``); plain hrefs on this server.

Item datetimes: S2 10:30:24 UTC; S1 ascending 17:40:12, descending 05:50:12 UTC.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.grid import PIXEL_M, Tile, zone_of_lon
from tasks.sources._stac_config import ASSET_NAMES, S1_ASSETS
from tasks.sources.base import BASELINE_0400_START, S1_BANDS, S2_BANDS, S2_DN_OFFSET
from tasks.sources.stac_endpoint._config import EndpointConfig
from tasks.sources.synthetic import SyntheticSource

__all__ = ["BLOB_HOSTS", "Granule", "World"]

BLOB_HOSTS: dict[str, tuple[str, str]] = {
    "s2": ("sentinel2l2a01", "sentinel2-l2"),
    "s1": ("sentinel1euwestrtc", "sentinel1-grd-rtc"),
}
"""(storage account, container) of Planetary Computer's S2 L2A and S1 RTC blobs."""
BANDS_20M = ("B05", "B06", "B07", "B8A", "B11", "B12", "SCL")
"""Bands delivered at 20 m in the real L2A product (ESA product specification)."""
S1_NODATA = -32768.0
"""No-data value of Planetary Computer's S1 RTC COGs."""
_HOURS = {"s2": "10:30:24", "ascending": "17:40:12", "descending": "05:50:12"}


@dataclass(frozen=True)
class Granule:
    """One granule of the lattice of a UTM zone."""

    zone: int
    south: bool
    i: int
    j: int

    @property
    def id(self) -> str:
        return f"{self.zone:02d}{'S' if self.south else 'N'}_{self.i}_{self.j}"

    @classmethod
    def from_id(cls, gid: str) -> Granule:
        zh, i, j = gid.split("_")
        return cls(int(zh[:2]), zh[2] == "S", int(i), int(j))


class World:
    """Items and COGs of the synthetic Earth under a granule layout (thread-safe)."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.source = SyntheticSource(config.world)
        self._cache: OrderedDict[tuple[str, ...], dict[str, bytes]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._rendering: dict[tuple[str, ...], threading.Lock] = {}
        self.rendered = 0

    # --- layout ------------------------------------------------------------------------------
    def _step_m(self) -> float:
        return self.config.granule_step_px * PIXEL_M

    def granule_tile(self, g: Granule) -> Tile:
        """The granule's pixels as a (non shard-aligned) tile of the zone grid."""
        ox, oy = self.config.granule_origin_m
        size = self.config.granule_px
        x0 = int(ox + g.i * self._step_m())
        y0 = int(oy + g.j * self._step_m() + size * PIXEL_M)
        return Tile(zone=g.zone, south=g.south, x0=x0, y0=y0, size_px=size)

    def granules(self, bbox: tuple[float, float, float, float]) -> list[Granule]:
        """Granules meeting a lon/lat bbox, in every zone and hemisphere it touches."""
        from pyproj import Transformer

        minlon, minlat, maxlon, maxlat = bbox
        out = []
        zones = range(int(zone_of_lon(minlon)), int(zone_of_lon(maxlon)) + 1)
        hemis = [s for s in (False, True) if (maxlat >= 0 if not s else minlat < 0)]
        size_m = self.config.granule_px * PIXEL_M
        ox, oy = self.config.granule_origin_m
        step = self._step_m()
        for zone in zones:
            for south in hemis:
                epsg = (32700 if south else 32600) + zone
                tr = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
                x0, y0, x1, y1 = tr.transform_bounds(minlon, minlat, maxlon, maxlat,
                                                     densify_pts=21)
                i0 = int(np.floor((x0 - ox - size_m) / step)) + 1
                i1 = int(np.ceil((x1 - ox) / step)) - 1
                j0 = int(np.floor((y0 - oy - size_m) / step)) + 1
                j1 = int(np.ceil((y1 - oy) / step)) - 1
                out += [Granule(zone, south, i, j) for i in range(i0, i1 + 1)
                        for j in range(j0, j1 + 1)]
        return out

    def footprint(self, g: Granule) -> dict[str, Any]:
        """The granule's outline as a GeoJSON polygon in lon/lat."""
        from pyproj import Transformer

        t = self.granule_tile(g)
        x0, y1, x1, y0 = t.bounds
        xs = [x0, x1, x1, x0, x0]
        ys = [y0, y0, y1, y1, y0]
        lon, lat = Transformer.from_crs(t.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
        return {"type": "Polygon",
                "coordinates": [[[round(a, 7), round(b, 7)] for a, b in zip(lon, lat, strict=True)]]}

    def dates(self, g: Granule, kind: str, start: np.datetime64, end: np.datetime64
              ) -> np.ndarray:
        """Acquisition dates of a granule (kind 's2', 'ascending' or 'descending') in [start, end]."""
        tile = self.granule_tile(g)
        out = []
        for year in range(int(str(start)[:4]), int(str(end)[:4]) + 1):
            d = (self.source.s2_dates(tile, year) if kind == "s2"
                 else self.source.s1_dates(tile, year, kind))  # type: ignore[arg-type]
            out.append(d)
        days = np.concatenate(out) if out else np.array([], "datetime64[D]")
        days = days[(days >= start) & (days <= end)]
        if self.config.months:
            months = days.astype("datetime64[M]").astype(np.int64) % 12 + 1
            days = days[np.isin(months, self.config.months)]
        return days

    def baseline(self, date: np.datetime64) -> str:
        """The item's processing baseline: 04.00 from 2022-01-25, 05.00 for reprocessed
        months before it, else 03.01."""
        if date >= np.datetime64(BASELINE_0400_START):
            return "04.00"
        month = int(date.astype("datetime64[M]").astype(np.int64) % 12 + 1)
        before_2022 = date < np.datetime64("2022-01-01")
        return "05.00" if before_2022 and month in self.config.reprocessed_months else "03.01"

    def cloud_cover(self, g: Granule, date: str) -> float:
        h = hashlib.sha256(f"{self.config.world.seed}|{g.id}|{date}".encode()).digest()
        return round(int.from_bytes(h[:4], "little") / 2**32 * 100.0, 2)

    # --- items -------------------------------------------------------------------------------
    def item(self, flavour: str, kind: str, g: Granule, date: np.datetime64, base: str
             ) -> dict[str, Any]:
        """The STAC item of granule ``g`` on ``date`` (kind 's2', 'ascending' or 'descending')."""
        day = str(date)
        ymd = day.replace("-", "")
        tile = self.granule_tile(g)
        props: dict[str, Any] = {
            "datetime": f"{day}T{_HOURS[kind]}Z",
            "proj:epsg": tile.epsg,
            "proj:code": tile.crs,
        }
        if kind == "s2":
            plat = "sentinel-2a" if int(date.astype(np.int64)) % 2 else "sentinel-2b"
            iid = (f"S2{plat[-1].upper()}_MSIL2A_{ymd}T103024_G{g.id}" if flavour == "pc"
                   else f"S2{plat[-1].upper()}_{g.id}_{ymd}_0_L2A")
            baseline = self.baseline(date)
            props |= {"platform": plat, "constellation": "sentinel-2",
                      "eo:cloud_cover": self.cloud_cover(g, day),
                      "s2:processing_baseline": baseline, "s2:mgrs_tile": g.id}
            if flavour == "es":
                props["earthsearch:boa_offset_applied"] = float(baseline) >= 4.0
            names = ASSET_NAMES["planetary-computer" if flavour == "pc" else "earth-search"]
            keys = [names[b] for b in (*S2_BANDS, "SCL")]
            collection = "sentinel-2-l2a"
            if flavour == "pc":
                acct, cont = BLOB_HOSTS["s2"]
                root = f"https://{acct}.blob.core.windows.net/{cont}/{g.id}/{day}/{iid}"
            else:
                root = f"{base}/cogs/sentinel-s2-l2a-cogs/{g.id}/{day}/{iid}"
        else:
            iid = f"S1A_IW_GRDH_1SDV_{ymd}T{_HOURS[kind].replace(':', '')}_{kind[:3].upper()}_G{g.id}_rtc"
            props |= {"platform": "sentinel-1a", "constellation": "sentinel-1",
                      "sat:orbit_state": kind, "sar:instrument_mode": "IW",
                      "sar:polarizations": list(S1_BANDS), "sar:product_type": "GRD"}
            keys = list(S1_ASSETS.values())
            collection = "sentinel-1-rtc"
            acct, cont = BLOB_HOSTS["s1"]
            root = f"https://{acct}.blob.core.windows.net/{cont}/{g.id}/{day}/{kind}/{iid}"
        assets = {k: {"href": f"{root}/{k}.tif", "roles": ["data"],
                      "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
                  for k in keys}
        return {
            "type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": collection,
            "geometry": self.footprint(g), "bbox": _bbox(self.footprint(g)),
            "properties": props, "assets": assets, "links": [],
            "stac_extensions": [],
        }

    # --- COGs --------------------------------------------------------------------------------
    def cog(self, flavour: str, kind: str, gid: str, day: str, asset: str) -> bytes | None:
        """The COG bytes of one asset, or None if there is no such asset or date.

        A granule's assets are rendered a calendar month at a time (the synthetic Earth's
        per-tile setup is then paid once per month) and kept, least recently used out.
        """
        key = (flavour, kind, gid, day[:7])
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit.get(f"{day}/{asset}")
            lock = self._rendering.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                hit = self._cache.get(key)
            if hit is None:
                hit = self._render_month(flavour, kind, Granule.from_id(gid), day[:7])
                with self._lock:
                    self._cache[key] = hit
                    self._cache_bytes += sum(len(b) for b in hit.values())
                    self.rendered += 1
                    while self._cache_bytes > self.config.cache_mb * 2**20 and len(self._cache) > 1:
                        _, old = self._cache.popitem(last=False)
                        self._cache_bytes -= sum(len(b) for b in old.values())
        return hit.get(f"{day}/{asset}")

    def _render_month(self, flavour: str, kind: str, g: Granule, month: str) -> dict[str, bytes]:
        m = np.datetime64(month, "M")
        start, end = m.astype("datetime64[D]"), (m + 1).astype("datetime64[D]") - 1
        dates = self.dates(g, kind, start, end)
        tile = self.granule_tile(g)
        out: dict[str, bytes] = {}
        if kind != "s2":
            vals = self.source.read_s1(tile, dates, kind).values  # type: ignore[arg-type]
            for t, d in enumerate(dates):
                for k, b in enumerate(S1_BANDS):
                    out[f"{d}/{S1_ASSETS[b]}"] = self._encode(vals[t, ..., k], tile, "float32",
                                                              S1_NODATA, 1)
            return out
        stack = self.source.read_s2(tile, dates)
        names = ASSET_NAMES["planetary-computer" if flavour == "pc" else "earth-search"]
        for t, d in enumerate(dates):
            dn = stack.bands[t].astype(np.int64)  # (G, G, 10), offset by date as synthetic does
            baseline = float(self.baseline(d))
            if baseline >= 4.0 and int(stack.offset[t]) == 0:  # reprocessed: product has +1000
                dn = np.where(dn > 0, np.minimum(dn + S2_DN_OFFSET, 65535), 0)
            if flavour == "es" and baseline >= 4.0:  # Earth Search removed the offset
                dn = np.maximum(dn - S2_DN_OFFSET, 0)
            for k, b in enumerate((*S2_BANDS, "SCL")):
                arr = stack.scl[t] if b == "SCL" else dn[..., k]
                step = 2 if (self.config.native_20m and b in BANDS_20M) else 1
                if step == 2:
                    arr = (arr[::2, ::2] if b == "SCL"
                           else np.round(arr.reshape(arr.shape[0] // 2, 2, arr.shape[1] // 2, 2)
                                         .mean(axis=(1, 3))))
                dtype = "uint8" if b == "SCL" else "uint16"
                out[f"{d}/{names[b]}"] = self._encode(arr, tile, dtype, 0, step)
        return out

    def _encode(self, arr: np.ndarray, tile: Tile, dtype: str, nodata: float, step: int) -> bytes:
        """A single-band COG (deflate, tiled ``block_px``) of ``arr`` on the granule's grid."""
        import rasterio
        from rasterio.io import MemoryFile

        res = PIXEL_M * step
        transform = rasterio.Affine(res, 0.0, tile.x0, 0.0, -res, tile.y0)
        h, w = arr.shape
        with MemoryFile() as mf:
            with mf.open(driver="COG", width=w, height=h, count=1, dtype=dtype, crs=tile.crs,
                         transform=transform, nodata=nodata, blocksize=self.config.block_px,
                         compress="deflate", predictor=3 if dtype == "float32" else 2,
                         overviews="auto") as dst:
                dst.write(np.asarray(arr).astype(dtype), 1)
            return bytes(mf.read())


def _bbox(geom: dict[str, Any]) -> list[float]:
    pts = np.asarray(geom["coordinates"][0])
    return [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()),
            float(pts[:, 1].max())]

