"""The STAC source through pystac-client, the planetary-computer package and rasterio, against
the local STAC endpoint (both presets' conventions), without network."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import planetary_computer.sas
import pytest
import zarr
from pydantic import SecretStr, ValidationError

from tasks.acquire import acquire, make_source
from tasks.config import DPixelConfig, MaskConfig, SourceConfig, StorageConfig
from tasks.dpixels import extract_dpixels
from tasks.errors import ConfigError, TileError
from tasks.grid import Tile
from tasks.mask import cloud_mask
from tasks.sources.base import SceneSource
from tasks.sources.stac import (
    StacConfig,
    StacPermanentError,
    StacSource,
    StacSourceError,
    item_dn_offset,
    mosaic_first_valid,
    resolve_subscription_key,
)
from tasks.sources.stac_endpoint import EndpointConfig, FaultConfig, LocalEndpoint
from tasks.sources.synthetic import SyntheticSource, SyntheticWorldConfig

TILE = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
YEAR = 2022
MONTHS = (1,)  # January 2022: 6 S2 dates on both sides of baseline 04.00 (2022-01-25)
LAYOUT = {
    # 384-px granules every 320 px: the tile straddles two granules (a 64-px overlap strip
    # inside it) and sits in one granule row.
    "granule_px": 384, "granule_step_px": 320, "granule_origin_m": (300160, 5782400),
    "months": MONTHS, "page_size_max": 4, "block_px": 128,
}
KEY = "pc-key-3b9d7e"


@pytest.fixture(scope="module")
def endpoint():
    ep = LocalEndpoint(EndpointConfig(**LAYOUT)).start()
    yield ep
    ep.stop()


@pytest.fixture
def stac_ep(endpoint):
    """The running endpoint with no faults and zeroed statistics."""
    endpoint.reset()
    yield endpoint
    endpoint.reset()


class MonthsSynthetic:
    """The synthetic Earth restricted to the endpoint's months."""

    name = "synthetic"

    def __init__(self, world: SyntheticWorldConfig | None = None, months=MONTHS) -> None:
        self.inner = SyntheticSource(world)
        self.months = months

    def _keep(self, d: np.ndarray) -> np.ndarray:
        return d[np.isin(d.astype("datetime64[M]").astype(int) % 12 + 1, self.months)]

    def s2_dates(self, tile, year):
        return self._keep(self.inner.s2_dates(tile, year))

    def s1_dates(self, tile, year, orbit):
        return self._keep(self.inner.s1_dates(tile, year, orbit))

    def read_s2(self, tile, dates):
        return self.inner.read_s2(tile, dates)

    def read_s1(self, tile, dates, orbit):
        return self.inner.read_s1(tile, dates, orbit)


def _source_cfg(ep: LocalEndpoint, preset: str = "planetary-computer", **kw) -> SourceConfig:
    stac = {**ep.stac_config(preset), "backoff_s": 0.01, "max_connections": 4, **kw}
    return SourceConfig.model_validate({"kind": "stac", "stac": stac})


def _storage(root: Path) -> StorageConfig:
    return StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))


def _arrays(uri: str) -> dict[str, bytes]:
    g = zarr.open_group(uri, mode="r")
    return {name: np.asarray(a[...]).tobytes() for name, a in g.arrays()}


def _dpixels(tile, year, src_cfg, storage, scene_source=None):
    scenes = acquire(tile, year, src_cfg, storage, scene_source=scene_source)
    m = cloud_mask(scenes, MaskConfig(), storage)
    return scenes, _arrays(extract_dpixels(scenes, m, DPixelConfig(), storage).uri)


# --- config and pure helpers ---------------------------------------------------------------------
def test_config_presets_and_validation():
    pc2, pc1 = StacConfig().catalogues()
    assert pc2.api_url == "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert (pc2.collection, pc2.naming, pc2.sign, pc2.dn_offset_removed) == (
        "sentinel-2-l2a", "planetary-computer", True, False)
    assert (pc1.collection, pc1.sign) == ("sentinel-1-rtc", True)
    es2, es1 = StacConfig(preset="earth-search").catalogues()
    assert es2.api_url == "https://earth-search.aws.element84.com/v1"
    assert (es2.naming, es2.sign, es2.dn_offset_removed) == ("earth-search", False, True)
    assert es1.api_url == pc1.api_url and es1.sign  # S1 RTC from Planetary Computer
    c2, c1 = StacConfig(preset="custom", api_url="http://127.0.0.1:1/stac").catalogues()
    assert (c2.api_url, c1.api_url, c2.sign) == ("http://127.0.0.1:1/stac",) * 2 + (False,)
    with pytest.raises(ValidationError, match="api_url"):
        StacConfig(preset="custom")
    with pytest.raises(ValidationError, match="asset_href_rewrite"):
        StacConfig(asset_href_rewrite={"ftp://x/": "http://y/"})
    with pytest.raises(ValidationError):  # the config names a key, it cannot hold one
        StacConfig.model_validate({"subscription_key": "x"})
    assert "PC_SDK_SUBSCRIPTION_KEY" in StacConfig().model_dump_json()
    assert SourceConfig(kind="stac").stac.preset == "planetary-computer"


def test_subscription_key_from_env_or_block():
    cfg = StacConfig(subscription_key_env="MY_PC_KEY")
    assert resolve_subscription_key(cfg, environ={}) is None  # anonymous signing
    assert resolve_subscription_key(cfg, environ={"MY_PC_KEY": KEY}).get_secret_value() == KEY
    blk = StacConfig(secret_block="pc-key")
    got = resolve_subscription_key(blk, loader=lambda slug, name: {"value": {"subscription_key": KEY}})
    assert got.get_secret_value() == KEY and KEY not in repr(got)
    with pytest.raises(ConfigError, match="secret_block") as err:
        resolve_subscription_key(blk, loader=lambda slug, name: {"value": {"other": KEY}})
    assert KEY not in str(err.value)


@pytest.mark.parametrize(
    "props, removed, expect",
    [
        ({"s2:processing_baseline": "04.00"}, False, 1000),  # Planetary Computer, 2022+
        ({"s2:processing_baseline": "03.01"}, False, 0),
        ({"s2:processing_baseline": "05.00"}, False, 1000),  # reprocessed older product
        ({"s2:processing_baseline": "N0400"}, False, 1000),
        ({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": True}, False, 0),
        ({"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False}, True, 1000),
        ({"s2:processing_baseline": "04.00"}, True, 0),  # catalogue fallback (Earth Search)
    ],
)
def test_item_dn_offset_from_properties(props, removed, expect):
    # the date is not used when the item states its baseline
    assert item_dn_offset(props, np.datetime64("2021-06-01"), removed, "error", "i", "t") == expect


def test_item_dn_offset_missing_baseline():
    with pytest.raises(StacPermanentError, match="s2:processing_baseline"):
        item_dn_offset({}, np.datetime64("2023-06-01"), False, "error", "i", "t")
    assert item_dn_offset({}, np.datetime64("2023-06-01"), False, "by-date", "i", "t") == 1000
    assert item_dn_offset({}, np.datetime64("2021-06-01"), False, "by-date", "i", "t") == 0


def test_mosaic_first_valid():
    stack = np.arange(2 * 2 * 3 * 2).reshape(2, 2, 3, 2)
    valid = np.array([[[1, 0, 0], [1, 1, 0]], [[1, 1, 0], [0, 1, 1]]], bool)
    out, pick = mosaic_first_valid(stack, valid)
    assert pick.tolist() == [[0, 1, 0], [0, 0, 1]]  # first valid layer; layer 0 where none
    assert (out == np.take_along_axis(stack, pick[None, ..., None], 0)[0]).all()


def test_errors_are_tile_errors():
    assert issubclass(StacPermanentError, StacSourceError)
    assert issubclass(StacSourceError, TileError)


# --- against the local endpoint ----------------------------------------------------------------
def test_is_a_scene_source_with_paged_search(stac_ep):
    src = make_source(_source_cfg(stac_ep))
    assert isinstance(src, SceneSource) and src.name == "stac"
    dates = src.s2_dates(TILE, YEAR)
    assert (dates == MonthsSynthetic().s2_dates(TILE, YEAR)).all() and dates.size == 6
    assert stac_ep.stats.searches >= 3  # 12 items, 4 per page: paged with 'next'
    for orbit in ("ascending", "descending"):
        assert (src.s1_dates(TILE, YEAR, orbit) == MonthsSynthetic().s1_dates(TILE, YEAR, orbit)).all()


def test_cloud_filter(stac_ep):
    all_items = StacSource(StacConfig(**stac_ep.stac_config()))._search(TILE, YEAR, "s2")
    src = StacSource(StacConfig(**stac_ep.stac_config(), max_cloud_cover=50))
    kept = src._search(TILE, YEAR, "s2")
    assert 0 < len(kept) < len(all_items)
    cc = {i.id: i.props["eo:cloud_cover"] for i in all_items}
    assert all(cc[i.id] <= 50 for i in kept)
    assert {i.id for i in all_items if cc[i.id] <= 50} == {i.id for i in kept}


@pytest.mark.parametrize("preset", ["planetary-computer", "earth-search"])
def test_dpixels_equal_synthetic(stac_ep, tmp_path, preset):
    """The same tile through the STAC source and the synthetic source: identical d-pixels
    (S2 DN and SCL byte for byte; S1 too, since the COGs hold its float32 exactly)."""
    sc, stac_dp = _dpixels(TILE, YEAR, _source_cfg(stac_ep, preset), _storage(tmp_path / "stac"))
    yc, syn_dp = _dpixels(TILE, YEAR, SourceConfig(), _storage(tmp_path / "syn"), MonthsSynthetic())
    assert (sc.n_s2, sc.n_s1_ascending, sc.n_s1_descending) == (
        yc.n_s2, yc.n_s1_ascending, yc.n_s1_descending) and sc.n_s2 == 6
    assert stac_dp.keys() == syn_dp.keys() and "bands" in stac_dp and "sar_ascending" in stac_dp
    for k in stac_dp:
        assert stac_dp[k] == syn_dp[k], k
    scenes = zarr.open_group(sc.uri, mode="r")
    offsets = scenes["s2_offset"][...].tolist()
    days = scenes["s2_dates"][...].astype("datetime64[D]")
    if preset == "planetary-computer":  # DN carry +1000 from baseline 04.00 on, recorded per date
        assert offsets == [1000 if d >= np.datetime64("2022-01-25") else 0 for d in days]
        assert stac_ep.stats.sas >= 1  # signed through the package at the local SAS endpoint
    else:  # Earth Search removed it; S1 still from (local) Planetary Computer
        assert offsets == [0] * len(days)
    assert scenes.attrs["source"] == "stac"


def test_reprocessed_items_offset_from_properties(tmp_path):
    """Items before 2022-01-25 reprocessed to baseline 05.00 carry the offset: the source
    reads it from the item, not the date, and the d-pixels still equal the synthetic Earth's."""
    world = SyntheticWorldConfig(defect_rate=0.0)  # saturated 65535 cannot carry +1000
    cfg = EndpointConfig(**LAYOUT, world=world, reprocessed_months=(1,))
    with LocalEndpoint(cfg) as ep:
        sc, stac_dp = _dpixels(TILE, 2021, _source_cfg(ep), _storage(tmp_path / "stac"))
    yc, syn_dp = _dpixels(TILE, 2021, SourceConfig(synthetic=world), _storage(tmp_path / "syn"),
                          MonthsSynthetic(world))
    assert (zarr.open_group(sc.uri, mode="r")["s2_offset"][...] == 1000).all()
    assert (zarr.open_group(yc.uri, mode="r")["s2_offset"][...] == 0).all()
    for k in syn_dp:
        assert stac_dp[k] == syn_dp[k], k


def test_faults_give_identical_scenes(stac_ep, tmp_path):
    """5xx, 429 (Retry-After), dropped connections and truncated bodies at the COG server are
    retried and give the same bytes."""
    cfg = _source_cfg(stac_ep)
    clean = acquire(TILE, YEAR, cfg, _storage(tmp_path / "clean"))
    stac_ep.set_faults(FaultConfig(rate=0.3, seed=5, search_rate=0.3))
    faulty = acquire(TILE, YEAR, cfg, _storage(tmp_path / "faulty"))
    injected = stac_ep.stats.faults
    assert len(injected) >= 5 and sum(injected.values()) >= 10, injected
    assert _arrays(faulty.uri) == _arrays(clean.uri)
    assert faulty.key == clean.key


def test_transient_faults_beyond_attempts_are_transient(stac_ep, tmp_path):
    stac_ep.set_faults(FaultConfig(rate=1.0, kinds=("503",), max_per_request=100))
    with pytest.raises(StacSourceError) as err:
        acquire(TILE, YEAR, _source_cfg(stac_ep, max_attempts=2), _storage(tmp_path))
    assert not isinstance(err.value, StacPermanentError)
    assert "503" in str(err.value) and "sig=" not in str(err.value)


def test_rerun_reads_response_cache(stac_ep, tmp_path):
    storage = _storage(tmp_path)
    cfg = _source_cfg(stac_ep)
    first = acquire(TILE, YEAR, cfg, storage)
    assert stac_ep.stats.blob > 0 and stac_ep.stats.searches > 0
    stac_ep.reset()
    # a retried task whose scenes were not committed: everything comes from the cache
    Path(first.uri + ".done.json").unlink()
    again = acquire(TILE, YEAR, cfg, storage)
    assert (stac_ep.stats.blob, stac_ep.stats.searches, stac_ep.stats.sas) == (0, 0, 0)
    assert _arrays(again.uri) == _arrays(first.uri)


@pytest.mark.parametrize("fault, cause, status", [("403", "credentials", 403),
                                                  ("401", "credentials", 401),
                                                  ("missing-asset", "missing", 404)])
def test_permanent_failure_fails_fast(stac_ep, tmp_path, fault, cause, status):
    stac_ep.set_faults(FaultConfig(permanent=fault))
    cfg = _source_cfg(stac_ep, backoff_s=5.0)  # a retry would take seconds
    t0 = time.perf_counter()
    with pytest.raises(StacPermanentError) as err:
        acquire(TILE, YEAR, cfg, _storage(tmp_path))
    assert time.perf_counter() - t0 < 5.0
    assert (err.value.cause, err.value.status) == (cause, status)
    assert err.value.tile_id == TILE.id and "sig=" not in str(err.value)
    if fault == "missing-asset":
        assert "'B8A'" in str(err.value)
    assert not (tmp_path / "work" / "scenes").exists() or not any(
        (tmp_path / "work" / "scenes").rglob("*.done.json"))


def test_unsigned_blob_refused_and_subscription_key(endpoint, tmp_path, monkeypatch):
    """The blob store wants a SAS token; the SAS endpoint wants the subscription key, which
    comes from the environment variable the config names and never shows in errors."""
    ep = endpoint
    ep.reset()
    ep.set_subscription_key(SecretStr(KEY))
    try:
        items = StacSource(StacConfig(**ep.stac_config(), sign_s2=False, backoff_s=0.01))
        with pytest.raises(StacPermanentError) as err:
            items.read_s2(TILE, items.s2_dates(TILE, YEAR)[:1])
        assert err.value.status == 403  # unsigned href: NoAuthenticationInformation
        blob = f"{ep.url}/blob/sentinel2l2a01/sentinel2-l2/x/2022-01-02/i/B02.tif"
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(blob)
        cfg = _source_cfg(ep, subscription_key_env="TEST_PC_KEY")
        # the package keeps SAS tokens per process (earlier tests got one without a key)
        monkeypatch.setattr(planetary_computer.sas, "TOKEN_CACHE", {})
        monkeypatch.setenv("TEST_PC_KEY", "wrong-key")
        with pytest.raises(StacPermanentError) as err:
            acquire(TILE, YEAR, cfg, _storage(tmp_path / "bad"))
        assert (err.value.cause, err.value.status) == ("credentials", 401)
        assert "TEST_PC_KEY" in str(err.value) and "wrong-key" not in str(err.value)
        monkeypatch.setenv("TEST_PC_KEY", KEY)
        ref = acquire(TILE, YEAR, cfg, _storage(tmp_path / "good"))
        assert ref.n_s2 == 6 and ep.stats.sas >= 1 and ep.stats.refused.get("sas", 0) >= 1
    finally:
        ep.set_subscription_key(None)


def test_windowed_reads_fetch_only_the_window(tmp_path):
    """A tile inside a large granule: only the header and the window's COG tiles travel."""
    cfg = EndpointConfig(granule_px=640, granule_step_px=640, granule_origin_m=(299520, 5780480),
                         months=MONTHS, block_px=64)
    with LocalEndpoint(cfg) as ep:
        src = StacSource(StacConfig(**ep.stac_config(), cache_responses=False))
        d = src.s2_dates(TILE, YEAR)[:1]
        stack = src.read_s2(TILE, d)
        syn = SyntheticSource().read_s2(TILE, d)
        assert (stack.bands == syn.bands).all() and (stack.scl == syn.scl).all()
        full = len(ep.world.cog("pc", "s2", "31N_0_0", str(d[0]), "B04"))
        per_asset = src.client.stats.bytes / 11
    assert per_asset < 0.35 * full, (per_asset, full)  # the tile is 4/25 of the granule


def test_native_20m_bands_are_resampled(tmp_path):
    """20 m bands and SCL (as in the real product) onto the 10 m grid: SCL by nearest (codes
    only, no blends), reflectance by bilinear interpolation; 10 m bands stay exact."""
    cfg = EndpointConfig(**{**LAYOUT, "native_20m": True})
    with LocalEndpoint(cfg) as ep:
        src = StacSource(StacConfig(**ep.stac_config(), cache_responses=False))
        d = src.s2_dates(TILE, YEAR)[:2]
        got = src.read_s2(TILE, d)
    syn = SyntheticSource().read_s2(TILE, d)
    for b in ("B04", "B02", "B03", "B08"):
        k = ["B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12"].index(b)
        assert (got.bands[..., k] == syn.bands[..., k]).all(), b
    # SCL: each 2 x 2 block of the tile is the 20 m sample (the block's top-left 10 m pixel)
    assert (got.scl == np.repeat(np.repeat(syn.scl[:, ::2, ::2], 2, 1), 2, 2)).all()
    b11 = ["B04", "B02", "B03", "B08", "B8A", "B05", "B06", "B07", "B11", "B12"].index("B11")
    g, s = got.bands[..., b11].astype(float), syn.bands[..., b11].astype(float)
    assert np.median(np.abs(g - s)) < 0.05 * np.median(s)  # close, but interpolated:
    assert not (g == s).all() and src.timings.reproject > 0


@pytest.mark.integration
@pytest.mark.slow
def test_stac_build_flow_with_faults(stac_ep, tmp_path, tiny_checkpoint, prefect_harness):
    """The build flow through the STAC source with COG faults: committed scenes equal the
    synthetic Earth's, and the build publishes."""
    from flows.build import build_region
    from tasks.config import build_config

    stac_ep.set_faults(FaultConfig(rate=0.2, seed=3))
    cfg = build_config(None, {
        "region": {"bbox": [0.105, 52.192, 0.112, 52.196], "name": "stac"},
        "year": YEAR,
        "storage": {"output_uri": str(tmp_path / "out"), "work_uri": str(tmp_path / "work")},
        "source": _source_cfg(stac_ep).model_dump(mode="json"),
        "training": {"enabled": False, "checkpoint_uri": tiny_checkpoint},
        "embedding": {"min_valid_s2": 1},
    })
    result = build_region(config=cfg)
    assert result.n_valid_pixels > 0 and sum(stac_ep.stats.faults.values()) >= 3
    scenes = sorted((tmp_path / "work" / "scenes").rglob("*.zarr"))
    assert scenes
    for uri in scenes:
        g = zarr.open_group(str(uri), mode="r")
        tile = Tile.from_id(g.attrs["tile_id"])
        days = g["s2_dates"][...].astype("datetime64[D]")
        syn = SyntheticSource().read_s2(tile, days)
        assert (g["s2_bands"][...] == syn.bands).all() and (g["s2_scl"][...] == syn.scl).all()
