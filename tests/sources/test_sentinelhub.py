"""The Sentinel Hub source through the real sentinelhub-py client against the local endpoint."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from pydantic import SecretStr, ValidationError

from tasks.acquire import acquire, make_source, scenes_uri
from tasks.config import DPixelConfig, MaskConfig, SourceConfig, StorageConfig
from tasks.dpixels import extract_dpixels
from tasks.errors import ConfigError
from tasks.grid import Tile
from tasks.mask import cloud_mask
from tasks.sources._sh_requests import decode_tiff, request_pu, split_tile, tile_pu
from tasks.sources.base import SceneSource
from tasks.sources.sentinelhub import (
    PUBudgetError,
    SentinelHubConfig,
    SentinelHubCredentials,
    SentinelHubPermanentError,
    SentinelHubSource,
    estimate_acquisition,
    plan_acquisition,
    resolve_credentials,
    should_retry,
)
from tasks.sources.shub_endpoint import FaultConfig
from tasks.sources.synthetic import SyntheticSource

from .conftest import SH_CLIENT_ID, SH_CLIENT_SECRET

TILE = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
YEAR = 2024
REAL_TAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "sentinelhub-process-response.tar"
"""A real Process API response (shared/ beside the repository root)."""
GOOD = SentinelHubCredentials(SH_CLIENT_ID, SecretStr(SH_CLIENT_SECRET))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # sentinelhub-py's config file
    monkeypatch.setenv("SH_CLIENT_ID", SH_CLIENT_ID)
    monkeypatch.setenv("SH_CLIENT_SECRET", SH_CLIENT_SECRET)


def _source_cfg(url: str, **kw) -> SourceConfig:
    sh = {"preset": "custom", "base_url": url, "download_sleep_s": 0.01, **kw}
    return SourceConfig.model_validate({"kind": "sentinelhub", "sentinelhub": sh})


def _storage(root: Path) -> StorageConfig:
    return StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))


def _arrays(uri: str) -> dict[str, bytes]:
    g = zarr.open_group(uri, mode="r")
    return {name: np.asarray(a[...]).tobytes() for name, a in g.arrays()}


class JuneSynthetic:
    """The synthetic Earth restricted to June, like the test endpoint (EndpointConfig.months)."""

    name = "synthetic"

    def __init__(self) -> None:
        self.inner = SyntheticSource()

    @staticmethod
    def _june(d: np.ndarray) -> np.ndarray:
        return d[d.astype("datetime64[M]").astype(int) % 12 == 5]

    def s2_dates(self, tile, year):
        return self._june(self.inner.s2_dates(tile, year))

    def s1_dates(self, tile, year, orbit):
        return self._june(self.inner.s1_dates(tile, year, orbit))

    def read_s2(self, tile, dates):
        return self.inner.read_s2(tile, dates)

    def read_s1(self, tile, dates, orbit):
        return self.inner.read_s1(tile, dates, orbit)


# --- config and pure helpers -------------------------------------------------------------------
def test_config_defaults_and_validation():
    assert SourceConfig().kind == "synthetic"
    cfg = SourceConfig(kind="sentinelhub")
    assert cfg.sentinelhub.urls()[0] == "https://sh.dataspace.copernicus.eu"
    assert SentinelHubConfig(preset="sentinelhub").urls()[0] == "https://services.sentinel-hub.com"
    with pytest.raises(ValidationError, match="base_url"):
        SentinelHubConfig(preset="custom")
    with pytest.raises(ValidationError, match="orthorectify"):
        SentinelHubConfig(s1_orthorectify=False)
    with pytest.raises(ValidationError):
        SentinelHubConfig(max_request_px=4000)
    # the config names credentials, it cannot hold them
    with pytest.raises(ValidationError):
        SentinelHubConfig.model_validate({"client_secret": "x"})
    assert "SH_CLIENT_SECRET" in cfg.model_dump_json()  # the variable's name, not a value


def test_plain_http_only_on_loopback():
    with pytest.raises(ConfigError, match="https"):
        SentinelHubSource(SentinelHubConfig(preset="custom", base_url="http://example.org"), GOOD)


def test_split_tile_covers_once():
    wins = split_tile(4096, 2500)
    assert len(wins) == 4 and {(w.height, w.width) for w in wins} == {(2048, 2048)}
    cover = np.zeros((1000, 1000), int)
    for w in split_tile(1000, 300):
        cover[w.row : w.row + w.height, w.col : w.col + w.width] += 1
    assert (cover == 1).all()
    assert split_tile(256, 2500) == [split_tile(256, 256)[0]]


def test_processing_units():
    assert request_pu(512, 512, 3, 16) == pytest.approx(1.0)
    assert request_pu(512, 512, 3, 32) == pytest.approx(2.0)
    assert request_pu(10, 10, 1, 8) == 0.005  # minimum per request
    # 256 px tile: S2 12 bands 16 bit -> 1 PU; S1 3 bands float32 orthorectified -> 1 PU
    assert tile_pu(256, 2500, 2, 3, True) == pytest.approx(2 * 1.0 + 3 * 1.0)


def test_decode_rejects_truncated_and_corrupt():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ones((8, 8, 3), np.uint16))
    body = buf.getvalue()
    assert decode_tiff(body, 8, 8, 3, "uint16").shape == (8, 8, 3)
    for bad in (body[: len(body) // 2], b"\x00CORRUPT" + body[8:]):
        with pytest.raises(ValueError, match="Expected"):
            decode_tiff(bad, 8, 8, 3, "uint16")
    with pytest.raises(ValueError, match="shape"):
        decode_tiff(body, 8, 8, 4, "uint16")


def test_no_process_wide_insecure_transport(shub_endpoint, monkeypatch):
    """Plain http to the loopback endpoint works without setting OAUTHLIB_INSECURE_TRANSPORT
    for the whole process."""
    monkeypatch.delenv("OAUTHLIB_INSECURE_TRANSPORT", raising=False)
    src = SentinelHubSource(SentinelHubConfig(preset="custom", base_url=shub_endpoint.url), GOOD)
    assert len(src.s2_dates(TILE, YEAR)) > 0
    import os

    assert "OAUTHLIB_INSECURE_TRANSPORT" not in os.environ


def test_resolve_credentials_env_and_block():
    cfg = SentinelHubConfig(client_id_env="MY_ID", client_secret_env="MY_SECRET")
    c = resolve_credentials(cfg, environ={"MY_ID": "the-id", "MY_SECRET": "the-secret"})
    assert (c.client_id, c.client_secret.get_secret_value()) == ("the-id", "the-secret")
    assert "the-secret" not in repr(c) and "the-secret" not in str(c)
    with pytest.raises(ConfigError, match="MY_SECRET") as err:
        resolve_credentials(cfg, environ={"MY_ID": "the-id"})
    assert "the-id" not in str(err.value)
    blk = SentinelHubConfig(secret_block="sh-creds")
    c = resolve_credentials(blk, loader=lambda slug, n: {"value": {"client_id": "i", "client_secret": "s"}})
    assert c.client_id == "i"
    with pytest.raises(ConfigError, match="sh-creds"):
        resolve_credentials(blk, loader=lambda slug, n: {"value": "not json"})


# --- through the real client -------------------------------------------------------------------
def test_is_a_scene_source(shub_endpoint):
    src = make_source(_source_cfg(shub_endpoint.url))
    assert isinstance(src, SceneSource) and src.name == "sentinelhub"


def test_catalog_paging_and_cloud_filter(shub_endpoint):
    src = SentinelHubSource(SentinelHubConfig(preset="custom", base_url=shub_endpoint.url), GOOD)
    all_dates = src.s2_dates(TILE, YEAR)
    assert len(all_dates) > 4 and shub_endpoint.stats.catalog >= 2  # page size 4: paged
    expected = JuneSynthetic().s2_dates(TILE, YEAR)
    np.testing.assert_array_equal(all_dates, expected)
    for orbit in ("ascending", "descending"):
        np.testing.assert_array_equal(
            src.s1_dates(TILE, YEAR, orbit), JuneSynthetic().s1_dates(TILE, YEAR, orbit)
        )
    cloudy = SentinelHubSource(
        SentinelHubConfig(preset="custom", base_url=shub_endpoint.url, max_cloud_cover=50), GOOD
    ).s2_dates(TILE, YEAR)
    assert set(cloudy.tolist()) < set(all_dates.tolist())


@pytest.mark.parametrize(
    "options", [{}, {"harmonize_values": False, "max_request_px": 128, "max_threads": 3}],
    ids=["harmonised", "raw-dn-split"],
)
def test_dpixels_equal_synthetic(shub_endpoint, tmp_path, options):
    """Same region through Sentinel Hub and the synthetic source: identical d-pixels."""
    results = []
    for name, src_cfg, src in (
        ("sh", _source_cfg(shub_endpoint.url, **options), None),
        ("syn", SourceConfig(), JuneSynthetic()),
    ):
        storage = _storage(tmp_path / name)
        scenes = acquire(TILE, YEAR, src_cfg, storage, scene_source=src)
        m = cloud_mask(scenes, MaskConfig(), storage)
        dp = extract_dpixels(scenes, m, DPixelConfig(), storage)
        results.append((scenes, _arrays(dp.uri)))
    (sh_scenes, sh_dp), (syn_scenes, syn_dp) = results
    assert sh_scenes.n_s2 > 0 and sh_scenes.n_s1_ascending > 0
    assert sh_dp.keys() == syn_dp.keys() and "bands" in sh_dp
    for k in sh_dp:
        assert sh_dp[k] == syn_dp[k], k
    offsets = zarr.open_group(sh_scenes.uri, mode="r")["s2_offset"][...]
    assert (offsets == (0 if options.get("harmonize_values", True) else 1000)).all()
    if "max_request_px" in options:  # 256 px tile in 2 x 2 windows per date
        assert shub_endpoint.stats.process == 4 * (
            sh_scenes.n_s2 + sh_scenes.n_s1_ascending + sh_scenes.n_s1_descending
        )


def test_faults_give_identical_scenes(shub_endpoint, tmp_path):
    """429 (Retry-After ms), 5xx, slow, truncated, corrupt, expired token at a fixed rate."""
    cfg = _source_cfg(shub_endpoint.url, max_threads=4)
    clean = acquire(TILE, YEAR, cfg, _storage(tmp_path / "clean"))
    shub_endpoint.set_faults(FaultConfig(rate=0.35, seed=7, slow_s=0.1, retry_after_ms=10))
    faulty = acquire(TILE, YEAR, cfg, _storage(tmp_path / "faulty"))
    injected = shub_endpoint.stats.faults
    assert sum(injected.values()) >= 5 and len(injected) >= 4, injected
    assert _arrays(faulty.uri) == _arrays(clean.uri)
    assert faulty.key == clean.key


def test_rerun_reads_response_cache(shub_endpoint, tmp_path):
    storage = _storage(tmp_path)
    cfg = _source_cfg(shub_endpoint.url)
    first = acquire(TILE, YEAR, cfg, storage)
    n = shub_endpoint.stats.process
    # a retried task whose scenes were not committed: responses come from the cache
    Path(first.uri + ".done.json").unlink()
    again = acquire(TILE, YEAR, cfg, storage)
    assert shub_endpoint.stats.process == n and n > 0
    assert _arrays(again.uri) == _arrays(first.uri)


@pytest.mark.parametrize("fault", ["401", "400"])
def test_permanent_failure_fails_fast(shub_endpoint, tmp_path, fault):
    shub_endpoint.set_faults(FaultConfig(permanent=fault))
    storage = _storage(tmp_path)
    cfg = _source_cfg(shub_endpoint.url, download_sleep_s=5.0, max_threads=4)
    t0 = time.monotonic()
    with pytest.raises(SentinelHubPermanentError) as err:
        acquire(TILE, YEAR, cfg, storage)
    assert time.monotonic() - t0 < 5.0  # no back-off sleeps: 4xx are not retried
    msg = str(err.value)
    assert TILE.id in msg
    if fault == "401":
        assert err.value.cause == "credentials" and "SH_CLIENT_ID" in msg
        assert shub_endpoint.stats.token == 1 and shub_endpoint.stats.process == 0
    else:
        assert err.value.cause == "request" and "HTTP 400" in msg
        assert shub_endpoint.stats.process <= 4  # at most one per thread, then cancelled
    uri, _ = scenes_uri(TILE, YEAR, cfg, storage)
    assert not Path(uri).exists() and not Path(uri + ".done.json").exists()

    from prefect.states import Failed

    assert should_retry(None, None, Failed(data=err.value)) is False
    assert should_retry(None, None, Failed(data=RuntimeError("transient"))) is True


def test_bad_secret_fails_fast(shub_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SH_CLIENT_SECRET", "wrong-secret")
    with pytest.raises(SentinelHubPermanentError, match="credentials") as err:
        acquire(TILE, YEAR, _source_cfg(shub_endpoint.url), _storage(tmp_path))
    assert "wrong-secret" not in str(err.value) and TILE.id in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_pu_budget_fails_before_first_process_request(shub_endpoint, tmp_path):
    cfg = _source_cfg(shub_endpoint.url, pu_budget=1.0)
    src = make_source(cfg, _storage(tmp_path))
    with pytest.raises(PUBudgetError, match="pu_budget=1"):
        plan_acquisition([TILE], YEAR, src)
    with pytest.raises(PUBudgetError, match=TILE.id):
        acquire(TILE, YEAR, cfg, _storage(tmp_path))
    assert shub_endpoint.stats.process == 0 and shub_endpoint.stats.catalog > 0
    ok = estimate_acquisition([TILE], YEAR, _source_cfg(shub_endpoint.url, pu_budget=1e4).sentinelhub,
                              _storage(tmp_path))
    assert ok.total_pu == pytest.approx(ok.tiles[0].n_s2 + ok.tiles[0].n_s1_ascending
                                        + ok.tiles[0].n_s1_descending)
    assert f"| {TILE.id} |" in ok.markdown()


def test_credentials_never_leak(shub_endpoint, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    shub_endpoint.set_faults(FaultConfig(rate=0.4, seed=3, kinds=("expired_token", "500", "429"),
                                         retry_after_ms=5))
    storage = _storage(tmp_path)
    cfg = _source_cfg(shub_endpoint.url)
    src = make_source(cfg, storage)
    ref = acquire(TILE, YEAR, cfg, storage, scene_source=src)
    plan = plan_acquisition([TILE], YEAR, src)
    tokens = list(shub_endpoint.state.tokens)
    assert len(tokens) >= 2  # the expired-token faults made the client renew
    secrets = [SH_CLIENT_SECRET, *tokens]
    texts = [caplog.text, ref.model_dump_json(), cfg.model_dump_json(), plan.markdown(), repr(src.config)]
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert files
    for s in secrets:
        for t in texts:
            assert s not in t
        for p in files:
            assert s.encode() not in p.read_bytes(), p
    assert "requests_oauthlib" not in caplog.text  # the library logs request bodies at DEBUG


def test_tar_response_matches_real_framing(shub_endpoint, monkeypatch):
    """A two-output request comes back as a TAR that sentinelhub-py decodes, framed like the
    real response in shared/data/real."""
    from sentinelhub import CRS, BBox, MimeType, SentinelHubRequest

    # sentinelhub-py's own session (not the factory's) needs oauthlib's switch for plain http
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")

    src = SentinelHubSource(SentinelHubConfig(preset="custom", base_url=shub_endpoint.url), GOOD)
    from tasks.sources._sh_requests import S2_EVALSCRIPT

    day = str(src.s2_dates(TILE, YEAR)[0])
    req = SentinelHubRequest(
        evalscript=S2_EVALSCRIPT,
        input_data=[SentinelHubRequest.input_data(src._s2, time_interval=(day, day))],
        responses=[SentinelHubRequest.output_response("default", MimeType.TIFF),
                   SentinelHubRequest.output_response("userdata", MimeType.JSON)],
        bbox=BBox(TILE.bounds, crs=CRS(TILE.epsg)), size=(256, 256), config=src._sh,
    )
    out = req.get_data()[0]
    assert set(out) == {"default.tif", "userdata.json"}
    assert out["default.tif"].shape == (256, 256, 12) and out["default.tif"].dtype == np.uint16
    assert out["userdata.json"] == {"date": day}
    syn = SyntheticSource().read_s2(TILE, np.array([day], "datetime64[D]"))
    np.testing.assert_array_equal(out["default.tif"][..., 10], syn.scl[0])
    if REAL_TAR.exists():  # the real response's TIFF encoding
        with tarfile.open(REAL_TAR) as tar:
            real = tifffile.TiffFile(io.BytesIO(tar.extractfile("default.tif").read()))
        body = src._download(src._jobs(TILE, np.array([day], "datetime64[D]"), "s2")[0], TILE.id)
        ours = tifffile.TiffFile(io.BytesIO(body))
        rp, op = real.pages[0], ours.pages[0]
        assert (real.byteorder, rp.compression, rp.planarconfig, rp.rowsperstrip) == (
            ours.byteorder, op.compression, op.planarconfig, op.rowsperstrip)
        assert {"ModelPixelScaleTag", "ModelTiepointTag", "GeoKeyDirectoryTag"} <= {
            t.name for t in op.tags.values()}


def test_process_rejects_off_grid_request(shub_endpoint):
    import requests

    tok = requests.post(f"{shub_endpoint.url}/oauth/token", data={
        "grant_type": "client_credentials", "client_id": SH_CLIENT_ID,
        "client_secret": SH_CLIENT_SECRET}, timeout=10).json()["access_token"]
    body = {"input": {"bounds": {"bbox": [0, 0, 105, 100], "properties": {
        "crs": "http://www.opengis.net/def/crs/EPSG/0/32631"}}, "data": [{"type": "sentinel-2-l2a"}]},
        "output": {"width": 10, "height": 10}, "evalscript": ""}
    r = requests.post(f"{shub_endpoint.url}/api/v1/process", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 400 and "10 m" in r.json()["error"]["message"]
    r = requests.post(f"{shub_endpoint.url}/api/v1/process", json=body, timeout=10)
    assert r.status_code == 401
    assert json.loads(r.text)["error"]["status"] == 401
