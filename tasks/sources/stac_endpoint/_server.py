"""A loopback HTTP server speaking the STAC API, SAS-token and blob subsets the source uses.

Routes (``{base}`` = ``http://host:port``):

- ``/pc/api/stac/v1`` — Planetary Computer-like STAC API: landing page, ``/conformance``,
  ``GET``/``POST /search`` (``collections``, ``bbox``, ``datetime``, ``query`` on
  ``eo:cloud_cover``/``sat:orbit_state``, ``limit``), paged with ``next`` links carrying a
  ``token``; collections ``sentinel-2-l2a`` and ``sentinel-1-rtc``. Hrefs point at Azure blob
  hosts, as on Planetary Computer.
- ``/pc/api/sas/v1/token/{account}/{container}`` (what the planetary-computer package asks)
  and ``/pc/api/sas/v1/token/{collection}``: ``{"msft:expiry", "token"}``; with
  ``subscription_key`` set, the ``Ocp-Apim-Subscription-Key`` header must match (else 401).
- ``/blob/{account}/{container}/...`` — the blob store behind those hosts: byte ranges of the
  COGs, only with a valid, unexpired SAS token (else 403 ``AuthenticationFailed``).
- ``/es/v1`` — Earth Search-like STAC API (collection ``sentinel-2-l2a``, common-name asset
  keys); ``/cogs/...`` its unsigned COGs.

Faults (:class:`FaultConfig`) hit blob and COG answers; see there.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import json
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
from pydantic import SecretStr

from tasks.sources._loopback import LoopbackServer
from tasks.sources.stac_endpoint._config import EndpointConfig, FaultConfig
from tasks.sources.stac_endpoint._world import BLOB_HOSTS, World

API = {"pc": "/pc/api/stac/v1", "es": "/es/v1"}
SAS = "/pc/api/sas/v1/token"
COLLECTIONS = {"pc": ("sentinel-2-l2a", "sentinel-1-rtc"), "es": ("sentinel-2-l2a",)}
_CONFORMS = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]


class HTTPFault(Exception):
    """An error answer."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        super().__init__(message)


@dataclass
class Stats:
    """What the endpoint answered (for tests and benchmarks)."""

    searches: int = 0
    sas: int = 0
    blob: int = 0
    blob_ok: int = 0
    bytes_out: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)


class EndpointState:
    """Shared state: config, the world, fault draws and statistics."""

    def __init__(self, config: EndpointConfig, subscription_key: SecretStr | None) -> None:
        self.config = config
        self.world = World(config)
        self.subscription_key = subscription_key
        self.secret = hashlib.sha256(f"local-sas-{config.world.seed}".encode()).digest()
        self.lock = threading.Lock()
        self.stats = Stats()
        self.rng = random.Random(config.faults.seed)
        self.fault_counts: dict[str, int] = {}

    @property
    def faults(self) -> FaultConfig:
        return self.config.faults

    def set_faults(self, faults: FaultConfig) -> None:
        with self.lock:
            self.config = self.config.model_copy(update={"faults": faults})
            self.rng = random.Random(faults.seed)
            self.fault_counts.clear()

    def draw(self, key: str, rate: float, kinds: tuple[str, ...]) -> str | None:
        f = self.faults
        with self.lock:
            if rate <= 0 or self.fault_counts.get(key, 0) >= f.max_per_request:
                return None
            if self.rng.random() >= rate:
                return None
            kind = self.rng.choice(kinds)
            self.fault_counts[key] = self.fault_counts.get(key, 0) + 1
            self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
            return kind

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    # --- SAS ---------------------------------------------------------------------------------
    def sign(self, account: str, container: str, expiry: int) -> str:
        msg = f"{account}/{container}/{expiry}".encode()
        return base64.urlsafe_b64encode(hmac.new(self.secret, msg, hashlib.sha256).digest()
                                        ).decode().rstrip("=")

    def token(self, account: str, container: str) -> dict[str, Any]:
        now = int(time.time())
        se = now + self.config.sas_expiry_s
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(se))
        tok = (f"st={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now - 60))}&se={stamp}"
               f"&sp=rl&sv=2024-05-04&sr=c&skoid=local&sig={self.sign(account, container, se)}")
        return {"msft:expiry": stamp, "token": tok}

    def check_sas(self, account: str, container: str, query: dict[str, str]) -> None:
        se, sig = query.get("se"), query.get("sig")
        if not se or not sig:
            raise HTTPFault(403, "NoAuthenticationInformation",
                            "Server failed to authenticate the request: no SAS token.")
        try:
            expiry = calendar.timegm(time.strptime(se, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            raise HTTPFault(403, "AuthenticationFailed", "Malformed se.") from None
        if expiry < time.time() or not hmac.compare_digest(sig, self.sign(account, container,
                                                                          expiry)):
            raise HTTPFault(403, "AuthenticationFailed",
                            "Signature did not match or the token expired.")

    # --- search ------------------------------------------------------------------------------
    def search(self, flavour: str, params: dict[str, Any], base: str) -> dict[str, Any]:
        cols = params.get("collections") or list(COLLECTIONS[flavour])
        if isinstance(cols, str):
            cols = cols.split(",")
        unknown = [c for c in cols if c not in COLLECTIONS[flavour]]
        if unknown:
            raise HTTPFault(404, "NotFound", f"Collection {unknown[0]!r} not found.")
        bbox = params.get("bbox")
        if isinstance(bbox, str):
            bbox = [float(v) for v in bbox.split(",")]
        if not bbox or len(bbox) != 4:
            raise HTTPFault(400, "BadRequest", "Expected bbox [minlon, minlat, maxlon, maxlat].")
        start, end = _interval(params.get("datetime"))
        query = params.get("query") or {}
        if isinstance(query, str):
            query = json.loads(query)
        limit = min(int(params.get("limit") or 10), self.config.page_size_max)
        offset = int(str(params.get("token") or "off:0").split(":", 1)[1])
        feats = []
        for col in cols:
            kinds = ["s2"] if col == "sentinel-2-l2a" else ["ascending", "descending"]
            for g in self.world.granules(tuple(bbox)):  # type: ignore[arg-type]
                for kind in kinds:
                    for d in self.world.dates(g, kind, start, end):
                        feats.append(self.world.item(flavour, kind, g, d, base))
        feats = [f for f in feats if _matches(f["properties"], query)]
        feats.sort(key=lambda f: (f["properties"]["datetime"], f["id"]))
        page = feats[offset : offset + limit]
        search_url = f"{base}{API[flavour]}/search"
        links = [{"rel": "root", "href": f"{base}{API[flavour]}", "type": "application/json"}]
        if offset + limit < len(feats):
            nxt = {k: v for k, v in params.items() if k != "token"} | {
                "token": f"off:{offset + limit}"}
            links.append({"rel": "next", "href": search_url, "method": "POST",
                          "type": "application/geo+json", "body": nxt})
        self.count("searches")
        return {"type": "FeatureCollection", "features": page, "links": links,
                "numberReturned": len(page), "numberMatched": len(feats)}


def _interval(text: Any) -> tuple[np.datetime64, np.datetime64]:
    if not text:
        return np.datetime64("2017-01-01", "D"), np.datetime64("2030-12-31", "D")
    a, _, b = str(text).partition("/")
    lo = np.datetime64(a[:10], "D") if a and a != ".." else np.datetime64("2015-01-01", "D")
    hi = np.datetime64((b or a)[:10], "D") if (b or a) and (b or a) != ".." \
        else np.datetime64("2035-12-31", "D")
    return lo, hi


def _matches(props: dict[str, Any], query: dict[str, Any]) -> bool:
    ops = {"eq": lambda a, b: a == b, "lte": lambda a, b: a <= b, "gte": lambda a, b: a >= b,
           "lt": lambda a, b: a < b, "gt": lambda a, b: a > b, "neq": lambda a, b: a != b}
    for name, conds in query.items():
        if name not in props:
            return False
        for op, v in conds.items():
            if op not in ops:
                raise HTTPFault(400, "BadRequest", f"Unsupported query operator {op!r}.")
            if not ops[op](props[name], v):
                return False
    return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)
    state: EndpointState  # set on the subclass per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1'}"

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.state.count("bytes_out", len(body))

    def _json(self, obj: Any, status: int = 200, ctype: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), ctype)

    def _error(self, f: HTTPFault, xml: bool) -> None:
        if xml:  # Azure blob storage's error shape
            body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{f.code}</Code>'
                    f"<Message>{f.message}</Message></Error>").encode()
            self._send(f.status, body, "application/xml", f.headers)
        else:
            self._send(f.status, json.dumps({"code": f.code, "description": f.message}).encode(),
                       "application/json", f.headers)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urllib.parse.urlparse(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        self._route(url.path.rstrip("/"), query, None)

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urllib.parse.urlparse(self.path)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._error(HTTPFault(400, "BadRequest", "Expected a JSON body."), xml=False)
            return
        self._route(url.path.rstrip("/"), {}, body)

    def _route(self, path: str, query: dict[str, str], body: dict[str, Any] | None) -> None:
        st = self.state
        blob = path.startswith(("/blob/", "/cogs/"))
        try:
            for flavour, root in API.items():
                if path == root:
                    return self._json(self._landing(flavour))
                if path == f"{root}/conformance":
                    return self._json({"conformsTo": _CONFORMS})
                if path == f"{root}/search":
                    key = json.dumps(body if body is not None else query, sort_keys=True)
                    if st.draw(f"search|{key}", st.faults.search_rate, ("503",)):
                        raise HTTPFault(503, "ServiceUnavailable", "Try again.")
                    res = st.search(flavour, body if body is not None else query, self._base())
                    return self._json(res, ctype="application/geo+json")
            if path.startswith(SAS + "/"):
                return self._sas(path[len(SAS) + 1:])
            if blob:
                return self._blob(path, query)
            raise HTTPFault(404, "NotFound", f"No route {path!r}.")
        except HTTPFault as f:
            self._error(f, xml=blob)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug here must not hang the client
            self._error(HTTPFault(500, "InternalError", f"{type(exc).__name__}: {exc}"), xml=blob)

    def _landing(self, flavour: str) -> dict[str, Any]:
        root = f"{self._base()}{API[flavour]}"
        return {
            "type": "Catalog", "stac_version": "1.0.0", "id": f"local-{flavour}",
            "description": "Local STAC API serving the synthetic Earth", "conformsTo": _CONFORMS,
            "links": [
                {"rel": "self", "href": root, "type": "application/json"},
                {"rel": "root", "href": root, "type": "application/json"},
                {"rel": "conformance", "href": f"{root}/conformance"},
                {"rel": "search", "href": f"{root}/search", "method": "GET",
                 "type": "application/geo+json"},
                {"rel": "search", "href": f"{root}/search", "method": "POST",
                 "type": "application/geo+json"},
            ],
        }

    def _sas(self, rest: str) -> None:
        st = self.state
        if st.subscription_key is not None:
            got = self.headers.get("Ocp-Apim-Subscription-Key") or ""
            if not hmac.compare_digest(got, st.subscription_key.get_secret_value()):
                st.stats.refused["sas"] = st.stats.refused.get("sas", 0) + 1
                raise HTTPFault(401, "Unauthorized", "Access denied due to invalid subscription key.")
        parts = rest.split("/")
        if len(parts) == 2:
            account, container = parts
        elif len(parts) == 1 and parts[0] in ("sentinel-2-l2a", "sentinel-1-rtc"):
            account, container = BLOB_HOSTS["s2" if parts[0] == "sentinel-2-l2a" else "s1"]
        else:
            raise HTTPFault(404, "NotFound", f"No SAS target {rest!r}.")
        st.count("sas")
        self._json(st.token(account, container))

    def _blob(self, path: str, query: dict[str, str]) -> None:
        st = self.state
        st.count("blob")
        parts = path.strip("/").split("/")
        if parts[0] == "blob":
            account, container, rest = parts[1], parts[2], parts[3:]
            st.check_sas(account, container, query)
            kind_of = {v[0]: k for k, v in BLOB_HOSTS.items()}
            if account not in kind_of or BLOB_HOSTS[kind_of[account]][1] != container:
                raise HTTPFault(404, "ContainerNotFound", "The specified container does not exist.")
            flavour, s1 = "pc", kind_of[account] == "s1"
        else:  # /cogs/sentinel-s2-l2a-cogs/...
            rest, flavour, s1 = parts[2:], "es", False
        f = st.faults
        if f.permanent in ("401", "403"):
            raise HTTPFault(int(f.permanent), "AuthenticationFailed",
                            "Server failed to authenticate the request.")
        try:
            gid, day = rest[0], rest[1]
            kind = rest[2] if s1 else "s2"
            asset = rest[-1].removesuffix(".tif")
        except IndexError:
            raise HTTPFault(404, "BlobNotFound", "The specified blob does not exist.") from None
        if f.permanent == "missing-asset" and asset == f.missing_asset:
            raise HTTPFault(404, "BlobNotFound", "The specified blob does not exist.")
        rng = self.headers.get("Range")
        fault = st.draw(f"{path}|{rng}", f.rate, f.kinds)
        if fault in ("500", "503"):
            raise HTTPFault(int(fault), "ServerBusy", "The server is currently unable to "
                            "receive requests. Please retry your request.")
        if fault == "429":
            raise HTTPFault(429, "TooManyRequests", "Throttled.",
                            {"Retry-After": str(f.retry_after_s)})
        data = st.world.cog(flavour, kind, gid, day, asset)
        if data is None:
            raise HTTPFault(404, "BlobNotFound", "The specified blob does not exist.")
        status, headers, body = 200, {"Accept-Ranges": "bytes"}, data
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            lo = int(a)
            hi = min(int(b) if b else len(data) - 1, len(data) - 1)
            if lo >= len(data):
                raise HTTPFault(416, "InvalidRange", "The range specified is invalid.",
                                {"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[lo : hi + 1]
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "truncated":
            self.send_response(status)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        st.count("blob_ok")
        self._send(status, body, "image/tiff", headers)


class LocalEndpoint(LoopbackServer):
    """The local STAC endpoint, served from a background thread.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :meth:`stac_config` gives the
    ``source.stac`` settings that read from it as one of the presets would.
    """

    thread_name = "stac-endpoint"
    handler = _Handler

    def __init__(self, config: EndpointConfig | None = None,
                 subscription_key: SecretStr | None = None) -> None:
        self.state = EndpointState(config or EndpointConfig(), subscription_key)
        super().__init__()

    @property
    def stats(self) -> Stats:
        return self.state.stats

    @property
    def world(self) -> World:
        return self.state.world

    def set_faults(self, faults: FaultConfig) -> None:
        """Inject these faults from now on (resets the draws)."""
        self.state.set_faults(faults)

    def set_subscription_key(self, key: SecretStr | None) -> None:
        """Require this subscription key at the SAS endpoint from now on (None: any)."""
        with self.state.lock:
            self.state.subscription_key = key

    def reset(self) -> None:
        """No faults and zeroed statistics (between tests); rendered COGs stay cached."""
        self.state.set_faults(FaultConfig())
        with self.state.lock:
            self.state.stats = Stats()

    def stac_config(self, preset: str = "planetary-computer") -> dict[str, Any]:
        """``source.stac`` settings reading this endpoint the way ``preset`` reads the real
        catalogues (same asset naming, signing through the planetary-computer package, offset
        convention); only the URLs differ."""
        if preset not in ("planetary-computer", "earth-search"):
            raise ValueError(f"Expected preset 'planetary-computer' or 'earth-search'. Got {preset!r}.")
        u = self.url
        pc = f"{u}{API['pc']}"
        out = {"preset": preset, "api_url": pc, "sas_url": f"{u}{SAS}",
               "blob_mirror_url": f"{u}/blob"}
        if preset == "earth-search":
            out |= {"api_url": f"{u}{API['es']}", "s1_api_url": pc}
        return out
