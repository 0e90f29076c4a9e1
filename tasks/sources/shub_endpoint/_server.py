"""A loopback HTTP server speaking the Sentinel Hub API subset the factory uses.

- ``POST /oauth/token`` (form, client_credentials) -> JWT-shaped bearer token;
- ``POST /api/v1/catalog/1.0.0/search`` -> STAC FeatureCollection, paged with ``next``;
- ``POST /api/v1/process`` -> ``image/tiff`` (one response) or ``application/x-tar``
  (several: ``<id>.tif`` and ``userdata.json``), framed like the real service (big-endian,
  deflate, 8-row strips, GeoTIFF tags; see ``shared/data/real/sentinelhub-process-response.tar``).

It serves the synthetic Earth: a request for a 10 m grid-aligned UTM bbox returns exactly the
arrays :class:`~tasks.sources.synthetic.SyntheticSource` gives for those pixels. It does not
run evalscripts: it returns the evalscript's input bands, in order, as its ``sampleType``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
import re
import tarfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import tifffile

from tasks.grid import PIXEL_M, Tile, zone_of_lon
from tasks.sources._loopback import LoopbackServer
from tasks.sources.base import BASELINE_0400_START, S2_BANDS, S2_DN_OFFSET
from tasks.sources.shub_endpoint._config import EndpointConfig, FaultConfig
from tasks.sources.synthetic import SyntheticSource

MAX_PX = 2500
S2_TYPE, S1_TYPE = "sentinel-2-l2a", "sentinel-1-grd"
_S2_HOUR, _S1_HOUR = {"": "10:30:00"}, {"ascending": "17:40:00", "descending": "05:50:00"}
_BACK_COEFF = {"BETA0", "SIGMA0_ELLIPSOID", "GAMMA0_ELLIPSOID", "GAMMA0_TERRAIN"}
_DEM = {"COPERNICUS", "COPERNICUS_30", "COPERNICUS_90", "MAPZEN"}
_S1_PROPS = {"sar:instrument_mode": "IW", "s1:polarization": "DV", "s1:resolution": "HIGH"}


class HTTPFault(Exception):
    """An error answer: status, reason and message in Sentinel Hub's JSON shape."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers or {}
        super().__init__(message)


@dataclass
class Stats:
    """What the endpoint answered (for tests and benchmarks)."""

    token: int = 0
    catalog: int = 0
    process: int = 0
    process_ok: int = 0
    bytes_out: int = 0
    faults: dict[str, int] = field(default_factory=dict)


class EndpointState:
    """Shared state of one endpoint: config, issued tokens, fault draws and statistics."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.world = SyntheticSource(config.world)
        self.lock = threading.Lock()
        self.tokens: dict[str, float] = {}  # token -> expiry (epoch s)
        self.revoked: set[str] = set()
        self.fault_counts: dict[str, int] = {}
        self.rng = random.Random(config.faults.seed)
        self.stats = Stats()
        self.memo: dict[str, tuple[bytes, str]] = {}

    @property
    def faults(self) -> FaultConfig:
        return self.config.faults

    def set_faults(self, faults: FaultConfig) -> None:
        """Change the injected faults (resets the draws)."""
        with self.lock:
            self.config = self.config.model_copy(update={"faults": faults})
            self.rng = random.Random(faults.seed)
            self.fault_counts.clear()

    def draw_fault(self, request_key: str, allowed: tuple[str, ...]) -> str | None:
        f = self.faults
        with self.lock:
            if f.rate <= 0 or self.fault_counts.get(request_key, 0) >= f.max_per_request:
                return None
            if self.rng.random() >= f.rate:
                return None
            kinds = [k for k in f.kinds if k in allowed]
            if not kinds:
                return None
            kind = self.rng.choice(kinds)
            if kind == "expired_token":  # at most once per request: the client renews once
                if self.fault_counts.get(request_key + "#tok", 0):
                    return None
                self.fault_counts[request_key + "#tok"] = 1
            self.fault_counts[request_key] = self.fault_counts.get(request_key, 0) + 1
            self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
            return kind


# --- token ------------------------------------------------------------------------------------
def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def issue_token(state: EndpointState, form: dict[str, str]) -> dict[str, Any]:
    cfg = state.config
    with state.lock:
        state.stats.token += 1
    if state.faults.permanent == "401":
        raise HTTPFault(401, "invalid_client")
    if form.get("grant_type") != "client_credentials":
        raise HTTPFault(400, "unsupported_grant_type")
    ok = form.get("client_id") == cfg.client_id and form.get(
        "client_secret"
    ) == cfg.client_secret.get_secret_value()
    if not ok:
        raise HTTPFault(401, "invalid_client")
    now = time.time()
    payload = {"azp": cfg.client_id, "exp": int(now) + cfg.token_expires_in, "jti": uuid.uuid4().hex}
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}.{uuid.uuid4().hex}"
    with state.lock:
        state.tokens[token] = now + cfg.token_expires_in
    return {"access_token": token, "token_type": "Bearer", "expires_in": cfg.token_expires_in}


def check_bearer(state: EndpointState, header: str | None) -> str:
    token = (header or "").removeprefix("Bearer ").strip()
    with state.lock:
        exp = state.tokens.get(token)
        if exp is None or token in state.revoked or exp < time.time():
            raise HTTPFault(401, "Invalid or expired token.")
    return token


# --- catalog -------------------------------------------------------------------------------
def _parse_filter(text: str | None) -> list[tuple[str, str, Any]]:
    """A conjunction of ``prop op value`` clauses (cql2-text subset)."""
    if not text:
        return []
    out = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        m = re.fullmatch(r"\s*([\w:.]+)\s*(<=|>=|=|<|>)\s*(.+?)\s*", part)
        if not m:
            raise HTTPFault(400, f"Cannot parse filter clause {part!r}.")
        prop, op, raw = m.groups()
        val: Any = raw[1:-1] if raw[:1] in "'\"" else float(raw)
        out.append((prop, op, val))
    return out


def _matches(props: dict[str, Any], clauses: list[tuple[str, str, Any]]) -> bool:
    for prop, op, val in clauses:
        have = props.get(prop)
        if have is None:
            return False
        if isinstance(val, str):
            if op != "=" or str(have).lower() != val.lower():
                return False
        elif not {"=": have == val, "<": have < val, "<=": have <= val, ">": have > val,
                  ">=": have >= val}[op]:
            return False
    return True


def _cloud_cover(seed: int, zone_key: int, day: str) -> float:
    h = hashlib.sha256(f"{seed}:{zone_key}:{day}".encode()).digest()
    return round(int.from_bytes(h[:4], "little") / 2**32 * 100.0, 2)


def catalog_search(state: EndpointState, body: dict[str, Any]) -> dict[str, Any]:
    cfg = state.config
    cols = body.get("collections") or []
    if len(cols) != 1 or cols[0] not in (S2_TYPE, S1_TYPE):
        raise HTTPFault(400, f"Expected one collection of {S2_TYPE}, {S1_TYPE}. Got {cols}.")
    col = cols[0]
    bbox = body.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise HTTPFault(400, "Expected 'bbox' [min_lon, min_lat, max_lon, max_lat].")
    try:
        t0, t1 = (np.datetime64(s.rstrip("Z")[:10], "D") for s in str(body["datetime"]).split("/"))
    except (KeyError, ValueError) as exc:
        raise HTTPFault(400, "Expected 'datetime' as 'start/end'.") from exc
    clauses = _parse_filter(body.get("filter"))
    zones = range(int(zone_of_lon(bbox[0])), int(zone_of_lon(bbox[2])) + 1)
    hemis = [s for s, on in ((True, bbox[1] < 0), (False, bbox[3] >= 0)) if on]
    items: dict[str, dict[str, Any]] = {}
    for zone in zones:
        for south in hemis:
            probe = Tile(zone=zone, south=south, x0=0, y0=0, size_px=256)
            for year in range(int(str(t0)[:4]), int(str(t1)[:4]) + 1):
                streams = [("", state.world.s2_dates(probe, year))] if col == S2_TYPE else [
                    (o, state.world.s1_dates(probe, year, o)) for o in ("ascending", "descending")
                ]
                for orbit, dates in streams:
                    for d in dates[(dates >= t0) & (dates <= t1)]:
                        day = str(d)
                        if cfg.months and int(day[5:7]) not in cfg.months:
                            continue
                        props: dict[str, Any] = {
                            "datetime": f"{day}T{(_S1_HOUR if orbit else _S2_HOUR)[orbit]}Z",
                            "platform": "sentinel-2a" if col == S2_TYPE else "sentinel-1a",
                        }
                        if col == S2_TYPE:
                            props["eo:cloud_cover"] = _cloud_cover(
                                cfg.world.seed, zone * 2 + south, day
                            )
                        else:
                            props |= {"sat:orbit_state": orbit, **_S1_PROPS}
                        if not _matches(props, clauses):
                            continue
                        iid = f"{col}_{zone:02d}{'S' if south else 'N'}_{day}_{orbit or 'l2a'}"
                        items[iid] = {
                            "type": "Feature", "stac_version": "1.0.0", "id": iid,
                            "bbox": bbox, "geometry": _bbox_polygon(bbox), "properties": props,
                            "collection": col, "links": [], "assets": {},
                        }
    ordered = [items[k] for k in sorted(items, key=lambda k: (items[k]["properties"]["datetime"], k))]
    limit = min(int(body.get("limit") or 10), cfg.catalog_page_size)
    start = int(body.get("next") or 0)
    page = ordered[start : start + limit]
    context: dict[str, Any] = {"limit": limit, "returned": len(page)}
    if start + limit < len(ordered):
        context["next"] = start + limit
    return {"type": "FeatureCollection", "features": page, "links": [], "context": context}


def _bbox_polygon(b: list[float]) -> dict[str, Any]:
    x0, y0, x1, y1 = b
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


# --- process ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessSpec:
    """What a Process request asks for, validated."""

    kind: str
    zone: int
    south: bool
    x0: int
    top: int
    width: int
    height: int
    day: np.datetime64 | None
    bands: tuple[str, ...]
    sample_type: str
    orbit: str
    harmonize: bool
    responses: tuple[tuple[str, str], ...]


def parse_process(state: EndpointState, body: dict[str, Any]) -> ProcessSpec:
    try:
        inp, out = body["input"], body["output"]
        bounds = inp["bounds"]
        crs = str(bounds.get("properties", {}).get("crs", ""))
        x0, y0, x1, y1 = (float(v) for v in bounds["bbox"])
        data = inp["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise HTTPFault(400, f"Expected input.bounds.bbox, input.data and output. Missing {exc}.") from exc
    m = re.search(r"EPSG/0/(32[67]\d\d)$", crs)
    if not m:
        raise HTTPFault(400, f"Expected a UTM CRS (EPSG:326zz/327zz). Got {crs!r}.")
    epsg = int(m.group(1))
    width, height = out.get("width"), out.get("height")
    if width is None and out.get("resx"):
        width, height = round((x1 - x0) / out["resx"]), round((y1 - y0) / out["resy"])
    if not width or not height:
        raise HTTPFault(400, "Expected output.width/height or resx/resy.")
    width, height = int(width), int(height)
    if width > MAX_PX or height > MAX_PX:
        raise HTTPFault(400, f"Expected at most {MAX_PX} x {MAX_PX} px. Got {width} x {height}.")
    on_grid = all(abs(v / PIXEL_M - round(v / PIXEL_M)) < 1e-6 for v in (x0, y0, x1, y1))
    if not on_grid or abs(x1 - x0 - width * PIXEL_M) > 1e-6 or abs(y1 - y0 - height * PIXEL_M) > 1e-6:
        raise HTTPFault(400, "Expected a bbox on the 10 m UTM grid with 10 m pixels (the local "
                        f"endpoint does not resample). Got {[x0, y0, x1, y1]} at {width} x {height}.")
    if len(data) != 1:
        raise HTTPFault(400, f"Expected one input.data entry. Got {len(data)}.")
    d = data[0]
    kind = d.get("type")
    if kind not in (S2_TYPE, S1_TYPE):
        raise HTTPFault(400, f"Expected data type {S2_TYPE} or {S1_TYPE}. Got {kind!r}.")
    flt = d.get("dataFilter", {})
    proc = d.get("processing", {}) or {}
    tr = flt.get("timeRange", {})
    try:
        t0 = np.datetime64(str(tr["from"])[:10], "D")
        t1 = np.datetime64(str(tr["to"])[:10], "D")
    except (KeyError, ValueError) as exc:
        raise HTTPFault(400, "Expected dataFilter.timeRange from/to.") from exc
    script = str(body.get("evalscript", ""))
    bm = re.search(r"bands\s*:\s*\[([^\]]*)\]", script)
    sm = re.search(r'sampleType\s*:\s*"(\w+)"', script)
    if not bm:
        raise HTTPFault(400, "Expected an evalscript whose setup() lists input bands.")
    bands = tuple(re.findall(r'"(\w+)"', bm.group(1)))
    sample = (sm.group(1) if sm else "AUTO").upper()
    orbit = ""
    if kind == S2_TYPE:
        known = {*S2_BANDS, "SCL", "dataMask"}
        if sample not in ("UINT16", "AUTO"):
            raise HTTPFault(400, f"Expected sampleType UINT16 for S2 DN. Got {sample}.")
        harmonize = bool(proc.get("harmonizeValues", True))
    else:
        known = {"VV", "VH", "dataMask"}
        if sample != "FLOAT32":
            raise HTTPFault(400, f"Expected sampleType FLOAT32 for S1 linear power. Got {sample}.")
        orbit = str(flt.get("orbitDirection", "")).lower()
        if orbit not in ("ascending", "descending"):
            raise HTTPFault(400, "Expected dataFilter.orbitDirection ASCENDING or DESCENDING "
                            "(the local endpoint serves one orbit per request).")
        if proc.get("backCoeff", "GAMMA0_ELLIPSOID") not in _BACK_COEFF:
            raise HTTPFault(400, f"Unknown backCoeff {proc.get('backCoeff')!r}.")
        if proc.get("demInstance", "COPERNICUS") not in _DEM:
            raise HTTPFault(400, f"Unknown demInstance {proc.get('demInstance')!r}.")
        harmonize = False
    unknown = [b for b in bands if b not in known]
    if unknown:
        raise HTTPFault(400, f"Unknown band(s) {unknown} for {kind}.")
    responses = tuple(
        (r.get("identifier", "default"), r.get("format", {}).get("type", "image/tiff"))
        for r in out.get("responses", [{"identifier": "default"}])
    )
    zone, south = epsg % 100, epsg >= 32700
    day = _pick_date(state, kind, zone, south, orbit, t0, t1)
    return ProcessSpec(kind, zone, south, int(round(x0)), int(round(y1)), width, height, day,
                       bands, "UINT16" if kind == S2_TYPE else "FLOAT32", orbit, harmonize,
                       responses)


def _pick_date(state: EndpointState, kind: str, zone: int, south: bool, orbit: str,
               t0: np.datetime64, t1: np.datetime64) -> np.datetime64 | None:
    """The most recent acquisition in [t0, t1] (mosaicking: one scene per request)."""
    probe = Tile(zone=zone, south=south, x0=0, y0=0, size_px=256)
    found: list[np.datetime64] = []
    for year in range(int(str(t0)[:4]), int(str(t1)[:4]) + 1):
        dates = state.world.s2_dates(probe, year) if kind == S2_TYPE else state.world.s1_dates(
            probe, year, orbit)  # type: ignore[arg-type]
        months = state.config.months
        found += [d for d in dates[(dates >= t0) & (dates <= t1)]
                  if not months or int(str(d)[5:7]) in months]
    return max(found) if found else None


def render(state: EndpointState, spec: ProcessSpec) -> np.ndarray:
    """(H, W, len(bands)) of the synthetic Earth for a spec, in its sample type."""
    h, w = spec.height, spec.width
    dtype = np.uint16 if spec.sample_type == "UINT16" else np.float32
    if spec.day is None:
        return np.zeros((h, w, len(spec.bands)), dtype)
    size = max(256, math.ceil(max(h, w) / 256) * 256)
    tile = Tile(zone=spec.zone, south=spec.south, x0=spec.x0, y0=spec.top, size_px=size)
    days = np.array([spec.day], dtype="datetime64[D]")
    layers: dict[str, np.ndarray] = {}
    if spec.kind == S2_TYPE:
        st = state.world.read_s2(tile, days)
        dn = st.bands[0, :h, :w]
        if spec.harmonize and spec.day >= np.datetime64(BASELINE_0400_START):
            dn = np.where(dn > S2_DN_OFFSET, dn - S2_DN_OFFSET, 0).astype(np.uint16)
        scl = st.scl[0, :h, :w]
        layers = {b: dn[..., i] for i, b in enumerate(S2_BANDS)}
        layers["SCL"] = scl.astype(np.uint16)
        layers["dataMask"] = (scl != 0).astype(np.uint16)
    else:
        v = state.world.read_s1(tile, days, spec.orbit).values[0, :h, :w]  # type: ignore[arg-type]
        layers = {"VV": v[..., 0], "VH": v[..., 1], "dataMask": np.ones((h, w), np.float32)}
    return np.stack([layers[b].astype(dtype) for b in spec.bands], -1)


def encode_tiff(arr: np.ndarray, spec: ProcessSpec) -> bytes:
    """A GeoTIFF like Sentinel Hub's: big-endian, deflate, 8-row strips, pixel-interleaved."""
    epsg = (32700 if spec.south else 32600) + spec.zone
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    extratags = [
        (33550, "d", 3, (PIXEL_M, PIXEL_M, 0.0), False),
        (33922, "d", 6, (0.0, 0.0, 0.0, float(spec.x0), float(spec.top), 0.0), False),
        (34735, "H", len(geokeys), geokeys, False),
    ]
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, byteorder=">", compression=tifffile.COMPRESSION.DEFLATE, rowsperstrip=8,
                     photometric="minisblack", planarconfig="contig", extratags=extratags)
    return buf.getvalue()


def encode_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o100644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def process(state: EndpointState, body: dict[str, Any]) -> tuple[bytes, str]:
    if state.faults.permanent == "400":
        raise HTTPFault(400, "Request rejected: invalid processing request (injected).")
    spec = parse_process(state, body)
    arr = render(state, spec)
    tif = encode_tiff(arr, spec)
    if len(spec.responses) == 1:
        return tif, "image/tiff"
    members: dict[str, bytes] = {}
    for ident, fmt in spec.responses:
        if fmt == "application/json":
            members[f"{ident}.json"] = json.dumps({"date": str(spec.day) if spec.day else None}).encode()
        else:
            members[f"{ident}.tif"] = tif
    return encode_tar(members), "application/x-tar"


# --- HTTP --------------------------------------------------------------------------------------
_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "LocalSentinelHub/1.0"
    state: EndpointState  # set on the subclass per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # quiet: never echo requests (they carry tokens in headers)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        with self.state.lock:
            self.state.stats.bytes_out += len(body)

    def _error(self, fault: HTTPFault, oauth: bool = False) -> None:
        if oauth:
            body = {"error": fault.message, "error_description": "Invalid client credentials"}
        else:
            body = {"error": {"status": fault.status, "reason": _REASONS.get(fault.status, "Error"),
                              "message": fault.message, "code": "COMMON_EXCEPTION"}}
        self._send(fault.status, json.dumps(body).encode(), "application/json", fault.headers)

    def do_POST(self) -> None:  # noqa: N802
        st = self.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urllib.parse.urlparse(self.path).path
        try:
            if path == "/oauth/token":
                form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
                try:
                    tok = issue_token(st, form)
                except HTTPFault as f:
                    self._error(f, oauth=True)
                    return
                self._send(200, json.dumps(tok).encode(), "application/json")
                return
            if path not in ("/api/v1/catalog/1.0.0/search", "/api/v1/process"):
                raise HTTPFault(404, f"No such endpoint {path}.")
            is_process = path.endswith("process")
            with st.lock:
                if is_process:
                    st.stats.process += 1
                else:
                    st.stats.catalog += 1
            token = check_bearer(st, self.headers.get("Authorization"))
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                raise HTTPFault(400, "Expected a JSON body.") from exc
            allowed = ("429", "500", "503", "slow", "expired_token")
            if is_process:
                allowed += ("truncated", "corrupt")
            fault = st.draw_fault(hashlib.sha256(path.encode() + raw).hexdigest(), allowed)
            if fault == "429":
                raise HTTPFault(429, "Rate limit exceeded.",
                                {"Retry-After": str(st.faults.retry_after_ms)})
            if fault in ("500", "503"):
                raise HTTPFault(int(fault), "Injected server error.")
            if fault == "expired_token":
                with st.lock:
                    st.revoked.add(token)
                raise HTTPFault(401, "Token expired.")
            if fault == "slow":
                time.sleep(st.faults.slow_s)
            if not is_process:
                self._send(200, json.dumps(catalog_search(st, body)).encode(), "application/json")
                return
            memo_key = hashlib.sha256(raw).hexdigest()
            hit = st.memo.get(memo_key) if st.config.memo_responses else None
            data, ctype = hit or process(st, body)
            if st.config.memo_responses and hit is None:
                with st.lock:
                    if len(st.memo) < st.config.memo_responses:
                        st.memo[memo_key] = (data, ctype)
            if fault == "truncated":
                data = data[: len(data) // 2]
            elif fault == "corrupt":
                data = b"\x00CORRUPT" + data[8:]
            with st.lock:
                st.stats.process_ok += 1
            self._send(200, data, ctype)
        except HTTPFault as f:
            self._error(f)
        except Exception as exc:  # a bug in the endpoint: answer 500 like a real service would
            self._error(HTTPFault(500, f"Internal error: {type(exc).__name__}: {exc}"))


class LocalEndpoint(LoopbackServer):
    """The local Sentinel Hub endpoint, served from a background thread.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``url`` is the base URL
    (``http://127.0.0.1:<port>``); the token URL is ``{url}/oauth/token``.
    """

    thread_name = "shub-endpoint"
    handler = _Handler

    def __init__(self, config: EndpointConfig | None = None) -> None:
        self.state = EndpointState(config or EndpointConfig())
        super().__init__()

    @property
    def stats(self) -> Stats:
        return self.state.stats

    def set_faults(self, faults: FaultConfig) -> None:
        """Inject these faults from now on."""
        self.state.set_faults(faults)

    def reset(self) -> None:
        """No faults, zeroed statistics, no issued tokens (between tests)."""
        self.state.set_faults(FaultConfig())
        with self.state.lock:
            self.state.stats = Stats()
            self.state.tokens.clear()
            self.state.revoked.clear()
