"""Config validation: every bad input fails before any work, naming the field."""

from __future__ import annotations

import json

import pytest

from tasks.config import (
    BuildConfig,
    StorageConfig,
    build_config,
    demo_config,
    last_complete_year,
    parse_overrides,
)
from tasks.errors import ConfigError


def _cfg(**over):
    base = {"region": {"bbox": [0.10, 52.19, 0.16, 52.205]}, "year": 2023}
    for k, v in over.items():
        base[k] = v
    return base


def _field_of(data) -> str:
    with pytest.raises(ConfigError) as ei:
        build_config(None, data)
    return ei.value.field


def test_demo_config_is_valid():
    cfg = demo_config()
    assert cfg.year <= last_complete_year()
    assert cfg.source.kind == "synthetic"


@pytest.mark.parametrize(
    ("region", "field"),
    [
        ({"bbox": [0.2, 52.0, 0.1, 52.1]}, "region.bbox"),  # min_lon > max_lon
        ({"bbox": [0.1, 52.2, 0.2, 52.1]}, "region.bbox"),  # min_lat > max_lat
        ({"bbox": [0.1, 52.0, 0.2, 95.0]}, "region.bbox.3"),  # latitude beyond 90
        ({"bbox": [0.1, -91.0, 0.2, 52.0]}, "region.bbox.1"),
        ({"bbox": [-181, 1, 0, 2]}, "region.bbox.0"),
        ({"geojson": {"type": "Polygon", "coordinates": [[[0, 0], [0, 0], [0, 0], [0, 0]]]}}, "region.geojson"),
        ({"geojson": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}, "region.geojson"),
        ({"geojson": {"type": "Point", "coordinates": [0, 0]}}, "region.geojson"),
        ({"bbox": [0, 40, 5, 45]}, "region"),  # above max area
        ({}, "region"),  # neither bbox nor geojson
    ],
)
def test_bad_region_names_field(region, field):
    assert _field_of(_cfg(region=region)) == field


def test_bad_region_messages_are_clear():
    with pytest.raises(ConfigError, match="min_lon < max_lon"):
        build_config(None, _cfg(region={"bbox": [0.2, 52.0, 0.1, 52.1]}))
    with pytest.raises(ConfigError, match="Self-intersection"):
        build_config(None, _cfg(region={"geojson": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}))
    with pytest.raises(ConfigError, match="max_area_km2"):
        build_config(None, _cfg(region={"bbox": [0, 40, 5, 45]}))


def test_area_limit_is_configurable():
    cfg = build_config(None, _cfg(region={"bbox": [0, 40, 1, 41], "max_area_km2": 20000}))
    assert cfg.region.max_area_km2 == 20000


@pytest.mark.parametrize("year", [2016, 1999, last_complete_year() + 1, 2099])
def test_bad_year(year):
    assert _field_of(_cfg(year=year)) == "year"


def test_unknown_source():
    assert _field_of(_cfg(source={"kind": "landsat"})) == "source.kind"


def test_unknown_field_rejected():
    assert _field_of(_cfg(trainig={"steps": 3})) == "trainig"


def test_bounds_on_stage_fields():
    assert _field_of(_cfg(tile_size_px=300)) == "tile_size_px"
    assert _field_of(_cfg(mask={"dilation_px": -1})) == "mask.dilation_px"
    assert _field_of(_cfg(mask={"invalid_scl": [12]})) == "mask.invalid_scl.0"
    assert _field_of(_cfg(dpixels={"chunk_px": 48})) == "dpixels.chunk_px"
    assert _field_of(_cfg(embedding={"batch_size": -1})) == "embedding.batch_size"
    assert _field_of(_cfg(training={"enabled": False})) == "training"
    assert _field_of(_cfg(storage={"output_uri": "gs://bucket/x"})) == "storage.output_uri"


def test_every_field_has_a_description():
    schema = BuildConfig.model_json_schema()
    missing = []
    for name, model in [("BuildConfig", schema), *schema.get("$defs", {}).items()]:
        for field, prop in model.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}")
    assert not missing


def test_yaml_toml_json_and_overrides(tmp_path):
    (tmp_path / "b.yaml").write_text("region:\n  bbox: [0.1, 52.19, 0.16, 52.205]\nyear: 2022\n")
    (tmp_path / "b.toml").write_text("year = 2022\n[region]\nbbox = [0.1, 52.19, 0.16, 52.205]\n")
    (tmp_path / "b.json").write_text(json.dumps({"region": {"bbox": [0.1, 52.19, 0.16, 52.205]}, "year": 2022}))
    cfgs = [build_config(tmp_path / f"b.{ext}") for ext in ("yaml", "toml", "json")]
    assert cfgs[0] == cfgs[1] == cfgs[2]
    cfg = build_config(tmp_path / "b.yaml", parse_overrides(["training.steps=7", "seed=3"]))
    assert cfg.training.steps == 7 and cfg.seed == 3
    with pytest.raises(ConfigError, match="training.steps"):
        build_config(tmp_path / "b.yaml", parse_overrides(["training.steps=0"]))
    with pytest.raises(ConfigError):
        parse_overrides(["no-equals-sign"])


def test_geojson_feature_accepted():
    feat = {"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[0.1, 52.19], [0.16, 52.19], [0.16, 52.205], [0.1, 52.19]]]}}
    cfg = build_config(None, _cfg(region={"geojson": feat}))
    assert cfg.region.geometry().area > 0


def test_unwritable_output_fails_before_work(tmp_path):
    from tasks.preflight import preflight

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = build_config(None, _cfg(storage={"output_uri": str(blocker / "out"), "work_uri": str(tmp_path / "w")}))
    with pytest.raises(ConfigError) as ei:
        preflight(cfg)
    assert ei.value.field == "storage.output_uri"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


def test_preflight_probe_removes_only_what_it_created(tmp_path):
    from tasks.preflight import check_writable

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("x")
    check_writable(str(tmp_path / "a" / "b" / "c"), StorageConfig(), "storage.work_uri")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep"]
    check_writable(str(tmp_path / "a"), StorageConfig(), "storage.work_uri")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep"]


def test_preflight_without_blocks_needs_no_prefect(tmp_path, monkeypatch):
    """Checks that need no more than a stat run without the Prefect API (no block named)."""
    from tasks.preflight import local_checks

    monkeypatch.delenv("SH_CLIENT_ID", raising=False)
    cfg = build_config(None, _cfg(source={"kind": "sentinelhub"},
                                  storage={"output_uri": str(tmp_path / "o"), "work_uri": str(tmp_path / "w")}))
    with pytest.raises(ConfigError) as ei:
        local_checks(cfg)
    assert ei.value.field == "source.sentinelhub" and "SH_CLIENT_ID" in str(ei.value)
    monkeypatch.setenv("SH_CLIENT_ID", "id")
    monkeypatch.setenv("SH_CLIENT_SECRET", "secret")
    local_checks(cfg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri", ["s3:/bucket/out", "s3:bucket", "s3://", "s3:///x", "s3://B_/x",
                                 "gs://bucket/x", "http://host/x", " ", "ftp:x"])
def test_bad_storage_uris_rejected(uri):
    with pytest.raises(ConfigError) as ei:
        build_config(None, _cfg(storage={"output_uri": uri}))
    assert ei.value.field == "storage.output_uri"


@pytest.mark.parametrize("uri", ["out", "./s3:/x", "/abs/out", "file:///tmp/x", "s3://bucket",
                                 "s3://my-bucket.v2/a/b", "memory://x", "C:/data"])
def test_good_storage_uris_accepted(uri):
    assert build_config(None, _cfg(storage={"output_uri": uri})).storage.output_uri == uri


def test_nan_is_called_not_a_number():
    with pytest.raises(ConfigError, match="not a number") as ei:
        build_config(None, _cfg(region={"bbox": [float("nan"), 52.19, 0.16, 52.205]}))
    assert ei.value.field == "region.bbox"
    with pytest.raises(ConfigError, match="not a number") as ei:
        build_config(None, _cfg(training={"learning_rate": float("nan")}))
    assert ei.value.field == "training.learning_rate"


@pytest.mark.parametrize(("item", "field"), [
    ("year.x=1", "year.x"), ("region.bbox.0=1", "region.bbox.0"), ("colour=1", "colour"),
    ("training.stepz=1", "training.stepz"), ("x", "--set"), ("=1", "--set"),
    ("a..b=1", "--set"), ("region.bbox=[1,", "region.bbox"),
])
def test_bad_overrides_rejected_at_parse_time(item, field):
    with pytest.raises(ConfigError) as ei:
        parse_overrides([item])
    assert ei.value.field == field


def test_overrides_reach_nested_and_free_form_fields():
    o = parse_overrides(["source.sentinelhub.base_url=http://x", "region.geojson.type=Polygon"])
    assert o == {"source": {"sentinelhub": {"base_url": "http://x"}}, "region": {"geojson": {"type": "Polygon"}}}


@pytest.mark.parametrize(("name", "content", "says"), [
    ("b.yaml", "a: [1,\n", "valid YAML"), ("b.toml", "a = \n", "valid TOML"),
    ("b.json", "{", "valid JSON"), ("b.yaml", "", "empty file"), ("b.yaml", "- 1\n", "mapping"),
    ("b.cfg", "a: 1\n", ".yaml"), ("missing.yaml", None, "no file"),
])
def test_bad_config_files_raise_config_error(tmp_path, name, content, says):
    from tasks.config import load_config_dict

    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=says) as ei:
        load_config_dict(tmp_path / name)
    assert ei.value.field == "config"


def test_missing_checkpoint_fails_before_work(tmp_path):
    from tasks.preflight import preflight

    cfg = build_config(None, _cfg(
        training={"enabled": False, "checkpoint_uri": str(tmp_path / "nope.pt")},
        storage={"output_uri": str(tmp_path / "o"), "work_uri": str(tmp_path / "w")}))
    with pytest.raises(ConfigError) as ei:
        preflight(cfg)
    assert ei.value.field == "training.checkpoint_uri"


def test_synthetic_labels_need_scenes_of_the_synthetic_earth():
    from tasks.errors import ConfigError
    from tasks.preflight import check_evaluation_labels, serves_synthetic_earth

    local_stac = {"kind": "stac", "stac": {"api_url": "http://127.0.0.1:8766/pc/api/stac/v1"}}
    local_sh = {"kind": "sentinelhub",
                "sentinelhub": {"preset": "custom", "base_url": "http://localhost:8765"}}
    for source in ({}, local_stac, local_sh):  # the demo and the README's local endpoints
        cfg = demo_config(source=source)
        assert serves_synthetic_earth(cfg)
        check_evaluation_labels(cfg)
    real = [{"kind": "stac"}, {"kind": "sentinelhub"},
            {"kind": "stac", "stac": {"preset": "earth-search",  # S1 still from the real PC
                                      "api_url": "http://127.0.0.1:8766/pc/api/stac/v1"}}]
    for source in real:
        cfg = demo_config(source=source)
        assert not serves_synthetic_earth(cfg)
        with pytest.raises(ConfigError, match="evaluation.labels"):
            check_evaluation_labels(cfg)
        check_evaluation_labels(demo_config(source=source, evaluation={"enabled": False}))
        check_evaluation_labels(demo_config(source=source, evaluation={
            "labels": "file", "labels_uri": "labels.geojson"}))
