"""Config validation: every bad input fails before any work, naming the field."""

from __future__ import annotations

import json

import pytest

from tasks.config import BuildConfig, build_config, demo_config, last_complete_year, parse_overrides
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
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_missing_checkpoint_fails_before_work(tmp_path):
    from tasks.preflight import preflight

    cfg = build_config(None, _cfg(
        training={"enabled": False, "checkpoint_uri": str(tmp_path / "nope.pt")},
        storage={"output_uri": str(tmp_path / "o"), "work_uri": str(tmp_path / "w")}))
    with pytest.raises(ConfigError) as ei:
        preflight(cfg)
    assert ei.value.field == "training.checkpoint_uri"
