"""Stage functions of the head flows (no Prefect): evaluate a build, train a head, map it.

- :func:`evaluate_build`: the build's evaluation step (``BuildConfig.evaluation``): labels
  (synthetic ground truth or a file), samples of the published store, the raw-feature and
  random-init baselines of the same pixels, the label-efficiency report and its figures
  written beside the store (``{output}/evaluations/{year}/{key}/``), optionally a head fitted
  on every sample and its predicted map with a preview.
- :func:`train_head`: labels file -> samples -> leak-free split -> head, test metrics ->
  versioned artifact ``{output}/heads/{name}/{key}``.
- :func:`predict_head_map`: a saved head over a store -> ``{output}/maps/...`` (Zarr, COG).

Each commits its output with :func:`tasks.storage.commit_stage` under a content key of its
inputs, config and code, so a re-run is served from what was committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field
from pyproj import Transformer

from tasks.config import EvaluationConfig, SourceConfig, StorageConfig
from tasks.errors import ConfigError, DataError
from tasks.grid import PIXEL_M, Tile, native_mask
from tasks.heads.config import PredictMapConfig, TrainHeadConfig
from tasks.heads.evaluate import (
    EvaluationReport,
    Gates,
    confusion_png,
    curves_png,
    label_efficiency,
    report_markdown,
    summary_table,
)
from tasks.heads.labels import LabelSet, check_counts, labels_from_arrays, read_labels
from tasks.heads.models import (
    HeadConfig,
    HeadRef,
    SplitConfig,
    fit_head,
    load_head,
    metrics,
    save_head,
    split_test,
    write_head,
)
from tasks.heads.predict import MapRef, map_preview_png, predict_map
from tasks.heads.samples import (
    dpixel_features,
    encoder_embeddings,
    random_init_model,
    sample_store,
)
from tasks.publish import year_store_uri
from tasks.refs import CheckpointRef, DPixelRef
from tasks.sources._noise import hash_keys, tag, uniform
from tasks.stop import check_stop
from tasks.storage import (
    code_version,
    commit_stage,
    content_key,
    get_fs,
    join,
    normalise,
    write_bytes_atomic,
    zarr_store,
)

__all__ = ["EvaluationRef", "check_inputs", "evaluate_build", "predict_head_map", "store_model_version",
           "synthetic_labels", "train_head"]

CODE = ("tasks.heads", "tasks.reader", "tasks.sources.synthetic")


class EvaluationRef(BaseModel):
    """A committed evaluation of a build."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="Folder beside the store: report.json, report.md, PNGs.")
    key: str
    passed: bool
    checks: list[str] = Field(default_factory=list)
    markdown: str = Field(description="The report as a Markdown table.")
    table: str = Field(default="", description="The report as a plain-text table (terminal).")
    curves_png: str
    confusion_png: str | None = None
    head_uri: str | None = None
    map_uri: str | None = None
    map_png: str | None = None
    classes: list[str] = Field(default_factory=list)
    seconds: float = 0.0


def store_model_version(output_uri: str, year: int, storage: StorageConfig) -> str:
    """The model version recorded in a year store's zone groups.

    Raises:
        DataError: no store, or zone groups of different model versions.
    """
    try:
        root = zarr.open_group(zarr_store(year_store_uri(output_uri, year), storage,
                                          read_only=True), mode="r")
    except FileNotFoundError:
        raise DataError(f"Expected a published store {output_uri}/{year}.zarr. Got none.") from None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        versions = {str(g.attrs.get("tessera:model_version")) for n, g in root.groups()
                    if n.startswith("utm")}
    if len(versions) != 1:
        raise DataError(f"Expected one model version in {output_uri}/{year}.zarr. Got "
                        f"{sorted(versions) or 'none'}.")
    return versions.pop()


def synthetic_labels(tiles: Sequence[Tile], year: int, source: SourceConfig,
                     target: str, edge_px: int, per_parcel: int, seed: int) -> LabelSet:
    """Point labels from the synthetic Earth's ground truth (polygon id = parcel id).

    Up to about ``per_parcel`` pixels of each parcel in each tile (hash subsample), away from
    parcel edges by ``edge_px``; ``land_cover`` gives classes, ``canopy_height`` metres of
    forest parcels.

    Raises:
        ConfigError: the source is not the synthetic Earth (field ``evaluation.labels``).
    """
    if source.kind != "synthetic":
        raise ConfigError("evaluation.labels", f"Expected source.kind 'synthetic' for ground-"
                          f"truth labels ({target!r}). Got {source.kind!r}: set "
                          "evaluation.labels to 'file' and evaluation.labels_uri.")
    from scipy.ndimage import maximum_filter, minimum_filter

    from tasks.sources.synthetic import ALL_CLASS_NAMES, DECIDUOUS, EVERGREEN, SyntheticSource

    src = SyntheticSource(source.synthetic)
    lon_all, lat_all, val_all, pid_all = [], [], [], []
    for tile in tiles:
        check_stop("synthetic labels")
        gt = src.ground_truth(tile, year)
        pid = gt.parcel_id
        ok = native_mask(tile).copy()
        if edge_px:
            size = 2 * edge_px + 1
            ok &= (maximum_filter(pid, size=size, mode="nearest") == pid) & \
                  (minimum_filter(pid, size=size, mode="nearest") == pid)
        if target == "canopy_height":
            ok &= np.isin(gt.land_cover, (DECIDUOUS, EVERGREEN))
        rr, cc = np.nonzero(ok)
        p = pid[rr, cc]
        uniq, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
        rate = np.minimum(1.0, per_parcel / counts)[inv]
        u = uniform(hash_keys(int(seed), tag("synthetic-labels"), tile.x0 // 10 + cc.astype(np.int64),
                              tile.y0 // 10 - rr.astype(np.int64)))
        keep = u < rate
        rr, cc, p = rr[keep], cc[keep], p[keep]
        x = tile.x0 + (cc + 0.5) * PIXEL_M
        y = tile.y0 - (rr + 0.5) * PIXEL_M
        lon, lat = Transformer.from_crs(tile.epsg, 4326, always_xy=True).transform(x, y)
        lon_all.append(np.asarray(lon))
        lat_all.append(np.asarray(lat))
        pid_all.append(p)
        if target == "land_cover":
            val_all.append(np.asarray(ALL_CLASS_NAMES, dtype=object)[gt.land_cover[rr, cc]])
        else:
            val_all.append(gt.canopy_height[rr, cc].astype(np.float64))
    import shapely

    lon, lat = np.concatenate(lon_all), np.concatenate(lat_all)
    if not lon.size:
        raise DataError(f"Expected ground-truth pixels for {target!r} in tiles "
                        f"{[t.id for t in tiles]}. Got none.")
    values = np.concatenate(val_all)
    return labels_from_arrays(shapely.points(lon, lat), values.tolist(),
                              f"synthetic {target} {year}",
                              task="classification" if target == "land_cover" else "regression",
                              polygon_id=np.concatenate(pid_all).tolist())


def _load_encoder(ckpt: CheckpointRef, storage: StorageConfig):  # noqa: ANN202
    from tessera_model import load_model

    fs, path = get_fs(ckpt.uri, storage)
    with fs.open(path, "rb") as f:
        return load_model(f)


def evaluate_build(
    dps: Sequence[DPixelRef],
    ckpt: CheckpointRef,
    year: int,
    cfg: EvaluationConfig,
    source: SourceConfig,
    storage: StorageConfig,
    seed: int,
) -> EvaluationRef:
    """The evaluation step of a build (see the module docstring); committed beside the store."""
    key = content_key("evaluate", code_version(*CODE), [d.key for d in dps], ckpt.key, year,
                      cfg, source if cfg.labels != "file" else None, seed)
    out = normalise(storage.output_uri)
    uri = join(out, "evaluations", str(year), key)
    return commit_stage(uri, storage, EvaluationRef,
                        lambda: _evaluate(dps, ckpt, year, cfg, source, storage, seed, uri, key))


def _evaluate(dps: Sequence[DPixelRef], ckpt: CheckpointRef, year: int, cfg: EvaluationConfig,
              source: SourceConfig, storage: StorageConfig, seed: int, uri: str,
              key: str) -> EvaluationRef:
    t0 = time.perf_counter()
    out = normalise(storage.output_uri)
    if cfg.labels == "file":
        labels = read_labels(str(cfg.labels_uri), cfg.label_column, storage,
                             id_column=cfg.id_column)
    else:
        labels = synthetic_labels([d.tile for d in dps], year, source, cfg.labels, cfg.edge_px,
                                  cfg.max_per_polygon, seed)
    samples = sample_store(labels, out, year, storage, max_per_polygon=cfg.max_per_polygon,
                           seed=seed)
    sets = {"embeddings": samples.features}
    if cfg.raw_baseline:
        sets["raw"] = dpixel_features(samples, dps, storage)
    if cfg.random_init_baseline:
        _, spec = _load_encoder(ckpt, storage)
        model = random_init_model(spec, cfg.random_init_seed)
        sets["random_init"] = encoder_embeddings(samples, dps, model, seed, storage)
    finite = np.all([np.isfinite(v).all(1) for v in sets.values()], axis=0)
    samples = samples.take(finite)
    sets = {k: v[finite] for k, v in sets.items()}
    test = split_test(samples, SplitConfig(by=cfg.split_by, block_m=cfg.block_m,
                                           test_fraction=cfg.test_fraction, seed=seed))
    head_cfg = HeadConfig(kind=cfg.head, seed=seed)
    gates = Gates(at_k=cfg.gate_k, min_score=cfg.min_score,
                  min_gain_over_random_init=cfg.min_gain_over_random_init,
                  min_gain_over_raw=cfg.min_gain_over_raw)
    rep = label_efficiency(sets, samples, test, head_cfg, cfg.ks, cfg.seeds, gates=gates,
                           label_noise=cfg.label_noise)
    files = {"report.json": rep.model_dump_json(indent=1).encode(),
             "report.md": report_markdown(rep).encode(), "curves.png": curves_png(rep)}
    if rep.confusion:
        files["confusion.png"] = confusion_png(rep.confusion, rep.confusion_classes)
    for name, data in files.items():
        write_bytes_atomic(join(uri, name), data, storage)
    head_uri = map_uri = map_png = None
    if cfg.predict_map:
        check_stop("evaluation map")
        version = store_model_version(out, year, storage)
        h = fit_head(samples.features, samples.label, head_cfg, samples.task, len(samples.classes))
        head_uri = join(out, "heads", f"evaluation-{cfg.labels}", key)
        ref = HeadRef(uri=head_uri, key=key, task=samples.task, classes=list(samples.classes),
                      store_uri=year_store_uri(out, year), year=year, model_version=version,
                      n_samples=len(samples), n_polygons=int(np.unique(samples.polygon_id).size),
                      metrics={k: v for k, v in rep.rows[-1].items() if k.endswith("_mean")
                               and isinstance(v, float)})
        save_head(h, head_uri, storage, ref)
        map_uri = join(out, "maps", f"evaluation-{cfg.labels}-{key}", f"{year}.zarr")
        tiles_bbox = _tiles_bbox([d.tile for d in dps])
        mref = predict_map(h, head_uri, list(samples.classes), out, year, map_uri, storage,
                           bbox=tiles_bbox, cog=cfg.cog)
        map_png = join(uri, f"map-{mref.groups[0]}.png")
        write_bytes_atomic(map_png, map_preview_png(map_uri, mref.groups[0], storage), storage)
    return EvaluationRef(
        uri=uri, key=key, passed=rep.passed, checks=rep.checks, markdown=report_markdown(rep),
        table=summary_table(rep, f"Evaluation ({cfg.labels})"),
        curves_png=join(uri, "curves.png"),
        confusion_png=join(uri, "confusion.png") if rep.confusion else None,
        head_uri=head_uri, map_uri=map_uri, map_png=map_png, classes=list(samples.classes),
        seconds=round(time.perf_counter() - t0, 3))


def _tiles_bbox(tiles: Sequence[Tile]) -> tuple[float, float, float, float]:
    """A lon/lat box just inside the union of tiles (so no neighbouring shard is touched)."""
    boxes = []
    for t in tiles:
        tr = Transformer.from_crs(t.epsg, 4326, always_xy=True)
        boxes.append(tr.transform_bounds(t.x0 + 20, t.y1 + 20, t.x1 - 20, t.y0 - 20))
    b = np.asarray(boxes)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def check_inputs(cfg: object) -> None:
    """Checks a command line runs before it starts a Prefect server: a train-head config's
    labels are read and validated, a predict-map config's head is loaded, an evaluation's
    label file (if any) is read. Raises what the stage itself would."""
    if isinstance(cfg, TrainHeadConfig):
        labels = read_labels(cfg.labels_uri, cfg.label_column, cfg.storage, task=cfg.task,
                             id_column=cfg.id_column, crs=cfg.crs, layer=cfg.layer)
        check_counts(labels, cfg.min_polygons_per_class)
        store_model_version(normalise(cfg.storage.output_uri), cfg.year, cfg.storage)
    elif isinstance(cfg, PredictMapConfig):
        load_head(cfg.head_uri, cfg.storage)
        store_model_version(normalise(cfg.storage.output_uri), cfg.year, cfg.storage)
    else:
        ev = getattr(cfg, "evaluation", None)
        if isinstance(ev, EvaluationConfig) and ev.labels == "file":
            read_labels(str(ev.labels_uri), ev.label_column, cfg.storage,  # type: ignore[attr-defined]
                        id_column=ev.id_column)


def train_head(cfg: TrainHeadConfig) -> HeadRef:
    """Train a head on a label file over a published store (see the module docstring).

    Raises:
        ConfigError, DataError: bad labels (:func:`~tasks.heads.labels.read_labels`), too few
            per class, labels outside the store.
    """
    st = cfg.storage
    out = normalise(st.output_uri)
    labels = read_labels(cfg.labels_uri, cfg.label_column, st, task=cfg.task,
                         id_column=cfg.id_column, crs=cfg.crs, layer=cfg.layer)
    check_counts(labels, cfg.min_polygons_per_class)
    version = store_model_version(out, cfg.year, st)
    fs, path = get_fs(cfg.labels_uri, st)
    ident = fs.info(path)
    key = content_key("train-head", code_version(*CODE), cfg.model_dump(mode="json",
                      exclude={"storage"}), out, version, ident.get("size"),
                      str(ident.get("mtime") or ident.get("ETag")))
    uri = join(out, "heads", cfg.name, key)

    def fit() -> HeadRef:
        t0 = time.perf_counter()
        samples = sample_store(labels, out, cfg.year, st, cfg.max_per_polygon, cfg.seed,
                               cfg.inner_buffer_m)
        test = split_test(samples, cfg.split)
        n_cls = len(samples.classes)
        if samples.task == "classification":
            missing = sorted(set(range(n_cls)) - set(samples.label[~test].tolist()))
            if missing:
                raise DataError(f"min_polygons_per_class: Expected training pixels of every class. "
                                f"Got none of {[samples.classes[i] for i in missing]} (too few "
                                "polygons on the training side of the split, or on no-data).")
        h = fit_head(samples.features[~test], samples.label[~test], cfg.head, samples.task, n_cls)
        m = metrics(samples.label[test], h.predict(samples.features[test]), samples.task, n_cls) \
            if test.any() else {}
        if cfg.refit_on_all:
            h = fit_head(samples.features, samples.label, cfg.head, samples.task, n_cls)
        ref = HeadRef(uri=uri, key=key, task=samples.task, classes=list(samples.classes),
                      store_uri=year_store_uri(out, cfg.year), year=cfg.year,
                      model_version=version, n_samples=len(samples),
                      n_polygons=int(np.unique(samples.polygon_id).size),
                      metrics={k: round(v, 4) for k, v in m.items()},
                      seconds=round(time.perf_counter() - t0, 3))
        return write_head(h, uri, st, ref)

    return commit_stage(uri, st, HeadRef, fit)


def predict_head_map(cfg: PredictMapConfig) -> MapRef:
    """Apply a saved head to a store (see the module docstring).

    Raises:
        DataError: the head was trained on another model version than the store's (a map
            never mixes versions), or no store.
    """
    st = cfg.storage
    out = normalise(st.output_uri)
    head, meta = load_head(cfg.head_uri, st)
    version = store_model_version(out, cfg.year, st)
    if meta["model_version"] != version:
        raise DataError(f"Expected a head trained on model version {version} (the store's). "
                        f"Got {meta['model_version']} ({cfg.head_uri}).")
    parts = cfg.head_uri.rstrip("/").split("/")
    map_uri = cfg.map_uri or join(out, "maps", f"{parts[-2]}-{parts[-1]}"
                                  + (f"-{content_key(cfg.bbox)[:8]}" if cfg.bbox else ""),
                                  f"{cfg.year}.zarr")
    ref = predict_map(head, cfg.head_uri, list(meta.get("classes", [])), out, cfg.year, map_uri,
                      st, bbox=cfg.bbox, cog=cfg.cog)
    return ref


def evaluation_json(ref: EvaluationRef, storage: StorageConfig) -> EvaluationReport:
    """The full report of a committed evaluation."""
    fs, path = get_fs(join(ref.uri, "report.json"), storage)
    with fs.open(path, "rb") as f:
        return EvaluationReport.model_validate(json.loads(f.read()))
