"""Fixtures for the source tests: a local Sentinel Hub endpoint on loopback (random port)."""

from __future__ import annotations

import pytest

from tasks.sources.shub_endpoint import EndpointConfig, LocalEndpoint

SH_CLIENT_ID = "test-client-7f3a"
SH_CLIENT_SECRET = "s3cr3t-do-not-leak-5d1e9b"


@pytest.fixture(scope="module")
def _shub_server():
    from sentinelhub import SentinelHubDownloadClient

    cfg = EndpointConfig(
        client_id=SH_CLIENT_ID,
        client_secret=SH_CLIENT_SECRET,
        months=(6,),  # June only: ~6 S2 and ~5 S1 dates a year keep tests fast
        catalog_page_size=4,  # force catalog paging
    )
    ep = LocalEndpoint(cfg).start()
    yield ep
    ep.stop()
    SentinelHubDownloadClient.clear_cache()


@pytest.fixture
def shub_endpoint(_shub_server):
    """The running endpoint, with no faults and zeroed statistics for each test."""
    _shub_server.reset()
    yield _shub_server
    _shub_server.reset()
