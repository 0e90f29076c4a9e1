"""Matryoshka publishing: the first K dims of a v2 embedding, its own int8 rule, any reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from pyproj import Transformer

from tasks.catalog import update_catalog, validate_catalog
from tasks.config import PublishConfig
from tasks.errors import DataError
from tasks.geotessera import export_geotessera
from tasks.preview import make_preview
from tasks.publish import prepare_zone_stores, publish_tile
from tasks.reader import open_region, pixel_vector, similarity_map
from tessera_model.quantise import quantise

from .test_publish import T_A, YEAR, _embedding, _storage, _write_emb

V2 = "v2-nano-0123abcd"
RULE = "v2-reference;min_valid_s2=0;min_valid_s1=0"


def _v2_emb(tmp_path: Path, seed: int = 1, rule: str = RULE, key: str = "k"):
    e = _embedding(T_A, seed)
    ref = _write_emb(tmp_path, T_A, e, key=key)
    zarr.open_group(ref.uri, mode="r+").attrs.update({"coverage_rule": rule})
    return ref, e


@pytest.mark.parametrize("k", [16, 32])
def test_prefix_published_with_v2_rule_and_read_everywhere(tmp_path: Path, k: int) -> None:
    storage, cfg = _storage(tmp_path), PublishConfig(dims=k)
    prepare_zone_stores([T_A], YEAR, cfg, storage, V2)
    ref, e = _v2_emb(tmp_path)
    publish_tile(ref, YEAR, cfg, storage, V2)
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r")
    attrs = dict(g.attrs)
    assert attrs["tessera:n_bands"] == k and attrs["tessera:matryoshka_dims"] == k
    assert (attrs["tessera:model_family"], attrs["tessera:model_size"]) == ("v2", "nano")
    assert attrs["tessera:checkpoint_sha256_prefix"] == "0123abcd"
    assert attrs["tessera:quantisation"] == "v2" and attrs["tessera:coverage_rule"] == RULE
    q_want, s_want = quantise(e[..., :k], rule="v2")
    assert g["embeddings"].shape == (T_A.height, T_A.width, k)
    np.testing.assert_array_equal(g["embeddings"][:], q_want)
    np.testing.assert_array_equal(g["scales"][:], s_want)
    # readers, similarity, preview, geotessera export and the catalogue work for any K
    to_ll = Transformer.from_crs(T_A.crs, 4326, always_xy=True)
    lon0, lat0 = to_ll.transform(T_A.x0 + 200, T_A.y0 - 2000)
    lon1, lat1 = to_ll.transform(T_A.x0 + 2000, T_A.y0 - 200)
    da = open_region(str(tmp_path / "out"), YEAR, (lon0, lat0, lon1, lat1), storage)
    assert da.shape[-1] == k and np.isfinite(da.values).any()
    vec = pixel_vector(str(tmp_path / "out"), YEAR, lon0, lat0, storage)
    assert vec.shape == (k,)
    sim = similarity_map(str(tmp_path / "out"), YEAR, (lon0, lat0, lon1, lat1), storage,
                         query=np.ones(k, np.float32))  # fmt: skip
    assert np.isfinite(sim.values).any()
    make_preview(str(tmp_path / "out"), YEAR, "utm31", storage, cfg)
    exp = export_geotessera(str(tmp_path / "out"), YEAR, str(tmp_path / "gt"), storage)
    assert exp.cells
    grids = list((tmp_path / "gt").rglob("grid_*[0-9].npy"))
    assert grids and np.load(grids[0]).shape[-1] == k
    update_catalog(str(tmp_path / "out"), YEAR, storage, cfg)
    assert validate_catalog(str(tmp_path / "out"), storage) > 0
    item = next((tmp_path / "out" / "catalog" / str(YEAR) / "items").glob("*.json"))
    assert json.loads(item.read_text())["properties"]["tessera:n_bands"] == k


def test_other_model_k_or_rule_refused_before_any_work(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    prepare_zone_stores([T_A], YEAR, PublishConfig(dims=32), storage, V2)
    with pytest.raises(DataError, match="Expected tessera:n_bands 64 .*Got 32"):
        prepare_zone_stores([T_A], YEAR, PublishConfig(dims=64), storage, V2)
    with pytest.raises(DataError, match="Expected tessera:model_version 'v2-small-99"):
        prepare_zone_stores([T_A], YEAR, PublishConfig(dims=32), storage, "v2-small-99999999")
    with pytest.raises(DataError, match="Expected publish.dims 128 for a v1.0 model"):
        prepare_zone_stores([T_A], YEAR, PublishConfig(dims=32), _storage(tmp_path, "o2"),
                            "v1-abcdef12")  # fmt: skip
    assert not (tmp_path / "o2").exists()
    cfg = PublishConfig(dims=32)
    ref, _ = _v2_emb(tmp_path)
    publish_tile(ref, YEAR, cfg, storage, V2)
    other, _ = _v2_emb(tmp_path, 2, rule="v2-reference;min_valid_s2=4;min_valid_s1=0", key="o")
    with pytest.raises(DataError, match="Expected tessera:coverage_rule"):
        publish_tile(other, YEAR, cfg, storage, V2)
