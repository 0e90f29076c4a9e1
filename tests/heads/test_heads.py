"""Labels in, samples out, heads, splits, evaluation and predicted maps on a tiny fake store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from tasks.config import StorageConfig
from tasks.errors import ConfigError, DataError
from tasks.heads.evaluate import Gates, confusion_png, curves_png, label_efficiency, report_markdown
from tasks.heads.labels import check_counts, labels_from_arrays, read_labels
from tasks.heads.models import (
    HeadConfig,
    HeadRef,
    SplitConfig,
    fit_head,
    load_head,
    metrics,
    save_head,
    split_test,
)
from tasks.heads.predict import map_preview_png, predict_map, read_map
from tasks.heads.samples import sample_store
from tests.heads.conftest import (
    N_CLASSES,
    TILES,
    parcel_polygons,
    tile_truth,
    to_lonlat,
    write_gpkg,
)
from tests.tasks.test_publish import YEAR

NAMES = ["c0", "c1", "c2"]


def _parcels(n: int = 12) -> tuple[list, list[str], list[int]]:
    geoms, classes, ids = [], [], []
    for t in TILES:
        g, c, i = parcel_polygons(t, n)
        geoms += g
        classes += [NAMES[k] for k in c]
        ids += i
    return geoms, classes, ids


def _geojson(path: Path, geoms: list, props: dict[str, list]) -> None:
    feats = [{"type": "Feature", "geometry": shapely.geometry.mapping(g),
              "properties": {k: v[n] for k, v in props.items()}} for n, g in enumerate(geoms)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def test_four_formats_read_the_same_labels(tmp_path: Path) -> None:
    utm, classes, ids = _parcels(4)
    ll = to_lonlat(utm)
    _geojson(tmp_path / "l.geojson", ll, {"crop": classes, "pid": ids})
    write_gpkg(tmp_path / "l.gpkg", utm, {"crop": classes, "pid": ids}, 32631)  # a UTM CRS
    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"]}}}
    tbl = pa.table({"crop": classes, "pid": ids, "geometry": [shapely.to_wkb(g) for g in ll]})
    pq.write_table(tbl.replace_schema_metadata({b"geo": json.dumps(geo).encode()}),
                   tmp_path / "l.parquet")
    cents = shapely.centroid(np.asarray(ll, dtype=object))
    (tmp_path / "l.csv").write_text("lon,lat,crop,pid\n" + "".join(
        f"{p.x},{p.y},{c},{i}\n" for p, c, i in zip(cents, classes, ids, strict=True)))
    sets = {ext: read_labels(str(tmp_path / f"l.{ext}"), "crop", id_column="pid")
            for ext in ("geojson", "gpkg", "parquet", "csv")}
    for ext, ls in sets.items():
        assert ls.task == "classification" and ls.classes == tuple(sorted(set(classes))), ext
        assert ls.polygon_id.tolist() == ids, ext
        assert ls.kind == ("point" if ext == "csv" else "polygon"), ext
    a, b = sets["geojson"].geometry, sets["gpkg"].geometry
    assert np.allclose(shapely.get_coordinates(a), shapely.get_coordinates(b), atol=1e-7)


@pytest.mark.parametrize(("text", "column", "err", "match"), [
    ("", "crop", DataError, "empty file"),
    ('{"type": "FeatureCollection", "features": []}', "crop", DataError, "empty file"),
    ("POINTS", "nope", ConfigError, "label_column.*Got 'nope'"),
    ("MIXED_TYPES", "crop", DataError, "one type in column 'crop'"),
    ("MIXED_GEOMS", "crop", DataError, "one geometry type"),
])
def test_label_errors_name_the_problem(tmp_path: Path, text: str, column: str,
                                       err: type[Exception], match: str) -> None:
    p = tmp_path / "x.geojson"
    pt = {"type": "Point", "coordinates": [0.11, 52.19]}
    poly = shapely.geometry.mapping(shapely.box(0.11, 52.19, 0.12, 52.2))
    feats = {"POINTS": [(pt, "a"), (pt, "b")], "MIXED_TYPES": [(pt, "a"), (pt, 3)],
             "MIXED_GEOMS": [(pt, "a"), (poly, "b")]}.get(text)
    if feats is not None:
        text = json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": g, "properties": {"crop": v}} for g, v in feats]})
    p.write_text(text)
    with pytest.raises(err, match=match):
        read_labels(str(p), column)


def test_too_few_per_class_and_outside_store(tmp_path: Path, fake_store: StorageConfig) -> None:
    ls = labels_from_arrays(shapely.points([0.5, 0.6, 0.7], [10, 10, 10]), ["a", "a", "b"], "t")
    with pytest.raises(DataError, match="'b': 1"):
        check_counts(ls, 2)
    with pytest.raises(DataError, match="outside the store"):
        sample_store(ls, fake_store.output_uri, YEAR, fake_store)


@pytest.fixture(scope="module")
def samples(fake_store: StorageConfig):
    utm, classes, ids = _parcels(16)
    ls = labels_from_arrays(to_lonlat(utm), classes, "parcels", polygon_id=ids)
    return sample_store(ls, fake_store.output_uri, YEAR, fake_store, max_per_polygon=40, seed=0)


def test_samples_keep_label_polygon_and_location(samples) -> None:
    assert len(samples) > 0
    counts = np.bincount(np.unique(samples.polygon_id, return_inverse=True)[1])
    assert counts.max() <= 80 and counts.min() >= 10  # ~40 of 900 pixels per polygon
    # every sample's label is the truth at its location
    for t in TILES:
        cls, pid = tile_truth(t)
        m = (samples.x >= t.x0) & (samples.x < t.x1)
        r = ((t.y0 - samples.y[m]) // 10).astype(int)
        c = ((samples.x[m] - t.x0) // 10).astype(int)
        assert (pid[r, c] == samples.polygon_id[m]).all()
        assert (np.asarray(NAMES)[cls[r, c]] == np.asarray(samples.classes)[samples.label[m]]).all()
    assert np.isfinite(samples.features).all() and samples.features.shape[1] == 128
    assert (samples.epsg == 32631).all() and np.all((samples.lon > 0) & (samples.lat > 52))


@pytest.mark.parametrize("kind", ["linear", "random_forest", "gradient_boosting", "mlp"])
def test_heads_learn_the_classes(samples, kind: str) -> None:
    test = split_test(samples, SplitConfig(by="polygon", test_fraction=0.4))
    cfg = HeadConfig(kind=kind, n_estimators=10, max_depth=4, epochs=15, hidden=(64,),
                     device="cpu")
    train = np.flatnonzero(~test)[::3]  # a few hundred samples: heads stay fast under load
    h = fit_head(samples.features[train], samples.label[train], cfg, "classification", N_CLASSES)
    m = metrics(samples.label[test], h.predict(samples.features[test]), "classification", N_CLASSES)
    assert m["macro_f1"] > 0.8, (kind, m)
    p = h.predict_proba(samples.features[test][:5])
    assert p.shape == (5, N_CLASSES) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_regression_head(samples) -> None:
    y = samples.label.astype(np.float64) * 10 + 5
    h = fit_head(samples.features, y, HeadConfig(kind="linear"), "regression")
    assert metrics(y, h.predict(samples.features), "regression")["r2"] > 0.9


def test_splits_never_split_a_polygon(samples) -> None:
    for cfg in (SplitConfig(by="polygon"), SplitConfig(by="block", block_m=640)):
        test = split_test(samples, cfg)
        assert 0 < test.sum() < len(samples)
        for pid in np.unique(samples.polygon_id):
            assert len(set(test[samples.polygon_id == pid].tolist())) == 1
        assert not set(samples.polygon_id[test]) & set(samples.polygon_id[~test])


def test_head_artifact_round_trip_and_tamper_check(tmp_path: Path, samples) -> None:
    st = StorageConfig(output_uri=str(tmp_path), work_uri=str(tmp_path / "w"))
    h = fit_head(samples.features, samples.label, HeadConfig(), "classification", N_CLASSES)
    ref = HeadRef(uri=str(tmp_path / "head"), key="k", task="classification", classes=NAMES,
                  store_uri="s", year=YEAR, model_version="1.0", n_samples=len(samples),
                  n_polygons=3, metrics={"macro_f1": 1.0})
    save_head(h, ref.uri, st, ref)
    h2, meta = load_head(ref.uri, st)
    assert meta["model_version"] == "1.0" and meta["config"]["kind"] == "linear"
    assert (h2.predict(samples.features) == h.predict(samples.features)).all()
    (tmp_path / "head" / "model.pkl").write_bytes(b"tampered")
    with pytest.raises(DataError, match="sha256"):
        load_head(ref.uri, st)


def test_label_efficiency_report_and_gates(samples) -> None:
    test = split_test(samples, SplitConfig(by="polygon", test_fraction=0.4))
    noise = np.random.default_rng(0).normal(size=samples.features.shape).astype(np.float32)
    rep = label_efficiency({"embeddings": samples.features, "random_init": noise}, samples, test,
                           HeadConfig(), ks=(1, 2, 5), seeds=2,
                           gates=Gates(at_k=5, min_score=0.8, min_gain_over_random_init=0.2))
    assert rep.passed, rep.checks
    assert rep.mean("embeddings", 5) > 0.8 > rep.mean("random_init", 5)
    assert len(rep.confusion) == N_CLASSES
    assert "k=1" in report_markdown(rep)
    # the same gates fail when the "embeddings" carry nothing
    bad = label_efficiency({"embeddings": noise, "random_init": noise}, samples, test,
                           HeadConfig(), ks=(1, 5), seeds=2,
                           gates=Gates(at_k=5, min_score=0.8, min_gain_over_random_init=0.2))
    assert not bad.passed and any(c.startswith("FAIL") for c in bad.checks)
    for png in (curves_png(rep), confusion_png(rep.confusion, rep.confusion_classes)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_predicted_map_on_store_grid_resumable(tmp_path: Path, samples, fake_store) -> None:
    h = fit_head(samples.features, samples.label, HeadConfig(), "classification", N_CLASSES)
    uri = str(tmp_path / "map.zarr")
    ref = predict_map(h, "head", NAMES, fake_store.output_uri, YEAR, uri, fake_store, cog=True)
    assert ref.groups == ["utm31"] and ref.n_windows == 3  # two tiles and the gap between
    m = read_map(uri, "utm31", fake_store)
    cls, prob = m["class"], m["probability"]
    import zarr

    scales = zarr.open_group(f"{fake_store.output_uri}/{YEAR}.zarr/utm31", mode="r")["scales"][:]
    assert ((cls == 255) == np.isnan(scales)).all()  # no data exactly where the embedding has none
    assert np.isnan(prob[cls == 255]).all()
    truth, _ = tile_truth(TILES[0])
    block = cls[:256, :256]
    ok = block != 255
    assert (block[ok] == truth[ok]).mean() > 0.95
    assert m["attrs"]["proj:code"] == "EPSG:32631"
    import rasterio

    with rasterio.open(ref.cog_uris[0]) as src:
        assert src.crs.to_epsg() == 32631 and src.count == 2
        assert src.transform.c == m["attrs"]["spatial:transform"][2]
    assert map_preview_png(uri, "utm31", fake_store)[:4] == b"\x89PNG"
    # resumable: drop the final commit and one window's marker; a re-run redoes only that
    import shutil

    (tmp_path / "map.zarr.done.json").unlink()
    marker = tmp_path / "map.zarr" / ".tessera" / "windows" / "utm31" / "0_0.done.json"
    marker.unlink()
    shutil.rmtree(tmp_path / "map.zarr" / "utm31" / "class" / "c" / "0" / "0", ignore_errors=True)
    ref2 = predict_map(h, "head", NAMES, fake_store.output_uri, YEAR, uri, fake_store)
    assert ref2.n_valid == ref.n_valid
    assert (read_map(uri, "utm31", fake_store)["class"] == cls).all()


def test_label_noise_hurts_and_keeps_the_test_side_clean(samples) -> None:
    test = split_test(samples, SplitConfig(by="polygon", test_fraction=0.4))
    feats = {"embeddings": samples.features}
    clean = label_efficiency(feats, samples, test, HeadConfig(), ks=(5,), seeds=2)
    noisy = label_efficiency(feats, samples, test, HeadConfig(), ks=(5,), seeds=2,
                             label_noise=0.6)
    assert noisy.mean("embeddings", 5) < clean.mean("embeddings", 5) - 0.1
    assert noisy.n_test_samples == clean.n_test_samples
