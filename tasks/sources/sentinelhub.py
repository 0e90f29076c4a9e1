"""Sentinel-2 L2A and Sentinel-1 GRD from Sentinel Hub (or CDSE, or a compatible endpoint).

Implements :class:`~tasks.sources.base.SceneSource` through sentinelhub-py (no hand-written
HTTP client):

- dates: Catalog API search per tile and year (S2 with a scene cloud-cover filter; S1 IW DV
  per orbit direction), reduced to unique UTC acquisition dates;
- arrays: one Process API request per date and tile window (tiles larger than
  ``max_request_px`` are split and stitched), downloaded by up to ``max_threads`` threads;
- S2: the 10 bands as DN + SCL + dataMask (UINT16). With ``harmonize_values`` the service
  removes the +1000 offset of baseline 04.00 and every date is recorded with offset 0;
  without it the DN are as in the product and dates from 2022-01-25 are recorded with offset
  1000. Either way d-pixel extraction removes the offset exactly once;
- S1: VV, VH linear power with ``backCoeff``/``orthorectify``/``demInstance`` from config,
  pixels with dataMask 0 set to 0 (no data);
- every catalog and Process response is kept in the work root (``sh-responses/``), keyed by
  a hash of the request (URL and body, never credentials), so a retried or re-run
  acquisition downloads nothing twice; :meth:`SentinelHubSource.prefetch` downloads a whole
  tile before anything is written, so a failure leaves no partial scenes.

Credentials are resolved from the environment variables or Prefect Secret block the config
names, at the point of use; they never enter configs, cache keys, results, logs or errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.credentials import BlockLoader, SentinelHubCredentials, sentinelhub_credentials
from tasks.errors import ConfigError, FactoryError, TileError
from tasks.grid import PIXEL_M, Tile
from tasks.sources._sh_config import SentinelHubConfig
from tasks.sources._sh_requests import (
    S1_EVALSCRIPT,
    S1_INPUT_BANDS,
    S1_MASK,
    S2_EVALSCRIPT,
    S2_INPUT_BANDS,
    S2_SCL,
    Window,
    decode_tiff,
    split_tile,
    tile_pu,
)
from tasks.sources.base import BASELINE_0400_START, S2_DN_OFFSET, Orbit, S1Stack, S2Stack

__all__ = [
    "AcquisitionPlan",
    "PUBudgetError",
    "ResponseCache",
    "SentinelHubConfig",
    "SentinelHubCredentials",
    "SentinelHubError",
    "SentinelHubPermanentError",
    "SentinelHubSource",
    "TilePlan",
    "check_budget",
    "estimate_acquisition",
    "plan_acquisition",
    "response_cache_uri",
    "resolve_credentials",
    "should_retry",
]

LOGGER = logging.getLogger(__name__)
_PERMANENT_STATUS = (400, 401, 403, 404, 405, 409, 413, 422)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TOKEN_RENEWALS = 2


# --- errors -----------------------------------------------------------------------------------
class SentinelHubError(TileError):
    """Fetching a tile failed after the client's retries; a later retry may succeed."""


class SentinelHubPermanentError(SentinelHubError):
    """The service refused the credentials or the request: retrying cannot help.

    ``cause`` names the reason (``credentials`` or ``request``) and ``status`` the HTTP code.
    """

    def __init__(self, tile_id: str, cause: str, status: int | None, message: str) -> None:
        self.cause = cause
        self.status = status
        super().__init__(tile_id, message)


class PUBudgetError(FactoryError, RuntimeError):
    """The processing-unit estimate exceeds the configured budget (raised before any request)."""


def should_retry(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry unless the failure is permanent or over budget.

    Prefect calls it with the task, the task run and a ``Failed`` state holding the exception.
    """
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # an unreadable result: let Prefect's retries decide
            return True
    return not isinstance(exc, SentinelHubPermanentError | PUBudgetError)


def _loopback_session_class() -> type:
    """A SentinelHubSession for a plain-http token URL on loopback (the local endpoint).

    oauthlib refuses plain http unless ``OAUTHLIB_INSECURE_TRANSPORT`` is set, and that
    variable is process-wide: it would also allow http for every other OAuth client of the
    process. This session asks the loopback token endpoint with a plain client-credentials
    POST instead (the constructor refuses plain http anywhere but loopback), keeping
    sentinelhub-py's retry and error handling around it.
    """
    import time

    import requests
    from sentinelhub import SentinelHubSession
    from sentinelhub.download.handlers import fail_user_errors, retry_temporary_errors

    class LoopbackSession(SentinelHubSession):
        @retry_temporary_errors
        @fail_user_errors
        def _fetch_token(self, request: Any) -> dict[str, Any]:
            resp = requests.post(
                request.url, timeout=self.config.download_timeout_seconds,
                data={"grant_type": "client_credentials", "client_id": self.config.sh_client_id,
                      "client_secret": self.config.sh_client_secret},
                headers=self.DEFAULT_HEADERS,
            )
            resp.raise_for_status()
            token = resp.json()
            token.setdefault("expires_at", time.time() + float(token.get("expires_in", 3600)))
            return token

    return LoopbackSession


# --- credentials ------------------------------------------------------------------------------
def resolve_credentials(
    cfg: SentinelHubConfig,
    environ: Mapping[str, str] | None = None,
    loader: BlockLoader | None = None,
) -> SentinelHubCredentials:
    """The OAuth client the config names (:func:`tasks.credentials.sentinelhub_credentials`,
    the loading path shared with S3): a Prefect Secret block, else two env variables.

    Raises:
        ConfigError: They are missing or malformed; the message names where they were looked
            for, never a value.
    """
    return sentinelhub_credentials(cfg.secret_block, cfg.client_id_env, cfg.client_secret_env,
                                   environ=environ, loader=loader)


class _DropSecrets(logging.Filter):
    """Drops library debug records that print request bodies, headers or tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_SECRET_LOGGERS = ("requests_oauthlib.oauth2_session", "oauthlib.oauth2.rfc6749")


def _guard_library_logs() -> None:
    """requests-oauthlib logs the token request body (with the client secret) and the token at
    DEBUG: drop those loggers' records below WARNING. Idempotent."""
    for name in _SECRET_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropSecrets) for f in lg.filters):
            lg.addFilter(_DropSecrets())


# --- response cache ---------------------------------------------------------------------------
class ResponseCache:
    """Response bodies in storage, one file per request key (``{root}/{key[:2]}/{key}``)."""

    def __init__(self, root_uri: str, storage: Any) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.storage = storage

    def _uri(self, key: str) -> str:
        return f"{self.root_uri}/{key[:2]}/{key}"

    def get(self, key: str) -> bytes | None:
        from tasks.storage import get_fs

        fs, path = get_fs(self._uri(key), self.storage)
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, body: bytes) -> None:
        from tasks.storage import write_bytes_atomic

        write_bytes_atomic(self._uri(key), body, self.storage)


def request_key(url: str, payload: Any) -> str:
    """Cache key of a request: its URL and JSON body (no headers, so no token)."""
    body = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(f"{url}\n{body}".encode()).hexdigest()[:32]


# --- plans and budgets ------------------------------------------------------------------------
@dataclass(frozen=True)
class TilePlan:
    """What acquiring one tile costs."""

    tile_id: str
    n_s2: int
    n_s1_ascending: int
    n_s1_descending: int
    n_requests: int
    pu: float


@dataclass(frozen=True)
class AcquisitionPlan:
    """Processing-unit estimate of a build's acquisition (from catalog searches only)."""

    year: int
    tiles: tuple[TilePlan, ...]
    budget: float | None

    @property
    def total_pu(self) -> float:
        return sum(t.pu for t in self.tiles)

    @property
    def n_requests(self) -> int:
        return sum(t.n_requests for t in self.tiles)

    def markdown(self) -> str:
        """A Markdown table for a Prefect artifact (no credentials, no URLs)."""
        budget = "none" if self.budget is None else f"{self.budget:,.2f} PU"
        rows = [
            f"### Sentinel Hub processing units, {self.year}",
            "",
            f"Estimate **{self.total_pu:,.2f} PU** over {self.n_requests} Process requests; "
            f"budget {budget}.",
            "",
            "| tile | S2 dates | S1 asc | S1 desc | requests | PU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        rows += [
            f"| {t.tile_id} | {t.n_s2} | {t.n_s1_ascending} | {t.n_s1_descending} | "
            f"{t.n_requests} | {t.pu:,.3f} |"
            for t in self.tiles
        ]
        return "\n".join(rows) + "\n"


def check_budget(estimate: float, budget: float | None, what: str) -> None:
    """Raise :class:`PUBudgetError` when ``estimate`` exceeds ``budget`` (None = no limit)."""
    if budget is not None and estimate > budget:
        raise PUBudgetError(
            f"{what}: expected at most source.sentinelhub.pu_budget={budget:g} processing "
            f"units. Got an estimate of {estimate:.3f} PU; raise the budget or shrink the "
            "region. No Process request was sent."
        )


def plan_acquisition(
    tiles: Sequence[Tile], year: int, source: SentinelHubSource
) -> AcquisitionPlan:
    """Catalog every tile (no Process request) and estimate the processing units.

    Raises:
        PUBudgetError: The total exceeds ``source.config.pu_budget``.
    """
    plans = tuple(source.tile_plan(t, year) for t in tiles)
    plan = AcquisitionPlan(year=year, tiles=plans, budget=source.config.pu_budget)
    check_budget(plan.total_pu, plan.budget, f"{len(plans)} tile(s) of {year}")
    return plan


# --- the source ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    url: str
    payload: dict[str, Any]
    request: Any  # sentinelhub DownloadRequest
    window: Window
    n_bands: int
    dtype: str

    @property
    def key(self) -> str:
        return request_key(self.url, self.payload)


class _Cancelled(Exception):
    pass


class SentinelHubSource:
    """Scene source backed by a Sentinel Hub deployment (implements ``SceneSource``).

    Args:
        config: Endpoint, processing options, concurrency and budget.
        credentials: The OAuth client (see :func:`resolve_credentials`).
        cache: Where responses are kept; None keeps nothing (every call downloads).
    """

    name = "sentinelhub"

    def __init__(
        self,
        config: SentinelHubConfig,
        credentials: SentinelHubCredentials,
        cache: ResponseCache | None = None,
    ) -> None:
        from sentinelhub import DataCollection, SHConfig

        self.config = config
        self.cache = cache if config.cache_responses else None
        base_url, token_url = config.urls()
        host = urllib.parse.urlparse(token_url).hostname or ""
        if token_url.startswith("http://"):
            if host not in _LOOPBACK:
                raise ConfigError(
                    "source.sentinelhub.token_url",
                    f"expected an https:// token URL (plain http only on loopback). Got host {host!r}",
                )
        _guard_library_logs()
        sh = SHConfig(use_defaults=True)
        sh.sh_base_url = base_url
        sh.sh_token_url = token_url
        sh.sh_client_id = credentials.client_id
        sh.sh_client_secret = credentials.client_secret.get_secret_value()
        sh.max_download_attempts = config.max_download_attempts
        sh.download_sleep_time = config.download_sleep_s
        sh.download_timeout_seconds = config.timeout_s
        sh.max_retries = config.max_rate_limit_retries
        self._sh = sh
        self._base_url = base_url
        self._loopback_token = token_url.startswith("http://")
        # A collection's own service_url wins over sh_base_url: redefine each on this endpoint.
        tag = hashlib.sha256(base_url.encode()).hexdigest()[:8]
        self._s2 = DataCollection.SENTINEL2_L2A.define_from(f"TESSERA_S2L2A_{tag}", service_url=base_url)
        self._s1 = {
            "ascending": DataCollection.SENTINEL1_IW_ASC.define_from(
                f"TESSERA_S1IWASC_{tag}", service_url=base_url
            ),
            "descending": DataCollection.SENTINEL1_IW_DES.define_from(
                f"TESSERA_S1IWDES_{tag}", service_url=base_url
            ),
        }
        self._lock = threading.Lock()
        self._session: Any = None
        self._session_gen = 0
        self._local = threading.local()
        self._dates: dict[tuple[str, int, str], np.ndarray] = {}

    # --- sessions and clients --------------------------------------------------------------
    def _get_session(self, tile_id: str, stale_gen: int | None = None) -> tuple[Any, int]:
        """The shared OAuth session, created on first use (or renewed if ``stale_gen`` is current)."""
        from sentinelhub import SentinelHubSession

        with self._lock:
            if self._session is None or stale_gen == self._session_gen:
                cls = _loopback_session_class() if self._loopback_token else SentinelHubSession
                try:
                    self._session = cls(config=self._sh)
                except Exception as exc:
                    raise self._wrap(exc, tile_id, "authentication") from None
                self._session_gen += 1
            return self._session, self._session_gen

    def _client(self, session: Any) -> Any:
        from sentinelhub import SentinelHubDownloadClient

        c = getattr(self._local, "client", None)
        if c is None or c.session is not session:
            c = SentinelHubDownloadClient(config=self._sh, session=session, default_retry_time=30)
            self._local.client = c
        return c

    def _wrap(self, exc: Exception, tile_id: str, what: str) -> SentinelHubError:
        """A factory error naming the tile and cause, without request headers or bodies."""
        from oauthlib.oauth2.rfc6749.errors import OAuth2Error
        from sentinelhub.exceptions import DownloadFailedException, OutOfRequestsException

        if isinstance(exc, SentinelHubError):
            return exc
        if isinstance(exc, OAuth2Error):
            return SentinelHubPermanentError(
                tile_id, "credentials", exc.status_code,
                f"{what} failed: the token endpoint rejected the client credentials "
                f"({exc.error}, HTTP {exc.status_code}); check {self._cred_source()}.",
            )
        if isinstance(exc, OutOfRequestsException):
            return SentinelHubError(
                tile_id, f"{what} failed: still rate limited (HTTP 429) after "
                f"{self.config.max_rate_limit_retries} answers; try later or lower max_threads."
            )
        status = None
        reason = type(exc).__name__
        if isinstance(exc, DownloadFailedException) and exc.request_exception is not None:
            resp = getattr(exc.request_exception, "response", None)
            status = getattr(resp, "status_code", None)
            reason = type(exc.request_exception).__name__
            if resp is not None and status is not None:
                reason = f"HTTP {status}: {_service_message(resp)}"
        if status in (401, 403):
            return SentinelHubPermanentError(
                tile_id, "credentials", status,
                f"{what} failed: Sentinel Hub refused the credentials ({reason}); "
                f"check {self._cred_source()}.",
            )
        if status in _PERMANENT_STATUS:
            return SentinelHubPermanentError(
                tile_id, "request", status,
                f"{what} failed: Sentinel Hub rejected the request ({reason}); "
                "check source.sentinelhub settings and the tile's extent.",
            )
        return SentinelHubError(
            tile_id, f"{what} failed after {self.config.max_download_attempts} attempt(s): {reason}."
        )

    def _cred_source(self) -> str:
        c = self.config
        if c.secret_block:
            return f"Prefect Secret block {c.secret_block!r}"
        return f"environment variables {c.client_id_env}/{c.client_secret_env}"

    # --- catalog -------------------------------------------------------------------------
    def _catalog_dates(self, tile: Tile, year: int, kind: str) -> np.ndarray:
        memo = (tile.id, year, kind)
        if memo in self._dates:
            return self._dates[memo]
        from sentinelhub import CRS, BBox, SentinelHubCatalog

        collection = self._s2 if kind == "s2" else self._s1[kind]
        flt = None
        if kind == "s2" and self.config.max_cloud_cover < 100:
            flt = f"eo:cloud_cover <= {self.config.max_cloud_cover:g}"
        bbox = BBox(tile.bounds, crs=CRS(tile.epsg))
        time = (f"{year}-01-01", f"{year}-12-31")
        fields = {"include": ["id", "properties.datetime", "properties.eo:cloud_cover"]}
        key = request_key(
            f"{self._base_url}/api/v1/catalog/1.0.0/search",
            {"collection": collection.api_id, "filters": collection.orbit_direction,
             "bbox": [round(v, 9) for v in bbox.transform_bounds(CRS.WGS84)], "time": time,
             "filter": flt},
        )
        body = self.cache.get(key) if self.cache else None
        if body is None:
            def search(client: Any) -> list[dict[str, Any]]:
                catalog = SentinelHubCatalog(config=self._sh)
                catalog.client = client
                return list(catalog.search(collection, bbox=bbox, time=time, filter=flt, fields=fields))

            items = self._call(tile.id, f"catalog search ({kind})", search)
            days = sorted({str(it["properties"]["datetime"])[:10] for it in items})
            body = json.dumps(days).encode()
            if self.cache:
                self.cache.put(key, body)
        dates = np.array(json.loads(body), dtype="datetime64[D]")
        self._dates[memo] = dates
        return dates

    def s2_dates(self, tile: Tile, year: int) -> np.ndarray:
        """S2 L2A acquisition dates over the tile in ``year`` (scene cloud cover filtered)."""
        return self._catalog_dates(tile, year, "s2")

    def s1_dates(self, tile: Tile, year: int, orbit: Orbit) -> np.ndarray:
        """S1 GRD IW DV acquisition dates over the tile in ``year`` for one orbit direction."""
        if orbit not in ("ascending", "descending"):
            raise ValueError(f"Expected orbit 'ascending' or 'descending'. Got {orbit!r}.")
        return self._catalog_dates(tile, year, orbit)

    def tile_plan(self, tile: Tile, year: int) -> TilePlan:
        """Catalog one tile and estimate its processing units (no Process request)."""
        n2 = len(self.s2_dates(tile, year))
        na = len(self.s1_dates(tile, year, "ascending"))
        nd = len(self.s1_dates(tile, year, "descending"))
        n_win = len(split_tile(tile.size_px, self.config.max_request_px))
        pu = tile_pu(tile.size_px, self.config.max_request_px, n2, na + nd, self.config.s1_orthorectify)
        return TilePlan(tile.id, n2, na, nd, n_win * (n2 + na + nd), pu)

    # --- process -------------------------------------------------------------------------
    def _jobs(self, tile: Tile, dates: np.ndarray, kind: str) -> list[_Job]:
        from sentinelhub import CRS, BBox, MimeType, MosaickingOrder, SentinelHubRequest

        c = self.config
        if kind == "s2":
            collection, script, bands, dtype = self._s2, S2_EVALSCRIPT, S2_INPUT_BANDS, "uint16"
            processing: dict[str, Any] = {"harmonizeValues": c.harmonize_values}
        else:
            collection, script, bands, dtype = self._s1[kind], S1_EVALSCRIPT, S1_INPUT_BANDS, "float32"
            processing = {"backCoeff": c.s1_back_coeff, "orthorectify": c.s1_orthorectify,
                          "demInstance": c.s1_dem}
        jobs = []
        for d in np.asarray(dates, dtype="datetime64[D]"):
            day = str(d)
            for w in split_tile(tile.size_px, c.max_request_px):
                x0 = tile.x0 + w.col * PIXEL_M
                top = tile.y0 - w.row * PIXEL_M
                bbox = BBox((x0, top - w.height * PIXEL_M, x0 + w.width * PIXEL_M, top),
                            crs=CRS(tile.epsg))
                req = SentinelHubRequest(
                    evalscript=script,
                    input_data=[SentinelHubRequest.input_data(
                        collection, time_interval=(day, day),
                        mosaicking_order=MosaickingOrder.MOST_RECENT,
                        other_args={"processing": processing})],
                    responses=[SentinelHubRequest.output_response("default", MimeType.TIFF)],
                    bbox=bbox, size=(w.width, w.height), config=self._sh,
                ).download_list[0]
                payload = json.loads(json.dumps(req.post_values, default=str))
                jobs.append(_Job(req.url, payload, req, w, len(bands), dtype))
        return jobs

    def _call(self, tile_id: str, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)`` through sentinelhub-py (its retries on 5xx, 429 and timeouts), with
        a fresh token on HTTP 401 (a token the service considers expired), at most twice: a
        refusal of fresh tokens means the credentials are bad."""
        from sentinelhub.exceptions import DownloadFailedException

        session, gen = self._get_session(tile_id)
        for attempt in range(_TOKEN_RENEWALS + 1):
            try:
                return fn(self._client(session))
            except DownloadFailedException as exc:
                status = getattr(getattr(exc.request_exception, "response", None), "status_code", None)
                if status == 401 and attempt < _TOKEN_RENEWALS:
                    LOGGER.info("tile %s: token refused (HTTP 401), renewing it", tile_id)
                    session, gen = self._get_session(tile_id, stale_gen=gen)
                    continue
                raise self._wrap(exc, tile_id, what) from None
            except Exception as exc:
                raise self._wrap(exc, tile_id, what) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _download(self, job: _Job, tile_id: str) -> bytes:
        """One Process response body."""
        def go(client: Any) -> bytes:
            return bytes(client.download([job.request], max_threads=1, decode_data=False)[0].content)

        return self._call(tile_id, "Process request", go)

    def _fetch(self, job: _Job, tile_id: str, cancel: threading.Event, keep: bool) -> np.ndarray | None:
        """Decoded (h, w, C) array of one job: from the cache, else downloaded and cached."""
        if cancel.is_set():
            raise _Cancelled
        w = job.window
        if self.cache and (body := self.cache.get(job.key)) is not None:
            try:
                arr = decode_tiff(body, w.height, w.width, job.n_bands, job.dtype)
                return arr if keep else None
            except FactoryError:
                LOGGER.warning("tile %s: cached response %s unreadable, downloading again", tile_id, job.key)
        last = ""
        for _ in range(self.config.max_decode_attempts):
            if cancel.is_set():
                raise _Cancelled
            body = self._download(job, tile_id)
            try:
                arr = decode_tiff(body, w.height, w.width, job.n_bands, job.dtype)
            except FactoryError as exc:
                last = str(exc)
                LOGGER.warning("tile %s: bad response body (%s), downloading again", tile_id, last)
                continue
            if self.cache:
                self.cache.put(job.key, body)
            return arr if keep else None
        raise SentinelHubError(
            tile_id, f"Process response unreadable after {self.config.max_decode_attempts} "
            f"download(s): {last}"
        )

    def _fetch_all(self, tile: Tile, jobs: list[_Job], keep: bool) -> list[np.ndarray | None]:
        """Run jobs on up to ``max_threads`` threads; the first failure cancels the rest."""
        if not jobs:
            return []
        cancel = threading.Event()
        def run(job: _Job) -> np.ndarray | None:
            try:
                return self._fetch(job, tile.id, cancel, keep)
            except Exception:
                cancel.set()  # no new request starts once one has failed
                raise

        with ThreadPoolExecutor(max_workers=min(self.config.max_threads, len(jobs))) as ex:
            futs = [ex.submit(run, j) for j in jobs]
            done, _ = wait(futs, return_when=FIRST_EXCEPTION)
            failed = [f for f in futs if f.done() and f.exception() is not None]
            if failed:
                cancel.set()
                for f in futs:
                    f.cancel()
        if failed:
            errors = [f.exception() for f in futs if f.done() and not f.cancelled()]
            real = [e for e in errors if e is not None and not isinstance(e, _Cancelled)]
            permanent = [e for e in real if isinstance(e, SentinelHubPermanentError)]
            raise (permanent or real)[0]
        return [f.result() for f in futs]

    def _read(self, tile: Tile, dates: np.ndarray, kind: str) -> np.ndarray:
        jobs = self._jobs(tile, dates, kind)
        arrs = self._fetch_all(tile, jobs, keep=True)
        n_win = len(split_tile(tile.size_px, self.config.max_request_px))
        n_bands = jobs[0].n_bands if jobs else 0
        out = np.zeros((len(dates), tile.size_px, tile.size_px, n_bands),
                       np.uint16 if kind == "s2" else np.float32)
        for i, (job, arr) in enumerate(zip(jobs, arrs, strict=True)):
            w = job.window
            out[i // n_win, w.row : w.row + w.height, w.col : w.col + w.width] = arr
        return out

    def read_s2(self, tile: Tile, dates: np.ndarray) -> S2Stack:
        """S2 L2A of the tile on the given dates (bands in S2_BANDS order, SCL, offsets)."""
        dates = np.asarray(dates, dtype="datetime64[D]")
        raw = self._read(tile, dates, "s2")
        offset = np.zeros(dates.size, np.int16)
        if not self.config.harmonize_values:
            offset[dates >= np.datetime64(BASELINE_0400_START)] = S2_DN_OFFSET
        return S2Stack(dates=dates, bands=raw[..., :S2_SCL], scl=raw[..., S2_SCL].astype(np.uint8),
                       offset=offset)

    def read_s1(self, tile: Tile, dates: np.ndarray, orbit: Orbit) -> S1Stack:
        """S1 linear backscatter [VV, VH] of the tile on the given dates; 0 where no data."""
        if orbit not in ("ascending", "descending"):
            raise ValueError(f"Expected orbit 'ascending' or 'descending'. Got {orbit!r}.")
        dates = np.asarray(dates, dtype="datetime64[D]")
        raw = self._read(tile, dates, orbit)
        values = np.where(raw[..., S1_MASK : S1_MASK + 1] > 0, raw[..., :S1_MASK], np.float32(0))
        return S1Stack(dates=dates, values=values.astype(np.float32))

    def prefetch(self, tile: Tile, year: int) -> TilePlan:
        """Catalog the tile, check its PU estimate against the budget, then download every
        response into the cache (nothing is decoded into memory beyond one response).

        Raises:
            PUBudgetError: Before any Process request, when the tile alone exceeds the budget.
            SentinelHubError: A download failed (``SentinelHubPermanentError`` when retrying
                cannot help); the cache keeps what was complete.
        """
        plan = self.tile_plan(tile, year)
        check_budget(plan.pu, self.config.pu_budget, f"tile {tile.id}")
        if self.cache is None:
            return plan
        jobs = self._jobs(tile, self.s2_dates(tile, year), "s2")
        for orbit in ("ascending", "descending"):
            jobs += self._jobs(tile, self.s1_dates(tile, year, orbit), orbit)
        self._fetch_all(tile, jobs, keep=False)
        return plan


def _service_message(resp: Any) -> str:
    """The service's error reason and message, cut short (no headers, no request body)."""
    try:
        err = resp.json().get("error", {})
        text = f"{err.get('reason', '')}: {err.get('message', '')}".strip(": ")
    except Exception:
        text = (getattr(resp, "reason", "") or "").strip()
    return text[:200] or "no message"


RESPONSE_CACHE_DIR = "sh-responses"
"""Folder under the work root that holds cached catalog and Process responses."""


def response_cache_uri(work_uri: str) -> str:
    """Where responses are cached for a work root."""
    from tasks.storage import join, normalise

    return join(normalise(work_uri), RESPONSE_CACHE_DIR)


def estimate_acquisition(
    tiles: Sequence[Tile], year: int, cfg: SentinelHubConfig, storage: Any,
    credentials: SentinelHubCredentials | None = None,
) -> AcquisitionPlan:
    """The flow's pre-flight: catalog every tile, estimate PU, enforce the budget.

    Sends catalog requests only (their answers are cached for acquisition); show
    ``plan.markdown()`` as an artifact.

    Raises:
        PUBudgetError: The estimate exceeds ``cfg.pu_budget``; no Process request was sent.
    """
    src = make_sentinelhub_source(cfg, response_cache_uri(storage.work_uri), storage, credentials)
    return plan_acquisition(tiles, year, src)


def make_sentinelhub_source(
    cfg: SentinelHubConfig, cache_uri: str | None, storage: Any,
    credentials: SentinelHubCredentials | None = None,
) -> SentinelHubSource:
    """Build the source: credentials resolved now, responses cached under ``cache_uri``."""
    creds = credentials or resolve_credentials(cfg)
    cache = ResponseCache(cache_uri, storage) if cache_uri else None
    return SentinelHubSource(cfg, creds, cache)
