"""The build flow through the Sentinel Hub source, against the local endpoint with faults."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tasks.config import build_config
from tasks.sources.shub_endpoint import FaultConfig

from .conftest import SH_CLIENT_ID, SH_CLIENT_SECRET

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cfg(root, url, checkpoint):
    return build_config(None, {
        "region": {"bbox": [0.105, 52.192, 0.112, 52.196], "name": "sh"},
        "year": 2024,
        "storage": {"output_uri": str(root / "out"), "work_uri": str(root / "work")},
        "source": {"kind": "sentinelhub",
                   "sentinelhub": {"preset": "custom", "base_url": url, "download_sleep_s": 0.01}},
        "training": {"enabled": False, "checkpoint_uri": checkpoint},
        "embedding": {"min_valid_s2": 1},
    })


def _published(root) -> dict[str, bytes]:
    g = zarr.open_group(str(root / "out" / "2024.zarr"), mode="r")["utm31"]
    return {k: np.asarray(g[k][...]).tobytes() for k in ("embeddings", "scales")}


def test_faulty_build_publishes_identical_store(shub_endpoint, tmp_path, monkeypatch,
                                                tiny_checkpoint, prefect_harness):
    from flows.build import build_region

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SH_CLIENT_ID", SH_CLIENT_ID)
    monkeypatch.setenv("SH_CLIENT_SECRET", SH_CLIENT_SECRET)
    clean = build_region(config=_cfg(tmp_path / "clean", shub_endpoint.url, tiny_checkpoint))
    assert clean.n_valid_pixels > 0
    shub_endpoint.set_faults(FaultConfig(rate=0.5, seed=11, slow_s=0.05, retry_after_ms=10))
    faulty = build_region(config=_cfg(tmp_path / "faulty", shub_endpoint.url, tiny_checkpoint))
    assert sum(shub_endpoint.stats.faults.values()) >= 3
    assert faulty.n_valid_pixels == clean.n_valid_pixels
    assert _published(tmp_path / "faulty") == _published(tmp_path / "clean")
