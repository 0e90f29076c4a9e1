"""End to end: the build flow under the session-wide Prefect harness.

One small build (one 256-px tile, a very short training run: the tests check the chain, not
the model) exercises every stage; the test then opens the store with xarray/rioxarray, checks
the dequantised vectors against the float embeddings, checks that the embedding separates the
synthetic world's land-cover classes better than chance, and that a second run is served
entirely from cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from tasks.config import build_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = [0.105, 52.192, 0.125, 52.200]  # inside one 256-px tile of zone 31


def _stages_of(run_id):
    """Filter for the stages subflow run of a build-region run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        )
    assert len(children) == 1
    return FlowRunFilter(id=FlowRunFilterId(any_=[children[0].id]))


@pytest.fixture(scope="module")
def built(tmp_path_factory, prefect_harness):
    from flows.build import build_region

    root = tmp_path_factory.mktemp("build")
    cfg = build_config(None, {
        "region": {"bbox": REGION, "name": "e2e"},
        "year": 2023,
        "storage": {"output_uri": str(root / "out"), "work_uri": str(root / "work")},
        # cheap on a busy machine: 8 steps of 64 samples (the suite's slowest fixture; it
        # must stay well inside pytest's 600 s timeout under load)
        "training": {"steps": 8, "batch_size": 64, "pixels_per_tile": 1024, "checkpoint_every": 4,
                     "validation_pixels": 256},
    })
    state = build_region(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    return cfg, state.result(), root, state.state_details.flow_run_id


def test_store_opens_with_xarray_and_crs(built):
    cfg, result, _, _ = built
    from flows.build import plan

    tiles = plan(cfg)
    assert len(tiles) == 1
    t = tiles[0]
    assert result.groups == ["utm31"]
    ds = xr.open_zarr(result.store_uri, group="utm31", consolidated=False)
    assert ds["embeddings"].dtype == np.int8 and ds["embeddings"].shape[-1] == 128
    assert ds["scales"].dtype == np.float32
    import rioxarray  # noqa: F401

    assert ds.rio.crs.to_epsg() == 32631
    tr = ds["scales"].rio.transform()
    assert (tr.a, tr.e) == (10.0, -10.0)
    assert (tr.c, tr.f) == (float(t.x0), float(t.y0))


def test_dequantised_matches_float(built):
    cfg, result, root, _ = built
    emb_groups = sorted((root / "work" / "embeddings").rglob("*.zarr"))
    assert len(emb_groups) == 1
    f = zarr.open_group(str(emb_groups[0]), mode="r")["embedding"][:]
    ds = xr.open_zarr(result.store_uri, group="utm31", consolidated=False)
    q = ds["embeddings"].values.astype(np.float32)
    s = ds["scales"].values
    valid = np.isfinite(f).all(-1)
    assert valid.sum() == result.n_valid_pixels > 1000
    assert np.array_equal(np.isfinite(s), valid)
    deq = q[valid] * s[valid][:, None]
    ref = f[valid]
    cos = (deq * ref).sum(-1) / (np.linalg.norm(deq, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.9999


def test_embedding_separates_land_cover(built):
    """A nearest-centroid head on the embeddings beats the majority class by a margin."""
    cfg, result, root, _ = built
    from flows.build import plan
    from tasks.sources.synthetic import SyntheticSource

    t = plan(cfg)[0]
    gt = SyntheticSource(cfg.source.synthetic).ground_truth(t, cfg.year)
    f = zarr.open_group(str(next((root / "work" / "embeddings").rglob("*.zarr"))), mode="r")["embedding"][:]
    valid = np.isfinite(f).all(-1)
    x = f[valid]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = np.asarray(gt.land_cover)[valid]
    parcels = np.asarray(gt.parcel_id)[valid]
    train = (parcels % 2) == 0  # split by parcel, as the field does
    classes = [c for c in np.unique(y[train]) if (y[train] == c).sum() >= 20 and (y[~train] == c).sum() >= 1]
    assert len(classes) >= 3
    keep_tr = train & np.isin(y, classes)
    keep_te = ~train & np.isin(y, classes)
    cents = np.stack([x[keep_tr & (y == c)].mean(0) for c in classes])
    d = ((x[keep_te][:, None, :] - cents[None]) ** 2).sum(-1)
    pred = np.asarray(classes)[d.argmin(1)]
    acc = (pred == y[keep_te]).mean()
    majority = max((y[keep_te] == c).mean() for c in classes)
    assert acc > majority + 0.1, (acc, majority)


def test_second_run_is_served_from_cache(built):
    cfg, result, root, _ = built
    from prefect.client.orchestration import get_client

    from flows.build import build_region

    state = build_region(config=cfg, return_state=True)
    assert state.is_completed()
    again = state.result()
    assert again.store_uri == result.store_uri
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=_stages_of(state.state_details.flow_run_id))
    assert runs
    names = {r.name.split("-")[0] for r in runs}
    assert {"acquire", "mask", "dpixels", "embed", "publish"} <= names
    not_cached = [(r.name, r.state.name) for r in runs if r.state.name != "Cached"]
    assert not not_cached


def test_run_has_progress_and_table_artifacts(built):
    cfg, result, _, run_id = built
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        child = client.read_flow_runs(flow_run_filter=_stages_of(run_id))[0].id
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child]))
        )
    by_key = {a.key: a for a in arts}
    assert by_key["build-progress"].data == 100.0
    table = by_key["build-tiles"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["tile"] for r in rows] == result.tiles
    assert rows[0]["s2_scenes"] == 73 and 0 < rows[0]["s2_kept"] <= 73
    assert rows[0]["embedded_pixels"] == result.n_valid_pixels


def test_build_with_given_checkpoint_publishes_same_bytes(built, tmp_path):
    """Training off, the first build's checkpoint given: identical embeddings and int8 bytes."""
    cfg, result, root, _ = built
    from flows.build import build_region

    ckpt = next((root / "work" / "checkpoints").rglob("model.pt"))
    cfg2 = cfg.model_copy(update={
        "training": cfg.training.model_copy(update={"enabled": False, "checkpoint_uri": str(ckpt)}),
        "storage": cfg.storage.model_copy(update={"output_uri": str(tmp_path / "out2")}),
    })
    state = build_region(config=cfg2, return_state=True)
    assert state.is_completed(), state.message
    other = state.result()
    a = zarr.open_group(result.store_uri, mode="r")["utm31"]
    b = zarr.open_group(other.store_uri, mode="r")["utm31"]
    assert np.array_equal(a["embeddings"][:], b["embeddings"][:])
    assert np.array_equal(a["scales"][:], b["scales"][:], equal_nan=True)


def test_same_build_into_another_root_publishes_identical_files(built, tmp_path):
    """The same config and seed into another output root (another path, another time): every
    published file is byte-identical, the STAC catalogue included, and the catalogue
    validates and names no machine path."""
    cfg, result, root, _ = built
    from flows.build import build_region
    from tasks.catalog import validate_catalog

    other_root = tmp_path / "elsewhere" / "out"
    cfg3 = cfg.model_copy(update={
        "storage": cfg.storage.model_copy(update={"output_uri": str(other_root)}),
    })
    state = build_region(config=cfg3, return_state=True)
    assert state.is_completed(), state.message
    a_root = root / "out"

    def files(base):  # noqa: ANN001, ANN202
        return {p.relative_to(base).as_posix(): p.read_bytes()
                for p in sorted(base.rglob("*")) if p.is_file()}

    a, b = files(a_root), files(other_root)
    assert sorted(a) == sorted(b) and len(a) > 20
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ
    for content in b.values():
        assert str(a_root).encode() not in content and str(other_root).encode() not in content
    assert validate_catalog(str(other_root), cfg3.storage) >= 3
