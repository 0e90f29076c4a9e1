"""Sentinel-2 L2A and Sentinel-1 RTC from open STAC catalogues (Planetary Computer, Earth Search).

Implements :class:`~tasks.sources.base.SceneSource`:

- dates: a pystac-client item search per tile, year and collection (bbox, datetime range, an
  ``eo:cloud_cover`` query for S2, paged through ``next`` links), items kept only where their
  footprint meets the tile, reduced to unique UTC acquisition dates; S1 items are split by
  ``sat:orbit_state`` so ascending and descending stay apart;
- arrays: for every item of a date and every band asset, the tile's window of the COG, read
  with rasterio through our own range-request client (:mod:`tasks.sources._stac_http`: only
  the header and the tiles the window needs). An asset already on the tile's 10 m UTM grid is
  read as a plain window (exact values); any other grid (20 m bands, another UTM zone) is
  warped onto it with the band's resampling: nearest for SCL, bilinear for reflectance and
  backscatter;
- same-day items of neighbouring granules are mosaicked deterministically: per pixel, the
  first item in item-id order that has data there (SCL != 0 for S2; VV or VH > 0 for S1);
- S2 DN offset: each item's offset comes from its own properties: ``s2:processing_baseline``
  >= 04.00 means +1000 DN, unless the item (``earthsearch:boa_offset_applied``) or else the
  catalogue says its COGs have it removed. The offset is recorded per date, never
  subtracted here: d-pixel extraction removes it exactly once. A date whose items disagree is
  brought to offset 0 here (the carrying items' DN reduced once) and recorded as 0;
- signing: hrefs of catalogues that need it are signed with the ``planetary-computer``
  package (its SAS token endpoint set from ``source.stac.sas_url``; the optional subscription
  key from the environment or a Prefect Secret, never from config, never logged);
- every search answer and every window read is kept in the work root (``stac-responses/``)
  keyed without signatures, and :meth:`StacSource.prefetch` reads a whole tile before
  anything is written: a failure leaves no partial scenes and a re-run reads nothing.

Errors: :class:`StacPermanentError` (401/403, a missing asset or item field, a rejected
search) fails the tile at once; :class:`StacSourceError` otherwise (after the HTTP client's
own attempts), which the task's retry may clear.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import SecretStr

from tasks.credentials import BlockLoader, load_block_data
from tasks.errors import ConfigError, TileError
from tasks.grid import PIXEL_M, Tile
from tasks.sources._stac_config import ASSET_NAMES, S1_ASSETS, Catalogue, StacConfig
from tasks.sources._stac_config import PC_SAS as _PC_SAS
from tasks.sources._stac_http import FetchError, RangeClient, open_cog, redact_url
from tasks.sources.base import (
    BASELINE_0400_START,
    S1_BANDS,
    S2_BANDS,
    S2_DN_OFFSET,
    Orbit,
    S1Stack,
    S2Stack,
)
from tasks.sources.sentinelhub import ResponseCache, request_key

__all__ = [
    "RESPONSE_CACHE_DIR",
    "StacConfig",
    "StacPermanentError",
    "StacSource",
    "StacSourceError",
    "item_dn_offset",
    "make_stac_source",
    "mosaic_first_valid",
    "resolve_subscription_key",
    "response_cache_uri",
]

LOGGER = logging.getLogger(__name__)
RESPONSE_CACHE_DIR = "stac-responses"
"""Folder under the work root that holds cached search answers and window reads."""
SCL = "SCL"
S2_ASSET_BANDS: tuple[str, ...] = (*S2_BANDS, SCL)
"""Per S2 item: the 10 bands in TESSERA order, then the scene classification."""
_CACHE_VERSION = 1
_SIGN_LOCK = threading.Lock()
_BLOB_DOMAIN = ".blob.core.windows.net"
"""Azure blob storage hosts: where Planetary Computer's assets live (and what it signs)."""


# --- errors -------------------------------------------------------------------------------------
class StacSourceError(TileError):
    """Reading a tile from a STAC catalogue failed after the client's retries; a later retry
    may succeed."""


class StacPermanentError(StacSourceError):
    """The catalogue refused or lacks what the tile needs: retrying cannot help.

    ``cause`` is ``credentials`` (401/403), ``missing`` (404/410, or an asset or property an
    item lacks) or ``request`` (another 4xx); ``status`` the HTTP code, if any.
    """

    def __init__(self, tile_id: str, cause: str, status: int | None, message: str) -> None:
        self.cause = cause
        self.status = status
        super().__init__(tile_id, message)


# --- credentials --------------------------------------------------------------------------------
def resolve_subscription_key(
    cfg: StacConfig, environ: Mapping[str, str] | None = None, loader: BlockLoader | None = None
) -> SecretStr | None:
    """The Planetary Computer subscription key the config names, or None (anonymous signing).

    From the Prefect Secret block ``secret_block`` (JSON ``{"subscription_key": ...}``) when
    set, else from the environment variable ``subscription_key_env`` when present.

    Raises:
        ConfigError: The block cannot be read or lacks the key (the message never shows a value).
    """
    if cfg.secret_block:
        fld = "source.stac.secret_block"
        data = load_block_data(cfg.secret_block, fld, loader)
        value = data.get("value")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if not (isinstance(value, dict) and value.get("subscription_key")):
            raise ConfigError(fld, f"expected block {cfg.secret_block!r} to hold "
                              '{"subscription_key": ...}. Got another value')
        return SecretStr(str(value["subscription_key"]))
    env = os.environ if environ is None else environ
    key = env.get(cfg.subscription_key_env)
    return SecretStr(key) if key else None


# --- pure helpers -------------------------------------------------------------------------------
def _baseline(value: Any) -> float | None:
    """``"04.00"`` / ``"N0400"`` / ``4.0`` -> 4.0; None when absent or unreadable."""
    if value is None:
        return None
    text = str(value).strip().lstrip("Nn")
    try:
        return float(text) if "." in text else float(text) / 100.0
    except ValueError:
        return None


def item_dn_offset(props: Mapping[str, Any], date: np.datetime64, offset_removed: bool,
                   missing_baseline: str, item_id: str, tile_id: str) -> int:
    """The DN offset an S2 item's COGs carry (1000 or 0), from the item's own properties.

    Args:
        props: Item properties (``s2:processing_baseline``, ``earthsearch:boa_offset_applied``).
        date: Acquisition date (used only with ``missing_baseline='by-date'``).
        offset_removed: The catalogue's COGs have the offset removed (the fallback when the
            item does not say).
        missing_baseline: ``error`` or ``by-date``.
        item_id: For messages.
        tile_id: For messages.

    Raises:
        StacPermanentError: No readable baseline and ``missing_baseline='error'``.
    """
    raw = props.get("s2:processing_baseline")
    b = _baseline(raw)
    if b is None:
        if missing_baseline != "by-date":
            raise StacPermanentError(
                tile_id, "missing", None,
                f"item {item_id}: expected property s2:processing_baseline (e.g. '04.00'). "
                f"Got {raw!r}; set source.stac.missing_baseline=by-date to assume 04.00 from "
                f"{BASELINE_0400_START}.")
        carries = np.datetime64(date, "D") >= np.datetime64(BASELINE_0400_START)
    else:
        carries = b >= 4.0
    if not carries:
        return 0
    applied = props.get("earthsearch:boa_offset_applied")
    removed = offset_removed if applied is None else bool(applied)
    return 0 if removed else S2_DN_OFFSET


def mosaic_first_valid(stack: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the first layer that is valid there (layer 0 where none is).

    Args:
        stack: (G, H, W, ...) layers in priority order.
        valid: bool (G, H, W).

    Returns:
        (mosaic (H, W, ...), chosen layer index int (H, W)).
    """
    pick = np.argmax(valid, axis=0)
    idx = pick.reshape((1, *pick.shape) + (1,) * (stack.ndim - 3))
    return np.take_along_axis(stack, idx, axis=0)[0], pick


def _lonlat_bounds(tile: Tile) -> tuple[float, float, float, float]:
    from pyproj import Transformer

    tr = Transformer.from_crs(tile.crs, "EPSG:4326", always_xy=True)
    return tr.transform_bounds(*tile.bounds, densify_pts=21)


# --- items and jobs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    """What the source keeps of a STAC item."""

    id: str
    date: str  # UTC acquisition date, YYYY-MM-DD
    props: dict[str, Any]
    hrefs: dict[str, str]  # asset key -> unsigned href


@dataclass(frozen=True)
class _Job:
    """One window read: an item's band onto the tile grid."""

    item: _Item
    band: str
    asset: str
    kind: str  # "s2" or "s1"
    dtype: str
    resampling: str

    @property
    def href(self) -> str:
        return self.item.hrefs[self.asset]

    def key(self, tile: Tile) -> str:
        return request_key(redact_url(self.href), {"tile": tile.id, "resampling": self.resampling,
                                                   "dtype": self.dtype, "v": _CACHE_VERSION})


class _Cancelled(Exception):
    pass


@dataclass
class Timings:
    """Where acquisition time went, seconds (reads summed over threads)."""

    search: float = 0.0
    http: float = 0.0
    decode: float = 0.0
    reproject: float = 0.0
    mosaic: float = 0.0
    windows: int = 0
    cached_windows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


# --- the source ---------------------------------------------------------------------------------
class StacSource:
    """Scene source backed by STAC APIs and COGs (implements ``SceneSource``).

    Args:
        config: Catalogues, signing, concurrency, retries.
        subscription_key: Planetary Computer subscription key, or None (anonymous).
        cache: Where search answers and windows are kept; None keeps nothing.
    """

    name = "stac"

    def __init__(self, config: StacConfig, subscription_key: SecretStr | None = None,
                 cache: ResponseCache | None = None) -> None:
        self.config = config
        self.cache = cache if config.cache_responses else None
        self.s2_cat, self.s1_cat = config.catalogues()
        self._key = subscription_key
        self.client = RangeClient(config.max_connections, config.timeout_s, config.max_attempts,
                                  config.backoff_s)
        self.timings = Timings()
        self._items: dict[tuple[str, int, str], list[_Item]] = {}
        self._lock = threading.Lock()

    # --- search --------------------------------------------------------------------------
    def _search(self, tile: Tile, year: int, kind: str) -> list[_Item]:
        """Items of a collection over the tile in ``year`` (cached), sorted by (date, id)."""
        memo = (tile.id, year, kind)
        with self._lock:
            if memo in self._items:
                return self._items[memo]
        cat = self.s2_cat if kind == "s2" else self.s1_cat
        bbox = [round(v, 7) for v in _lonlat_bounds(tile)]
        params: dict[str, Any] = {
            "collections": [cat.collection], "bbox": bbox,
            "datetime": f"{year}-01-01T00:00:00Z/{year}-12-31T23:59:59Z",
        }
        if kind == "s2" and self.config.max_cloud_cover < 100:
            params["query"] = {"eo:cloud_cover": {"lte": self.config.max_cloud_cover}}
        key = request_key(f"{cat.api_url}/search", params)
        body = self.cache.get(key) if self.cache else None
        if body is None:
            t0 = time.perf_counter()
            feats = self._run_search(tile, cat, params)
            self.timings.add(search=time.perf_counter() - t0)
            from pyproj import Transformer

            to_tile = Transformer.from_crs("EPSG:4326", tile.crs, always_xy=True).transform
            items = [self._compact(f, kind, tile) for f in feats if _meets(f, tile, to_tile)]
            body = json.dumps([it.__dict__ for it in items], sort_keys=True).encode()
            if self.cache:
                self.cache.put(key, body)
        items = sorted((_Item(**d) for d in json.loads(body)), key=lambda i: (i.date, i.id))
        with self._lock:
            self._items[memo] = items
        return items

    def _run_search(self, tile: Tile, cat: Catalogue, params: dict[str, Any]) -> list[dict[str, Any]]:
        """All features of a search, page by page, with retries on transient failures."""
        from pystac_client import Client
        from pystac_client.exceptions import APIError
        from pystac_client.stac_api_io import StacApiIO
        from urllib3.util.retry import Retry

        # 429/5xx answers are retried per request by pystac-client's session (Retry-After
        # honoured); dropped connections and cut bodies restart the search here.
        retry = Retry(total=self.config.max_attempts - 1, connect=0, read=0,
                      backoff_factor=self.config.backoff_s, allowed_methods=None,
                      status_forcelist=(408, 429, 500, 502, 503, 504), raise_on_status=False,
                      respect_retry_after_header=True)
        last = ""
        for attempt in range(self.config.max_attempts):
            try:
                io = StacApiIO(max_retries=retry, timeout=self.config.timeout_s)
                client = Client.open(cat.api_url, stac_io=io)
                search = client.search(method="POST", limit=self.config.page_size, **params)
                return list(search.items_as_dicts())
            except APIError as exc:
                status = getattr(exc, "status_code", None)
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    cause = "credentials" if status in (401, 403) else "request"
                    raise StacPermanentError(
                        tile.id, cause, status,
                        f"STAC search of {cat.collection} at {cat.api_url}: expected HTTP 200. "
                        f"Got HTTP {status}: {str(exc)[:200]}") from None
                last = f"HTTP {status}: {str(exc)[:120]}"
            except Exception as exc:  # connection drops, cut bodies (JSON errors), timeouts
                last = f"{type(exc).__name__}: {str(exc)[:120]}"
            if attempt + 1 < self.config.max_attempts:
                time.sleep(min(self.config.backoff_s * 2 ** attempt, 60.0))
        raise StacSourceError(tile.id, f"STAC search of {cat.collection} at {cat.api_url} failed "
                              f"after {self.config.max_attempts} attempt(s): {last}.")

    def _compact(self, feat: dict[str, Any], kind: str, tile: Tile) -> _Item:
        props = feat.get("properties", {})
        stamp = props.get("datetime") or props.get("start_datetime")
        if not stamp:
            raise StacPermanentError(tile.id, "missing", None,
                                     f"item {feat.get('id')}: expected property datetime. Got none.")
        date = str(np.datetime64(str(stamp).replace("Z", ""), "D"))
        keep = ("s2:processing_baseline", "earthsearch:boa_offset_applied", "sat:orbit_state",
                "eo:cloud_cover", "platform")
        names = (ASSET_NAMES[self.s2_cat.naming].values() if kind == "s2" else S1_ASSETS.values())
        assets = feat.get("assets", {})
        hrefs = {k: str(assets[k]["href"]) for k in names if k in assets and "href" in assets[k]}
        return _Item(id=str(feat["id"]), date=date, props={k: props[k] for k in keep if k in props},
                     hrefs=hrefs)

    def s2_dates(self, tile: Tile, year: int) -> np.ndarray:
        """S2 L2A acquisition dates over the tile in ``year`` (cloud filter applied)."""
        return np.unique(np.array([i.date for i in self._search(tile, year, "s2")],
                                  dtype="datetime64[D]"))

    def _s1_items(self, tile: Tile, year: int, orbit: Orbit) -> list[_Item]:
        if orbit not in ("ascending", "descending"):
            raise ValueError(f"Expected orbit 'ascending' or 'descending'. Got {orbit!r}.")
        return [i for i in self._search(tile, year, "s1")
                if str(i.props.get("sat:orbit_state", "")).lower() == orbit]

    def s1_dates(self, tile: Tile, year: int, orbit: Orbit) -> np.ndarray:
        """S1 RTC acquisition dates over the tile in ``year`` for one orbit direction."""
        return np.unique(np.array([i.date for i in self._s1_items(tile, year, orbit)],
                                  dtype="datetime64[D]"))

    # --- jobs ----------------------------------------------------------------------------
    def _s2_jobs(self, tile: Tile, items: Sequence[_Item]) -> list[_Job]:
        names = ASSET_NAMES[self.s2_cat.naming]
        jobs = []
        for it in items:
            for band in S2_ASSET_BANDS:
                scl = band == SCL
                jobs.append(_Job(it, band, names[band], "s2", "uint8" if scl else "uint16",
                                 "nearest" if scl else "bilinear"))
        return jobs

    def _s1_jobs(self, items: Sequence[_Item]) -> list[_Job]:
        return [_Job(it, b, S1_ASSETS[b], "s1", "float32", "bilinear")
                for it in items for b in S1_BANDS]

    def _items_on(self, items: list[_Item], dates: np.ndarray) -> dict[str, list[_Item]]:
        wanted = {str(d) for d in np.asarray(dates, dtype="datetime64[D]")}
        out: dict[str, list[_Item]] = {d: [] for d in sorted(wanted)}
        for it in items:
            if it.date in wanted:
                out[it.date].append(it)
        return out

    def _year_items(self, tile: Tile, dates: np.ndarray, kind: str) -> list[_Item]:
        years = sorted({int(str(d)[:4]) for d in np.asarray(dates, dtype="datetime64[D]")})
        return [it for y in years for it in self._search(tile, y, kind)]

    # --- reading -------------------------------------------------------------------------
    def _sign(self, tile: Tile, href: str, cat: Catalogue) -> str:
        """The href to GET: signed (when the catalogue needs it), then rewritten."""
        if cat.sign:
            import planetary_computer
            import requests
            from planetary_computer.settings import Settings

            try:
                with _SIGN_LOCK:  # the package's settings are process-wide
                    settings = Settings.get()
                    settings.sas_url = self.config.sas_url or _PC_SAS
                    settings.subscription_key = (self._key.get_secret_value() if self._key
                                                 else None)
                    href = planetary_computer.sign_url(href)
            except requests.HTTPError as exc:
                status = getattr(exc.response, "status_code", None)
                msg = (f"signing {redact_url(href)} at {self.config.sas_url or _PC_SAS}: "
                       f"expected a SAS token. Got HTTP {status}")
                if status in (401, 403):
                    raise StacPermanentError(tile.id, "credentials", status, msg + (
                        f"; check the subscription key ({self._key_source()}).")) from None
                raise StacSourceError(tile.id, msg + ".") from None
            except requests.RequestException as exc:
                raise StacSourceError(tile.id, f"signing {redact_url(href)} failed: "
                                      f"{type(exc).__name__}.") from None
        mirror = self.config.blob_mirror_url
        if mirror:
            parts = urllib.parse.urlsplit(href)
            host = parts.hostname or ""
            if host.endswith(_BLOB_DOMAIN):
                account = host[: -len(_BLOB_DOMAIN)]
                query = f"?{parts.query}" if parts.query else ""
                return f"{mirror.rstrip('/')}/{account}{parts.path}{query}"
        for prefix, repl in self.config.asset_href_rewrite.items():
            if href.startswith(prefix):
                return repl + href[len(prefix):]
        return href

    def _key_source(self) -> str:
        c = self.config
        if c.secret_block:
            return f"Prefect Secret block {c.secret_block!r}"
        return f"environment variable {c.subscription_key_env}"

    def _read_job(self, tile: Tile, job: _Job) -> np.ndarray:
        """The job's window on the tile grid, (H, W) of ``job.dtype``; 0 where no data."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT
        from rasterio.windows import Window

        if job.asset not in job.item.hrefs:
            raise StacPermanentError(
                tile.id, "missing", None,
                f"item {job.item.id}: expected asset {job.asset!r} ({job.band}). Got assets "
                f"{sorted(job.item.hrefs)}.")
        cat = self.s2_cat if job.kind == "s2" else self.s1_cat
        url = self._sign(tile, job.href, cat)
        h, w = tile.height, tile.width
        t0 = time.perf_counter()
        http0 = self.client.thread_seconds()
        warped = False
        try:
            with open_cog(self.client, url) as src:
                tr = src.transform
                same_grid = (
                    src.crs is not None and src.crs.to_epsg() == tile.epsg
                    and tr.b == 0 and tr.d == 0 and tr.a == PIXEL_M and tr.e == -PIXEL_M
                    and (tile.x0 - tr.c) % PIXEL_M == 0 and (tr.f - tile.y0) % PIXEL_M == 0
                )
                fill = 0
                if same_grid:
                    col0 = round((tile.x0 - tr.c) / PIXEL_M)
                    row0 = round((tr.f - tile.y0) / PIXEL_M)
                    out = np.zeros((h, w), src.dtypes[0])
                    r0, r1 = max(row0, 0), min(row0 + h, src.height)
                    c0, c1 = max(col0, 0), min(col0 + w, src.width)
                    if r1 > r0 and c1 > c0:
                        out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = src.read(
                            1, window=Window(c0, r0, c1 - c0, r1 - r0))
                else:
                    warped = True
                    dst = rasterio.Affine(PIXEL_M, 0.0, tile.x0, 0.0, -PIXEL_M, tile.y0)
                    nodata = src.nodata if src.nodata is not None else fill
                    with WarpedVRT(src, crs=tile.crs, transform=dst, width=w, height=h,
                                   resampling=Resampling[job.resampling], src_nodata=nodata,
                                   nodata=nodata) as vrt:
                        out = vrt.read(1)
                nodata = src.nodata
        except FetchError as exc:
            raise self._wrap(tile, job, exc) from None
        except rasterio.errors.RasterioError as exc:
            raise StacSourceError(tile.id, f"item {job.item.id} asset {job.asset!r}: expected a "
                                  f"readable GeoTIFF. Got {type(exc).__name__}: "
                                  f"{str(exc)[:160]}.") from None
        total = time.perf_counter() - t0
        http = self.client.thread_seconds() - http0
        self.timings.add(http=http, windows=1, **{"reproject" if warped else "decode": total - http})
        if job.kind == "s1":
            out = out.astype(np.float32)
            bad = ~np.isfinite(out) | (out <= 0)
            if nodata is not None and np.isfinite(nodata):
                bad |= out == np.float32(nodata)
            return np.where(bad, np.float32(0), out)
        if nodata is not None and nodata != 0:
            out = np.where(out == nodata, 0, out)
        return out.astype(job.dtype)

    def _wrap(self, tile: Tile, job: _Job, exc: FetchError) -> StacSourceError:
        what = f"item {job.item.id} asset {job.asset!r} ({exc.url})"
        if exc.permanent:
            cause = ("credentials" if exc.status in (401, 403)
                     else "missing" if exc.status in (404, 410) else "request")
            hint = {"credentials": "; the signature or subscription key was refused",
                    "missing": "; the asset is not on the server"}.get(cause, "")
            return StacPermanentError(tile.id, cause, exc.status, f"{what}: {exc.args[0]}{hint}.")
        return StacSourceError(tile.id, f"{what}: {exc.args[0]}.")

    def _fetch(self, tile: Tile, job: _Job, cancel: threading.Event, keep: bool
               ) -> np.ndarray | None:
        """A job's window: from the cache, else read (and cached)."""
        if cancel.is_set():
            raise _Cancelled
        key = job.key(tile)
        if self.cache is not None and (body := self.cache.get(key)) is not None:
            arr = _decode_window(body, tile, job.dtype)
            if arr is not None:
                self.timings.add(cached_windows=1)
                return arr if keep else None
            LOGGER.warning("tile %s: cached window %s unreadable, reading again", tile.id, key)
        arr = self._read_job(tile, job)
        if self.cache is not None:
            self.cache.put(key, _encode_window(arr))
        return arr if keep else None

    def _fetch_all(self, tile: Tile, jobs: list[_Job], keep: bool) -> list[np.ndarray | None]:
        """Run jobs on up to ``max_connections`` threads; the first failure cancels the rest."""
        if not jobs:
            return []
        cancel = threading.Event()

        def run(job: _Job) -> np.ndarray | None:
            try:
                return self._fetch(tile, job, cancel, keep)
            except Exception:
                cancel.set()
                raise

        with ThreadPoolExecutor(max_workers=min(self.config.max_connections, len(jobs))) as ex:
            futs = [ex.submit(run, j) for j in jobs]
            wait(futs, return_when=FIRST_EXCEPTION)
            if any(f.done() and f.exception() is not None for f in futs):
                cancel.set()
                for f in futs:
                    f.cancel()
        errors = [f.exception() for f in futs if f.done() and not f.cancelled()]
        real = [e for e in errors if e is not None and not isinstance(e, _Cancelled)]
        if real:
            permanent = [e for e in real if isinstance(e, StacPermanentError)]
            raise (permanent or real)[0]
        return [f.result() for f in futs]

    # --- SceneSource -----------------------------------------------------------------------
    def read_s2(self, tile: Tile, dates: np.ndarray) -> S2Stack:
        """S2 L2A of the tile on the given dates: bands in S2_BANDS order, SCL, offsets."""
        dates = np.asarray(dates, dtype="datetime64[D]")
        by_date = self._items_on(self._year_items(tile, dates, "s2"), dates)
        order = [str(d) for d in dates]
        jobs = [j for d in order for j in self._s2_jobs(tile, by_date.get(d, []))]
        arrs = iter(self._fetch_all(tile, jobs, keep=True))
        t0 = time.perf_counter()
        h, w = tile.height, tile.width
        bands = np.zeros((dates.size, h, w, len(S2_BANDS)), np.uint16)
        scl = np.zeros((dates.size, h, w), np.uint8)
        offset = np.zeros(dates.size, np.int16)
        nb = len(S2_ASSET_BANDS)
        for t, d in enumerate(order):
            items = by_date.get(d, [])
            if not items:
                continue
            g = len(items)
            layers = np.stack([np.asarray(next(arrs)) for _ in range(g * nb)])
            layers = layers.reshape(g, nb, h, w)
            item_scl = layers[:, nb - 1].astype(np.uint8)
            item_dn = np.moveaxis(layers[:, : nb - 1], 1, -1).astype(np.uint16)  # (G, H, W, 10)
            offs = np.array([item_dn_offset(it.props, np.datetime64(d), self.s2_cat.dn_offset_removed,
                                            self.config.missing_baseline, it.id, tile.id)
                             for it in items], np.int64)
            if np.unique(offs).size > 1:  # mixed baselines on one day: bring all to offset 0
                sub = offs.astype(np.uint16)[:, None, None, None]
                item_dn = np.where(item_dn > sub, item_dn - sub, 0).astype(np.uint16)
                offs[:] = 0
            bands[t], _ = mosaic_first_valid(item_dn, item_scl != 0)
            scl[t], _ = mosaic_first_valid(item_scl, item_scl != 0)
            offset[t] = offs[0]
        self.timings.add(mosaic=time.perf_counter() - t0)
        return S2Stack(dates=dates, bands=bands, scl=scl, offset=offset)

    def read_s1(self, tile: Tile, dates: np.ndarray, orbit: Orbit) -> S1Stack:
        """S1 RTC linear backscatter [VV, VH] of the tile on the given dates; 0 = no data."""
        if orbit not in ("ascending", "descending"):
            raise ValueError(f"Expected orbit 'ascending' or 'descending'. Got {orbit!r}.")
        dates = np.asarray(dates, dtype="datetime64[D]")
        items = [i for i in self._year_items(tile, dates, "s1")
                 if str(i.props.get("sat:orbit_state", "")).lower() == orbit]
        by_date = self._items_on(items, dates)
        order = [str(d) for d in dates]
        jobs = [j for d in order for j in self._s1_jobs(by_date.get(d, []))]
        arrs = iter(self._fetch_all(tile, jobs, keep=True))
        t0 = time.perf_counter()
        h, w = tile.height, tile.width
        values = np.zeros((dates.size, h, w, len(S1_BANDS)), np.float32)
        for t, d in enumerate(order):
            g = len(by_date.get(d, []))
            if not g:
                continue
            layers = np.stack([np.asarray(next(arrs)) for _ in range(g * len(S1_BANDS))])
            layers = np.moveaxis(layers.reshape(g, len(S1_BANDS), h, w), 1, -1)
            values[t], _ = mosaic_first_valid(layers, (layers > 0).any(axis=-1))
        self.timings.add(mosaic=time.perf_counter() - t0)
        return S1Stack(dates=dates, values=values)

    def prefetch(self, tile: Tile, year: int) -> int:
        """Search the tile's year, then read every window into the cache before anything is
        written (nothing is kept in memory beyond one window). Returns the number of windows.

        Raises:
            StacSourceError: A read failed (``StacPermanentError`` when retrying cannot help);
                the cache keeps what was complete.
        """
        jobs = self._s2_jobs(tile, self._search(tile, year, "s2"))
        jobs += self._s1_jobs(self._search(tile, year, "s1"))
        if self.cache is not None:
            self._fetch_all(tile, jobs, keep=False)
        return len(jobs)


def _meets(feat: dict[str, Any], tile: Tile, to_tile: Any) -> bool:
    """Whether an item's footprint overlaps the tile by more than a sliver: the overlap still
    has area after shrinking it by half a pixel (footprints that only touch the tile's edge,
    up to the lon/lat round trip's error, add nothing); items without a geometry are kept."""
    import shapely
    from shapely.geometry import box, shape

    geom = feat.get("geometry")
    if not geom:
        return True
    try:
        g = shapely.transform(shape(geom).segmentize(0.01), lambda xy: np.column_stack(
            to_tile(xy[:, 0], xy[:, 1])))
        return bool(g.intersection(box(*tile.bounds)).buffer(-PIXEL_M / 2).area > 0)
    except Exception:  # an unreadable footprint: let the read decide
        return True


def _encode_window(arr: np.ndarray) -> bytes:
    from numcodecs import Zstd

    return bytes(Zstd(level=1).encode(np.ascontiguousarray(arr)))


def _decode_window(body: bytes, tile: Tile, dtype: str) -> np.ndarray | None:
    from numcodecs import Zstd

    try:
        raw = Zstd().decode(body)
        arr = np.frombuffer(raw, dtype=dtype)
        return arr.reshape(tile.height, tile.width)
    except Exception:
        return None


def response_cache_uri(work_uri: str) -> str:
    """Where search answers and windows are cached for a work root."""
    from tasks.storage import join, normalise

    return join(normalise(work_uri), RESPONSE_CACHE_DIR)


def make_stac_source(cfg: StacConfig, cache_uri: str | None, storage: Any,
                     subscription_key: SecretStr | None = None,
                     resolve: Callable[[StacConfig], SecretStr | None] = resolve_subscription_key,
                     ) -> StacSource:
    """Build the source: subscription key resolved now (if any), answers cached under
    ``cache_uri``."""
    key = subscription_key if subscription_key is not None else resolve(cfg)
    cache = ResponseCache(cache_uri, storage) if cache_uri else None
    return StacSource(cfg, key, cache)

