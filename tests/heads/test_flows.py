"""The head flows on one small synthetic build (one 256-px tile, the tiny fixed checkpoint).

The build runs its evaluation step with the checkpoint's own random weights as the
"random-init" baseline: a random-init encoder published as if trained, so the gate "beats the
random-init encoder by 0.05" must fail, and the build with it. The same store then serves the
train-head and predict-map flows with a label file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from tasks.config import build_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = [0.105, 52.192, 0.125, 52.200]  # one 256-px tile of zone 31 (as the build flow test)
TINY_SEED = 1  # tests/conftest.py builds the tiny checkpoint under torch.manual_seed(1)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, prefect_harness, tiny_checkpoint):
    from flows.build import build_region

    root = tmp_path_factory.mktemp("heads-build")
    cfg = build_config(None, {
        "region": {"bbox": REGION, "name": "heads"},
        "year": 2023,
        "storage": {"output_uri": str(root / "out"), "work_uri": str(root / "work")},
        "training": {"enabled": False, "checkpoint_uri": tiny_checkpoint},
        "evaluation": {"enabled": True, "ks": [1, 2, 5], "seeds": 2, "max_per_polygon": 10,
                       "random_init_seed": TINY_SEED, "gate_k": 5,
                       "min_gain_over_random_init": 0.05},
    })
    state = build_region(config=cfg, return_state=True)
    return cfg, state, root


def test_random_init_encoder_fails_the_gate(evaluated):
    from tasks.heads.evaluate import EvaluationReport

    cfg, state, root = evaluated
    assert state.is_failed()
    assert "Expected the evaluation to pass its gates" in state.message
    assert "gain of embeddings over random_init" in state.message
    [ev] = list((root / "out" / "evaluations" / "2023").glob("*/report.json"))
    rep = EvaluationReport.model_validate(json.loads(ev.read_text()))
    assert not rep.passed
    gain = rep.mean("embeddings", 5) - rep.mean("random_init", 5)
    assert abs(gain) < 0.05  # the same weights, up to int8 quantisation
    assert {r["features"] for r in rep.rows} == {"embeddings", "raw", "random_init"}
    assert [r["k"] for r in rep.rows if r["features"] == "raw"] == [1, 2, 5]
    for f in ("curves.png", "confusion.png", "report.md"):
        assert (ev.parent / f).stat().st_size > 100
    # the predicted map is on the store's grid, no data where the embedding has none
    [m] = list((root / "out" / "maps").glob("evaluation-land_cover-*/2023.zarr"))
    cls = zarr.open_group(str(m), mode="r")["utm31"]["class"][:]
    scales = zarr.open_group(str(root / "out" / "2023.zarr"), mode="r")["utm31"]["scales"][:]
    assert cls.shape == scales.shape
    assert ((cls == 255) == np.isnan(scales)).all()


def test_evaluation_artifacts(evaluated):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["evaluation-land-cover", "evaluation-table-land-cover"])))
    kinds = {a.key: a for a in arts}
    assert "data:image/png;base64," in kinds["evaluation-land-cover"].data
    assert "FAIL" in kinds["evaluation-land-cover"].data


def test_train_head_then_predict_map(evaluated, tmp_path: Path):
    from flows.heads import predict_map, train_head
    from tasks.config import SourceConfig
    from tasks.grid import plan_tiles
    from tasks.heads.config import PredictMapConfig, TrainHeadConfig
    from tasks.heads.stages import synthetic_labels

    cfg, _, root = evaluated
    tiles = plan_tiles(cfg.region.geometry(), 256)
    labels = synthetic_labels(tiles, 2023, SourceConfig(), "land_cover", 1, 5, 0)
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [g.x, g.y]},
              "properties": {"lc": labels.classes[v], "parcel": int(p)}}
             for g, v, p in zip(labels.geometry, labels.value, labels.polygon_id, strict=True)]
    path = tmp_path / "labels.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    tcfg = TrainHeadConfig(labels_uri=str(path), label_column="lc", id_column="parcel", year=2023,
                           storage=cfg.storage, name="lc", min_polygons_per_class=1,
                           split={"by": "polygon"})
    ref = train_head(config=tcfg)
    assert ref.model_version == json.loads(
        (root / "out" / "2023.zarr" / "utm31" / "zarr.json").read_text()
    )["attributes"]["tessera:model_version"]
    assert ref.n_polygons == np.unique(labels.polygon_id).size
    assert 0 <= ref.metrics["macro_f1"] <= 1
    assert json.loads((Path(ref.uri) / "head.json").read_text())["config"]["kind"] == "linear"
    m = predict_map(config=PredictMapConfig(head_uri=ref.uri, year=2023, storage=cfg.storage,
                                            cog=True))
    assert m.n_valid > 0 and Path(m.cog_uris[0]).exists()
    assert (Path(m.uri) / "map.json").exists() and (Path(m.uri) / "preview-utm31.png").exists()


def test_evaluate_flow_reuses_the_build(evaluated):
    from flows.heads import evaluate

    cfg, _, _ = evaluated
    ev = cfg.evaluation.model_copy(update={"min_gain_over_random_init": None, "ks": (1, 2),
                                           "seeds": 1, "predict_map": False,
                                           "random_init_baseline": False})
    ref = evaluate(config=cfg.model_copy(update={"evaluation": ev}))
    assert ref.passed and ref.map_uri is None
    assert "| raw |" in ref.markdown and "random_init" not in ref.markdown
