"""Inference-only builds with a v2 student: synthetic Earth and the Sentinel Hub source.

The checkpoint is a tiny v2-family model in our own format (it carries its spec), so a whole
256-px tile embeds in seconds; the official file format and the Hub are covered by
tests/model/test_v2_family.py and tests/tasks/test_checkpoints.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from tasks.config import build_config
from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint
from tessera_model.quantise import quantise

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = [0.105, 52.192, 0.112, 52.196]  # one 256-px tile of zone 31


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory) -> str:
    spec = ModelSpec.preset("v2-nano").model_copy(
        update={"d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32, "version": "v2-tiny"}
    )
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("v2") / "tiny-v2.pt"
    save_checkpoint(build_checkpoint(TesseraModel(spec, with_projector=False)), path)
    return str(path)


def _build(tmp_path, ckpt: str, **extra):
    from flows.build import build_region

    cfg = build_config(None, {
        "region": {"bbox": REGION, "name": "v2"},
        "year": 2023,
        "storage": {"output_uri": str(tmp_path / "out"), "work_uri": str(tmp_path / "work")},
        "model": {"preset": "v2-nano"},
        "training": {"enabled": False, "checkpoint_uri": ckpt},
        "publish": {"dims": 32},
        **extra,
    })  # fmt: skip
    return build_region(config=cfg)


def _check_store(tmp_path, result) -> None:
    g = zarr.open_group(f"{result.store_uri}/utm31", mode="r")
    attrs = dict(g.attrs)
    assert attrs["tessera:model_family"] == "v2" and attrs["tessera:n_bands"] == 32
    assert attrs["tessera:coverage_rule"] == "v2-reference;min_valid_s2=0;min_valid_s1=0"
    emb = next((tmp_path / "work" / "embeddings").rglob("*.zarr"))
    e = zarr.open_group(str(emb), mode="r")["embedding"][:]
    q, s = quantise(e[..., :32], rule="v2")
    rec = next((tmp_path / "out" / "2023.zarr" / ".tessera" / "tiles").glob("*.json"))
    meta = json.loads(rec.read_text())
    assert meta["coverage_rule"] == attrs["tessera:coverage_rule"]
    r0, c0 = meta["row_offset"], meta["col_offset"]
    h, w = e.shape[:2]
    np.testing.assert_array_equal(g["embeddings"][r0 : r0 + h, c0 : c0 + w], q)
    np.testing.assert_array_equal(g["scales"][r0 : r0 + h, c0 : c0 + w], s)
    valid = np.isfinite(e).all(-1)
    assert result.n_valid_pixels == valid.sum() > 0


def test_v2_build_on_the_synthetic_earth(tmp_path, tiny_v2, prefect_harness):
    result = _build(tmp_path, tiny_v2)
    _check_store(tmp_path, result)


def test_v2_build_on_the_sentinelhub_source(tmp_path, tiny_v2, prefect_harness, monkeypatch):
    from tasks.sources.shub_endpoint import EndpointConfig, LocalEndpoint

    monkeypatch.setenv("SH_CLIENT_ID", "v2-client")
    monkeypatch.setenv("SH_CLIENT_SECRET", "v2-secret-7c1d")
    ep = LocalEndpoint(EndpointConfig(client_id="v2-client", client_secret="v2-secret-7c1d",
                                      months=(6,))).start()  # fmt: skip
    try:
        sh = {"preset": "custom", "base_url": ep.url, "download_sleep_s": 0.01}
        result = _build(tmp_path, tiny_v2,
                        source={"kind": "sentinelhub", "sentinelhub": sh})  # fmt: skip
    finally:
        ep.stop()
    _check_store(tmp_path, result)
