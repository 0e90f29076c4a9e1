"""Label efficiency on the synthetic Earth: raw features vs random-init vs trained embeddings.

For each world (``--worlds default hard``), on a row of ``--tiles`` 256-px tiles of zone 31
near the demo region: acquire, cloud-mask and extract d-pixels (stage functions, no Prefect),
take ground-truth labels (land cover by parcel: up to 20 interior pixels per parcel; canopy
height of forest parcels), and compare, on held-out tiles (every other tile), a logistic
regression (ridge for height) fitted on k labelled parcels per class:

- ``raw``: per-band seasonal statistics of the same d-pixels (quarterly S2 medians, S1 means);
- ``random_init``: the ``small`` encoder with random weights;
- ``trained``: the ``small`` encoder trained by the factory's training stage on the same
  tiles' d-pixels for at most ``--steps`` steps (0: skipped), with the default validation
  (one tile held out of the training set, a validation loss every ``--validate-every``
  steps, a plateau stop after ``--patience`` validations without a 1 % gain; 0: run every
  step); its CPU time, loss curve and validation curve are reported.

Embeddings are computed at the sampled pixels by the encoder, then quantised to int8 and
dequantised with the published rule (:func:`tessera_model.quantise.quantise`, per-pixel
scale), so the head sees what the store holds; ``trained_float`` is the trained encoder's
float output before quantisation (to separate quantisation from what the encoder learned).
Every feature set goes through the same head (standardisation, then the configured head).
Run:

    python benchmarks/bench_heads.py --tiles 4 --worlds default hard --steps 0
    OMP_NUM_THREADS=1 python benchmarks/bench_heads.py --tiles 4 --worlds hard --steps 800 \
        --set pixels_per_tile=65536 --targets land_cover

(one torch thread: on a shared 2-core box two threads spin-wait and cost about 2.5x the CPU
time per training step). ``--head KEY=VALUE`` sets a head field (e.g. ``--head c=0.1``).

``--world KEY=VALUE`` sets a synthetic-world knob on top of the preset (e.g.
``--world edge_mixing=1``); ``--set KEY=VALUE`` a training field (e.g. ``--set
view_fraction=0.5``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from pyproj import Transformer

from tasks import acquire, dpixels, mask, train
from tasks.config import (
    DPixelConfig,
    MaskConfig,
    ModelConfig,
    SourceConfig,
    StorageConfig,
    TrainingConfig,
)
from tasks.grid import Tile
from tasks.heads.evaluate import label_efficiency, report_markdown
from tasks.heads.models import HeadConfig
from tasks.heads.samples import (
    Samples,
    dpixel_features,
    encoder_embeddings,
    random_init_model,
)
from tasks.heads.stages import synthetic_labels
from tasks.sources.synthetic import SyntheticWorldConfig
from tessera_model import ModelSpec, load_model

YEAR = 2024
X0, Y0 = 312320, 5783040  # zone 31N, 10 km SE of the demo region: all classes but water


def samples_of(labels, epsg: int) -> Samples:  # noqa: ANN001
    """Point labels as samples on the zone grid (no store: features come later)."""
    import shapely

    xy = shapely.get_coordinates(labels.geometry)
    x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(xy[:, 0], xy[:, 1])
    x = (np.floor(np.asarray(x) / 10) + 0.5) * 10
    y = (np.floor(np.asarray(y) / 10) + 0.5) * 10
    n = len(labels)
    return Samples(features=np.zeros((n, 0), np.float32), label=labels.value,
                   polygon_id=labels.polygon_id, epsg=np.full(n, epsg, np.int32), x=x, y=y,
                   lon=xy[:, 0], lat=xy[:, 1], task=labels.task, classes=labels.classes)


def run_world(world: str, tiles: list[Tile], steps: int, root: Path, ks: list[int],
              seeds: int, knobs: dict | None = None, training: dict | None = None,
              targets: tuple[str, ...] = ("land_cover", "canopy_height"),
              head: HeadConfig | None = None) -> dict:
    st = StorageConfig(output_uri=str(root / f"out-{world}"), work_uri=str(root / f"work-{world}"))
    source = SourceConfig(synthetic=SyntheticWorldConfig(difficulty=world, **(knobs or {})))
    t0 = time.perf_counter()
    dps = []
    for t in tiles:
        sc = acquire.acquire(t, YEAR, source, st)
        mk = mask.cloud_mask(sc, MaskConfig(), st)
        dps.append(dpixels.extract_dpixels(sc, mk, DPixelConfig(), st))
    t_data = time.perf_counter() - t0
    valid = float(np.mean([d.mean_valid_s2 for d in dps]))
    out: dict = {"world": world, "tiles": len(tiles), "seconds_data": round(t_data, 1),
                 "mean_valid_s2": round(valid, 1), "load_start": _load()}
    spec = ModelSpec.preset("small")
    models = {"random_init": random_init_model(spec, 12345)}
    if steps:
        cfg = TrainingConfig(steps=steps, **(training or {}))
        c0, w0 = time.process_time(), time.perf_counter()
        ts = train.build_training_set(dps, cfg, 0, st)
        losses: list[tuple[int, float]] = []
        reports: list = []

        def progress(p) -> None:  # noqa: ANN001
            losses.append((p.step, round(p.loss, 3)))
            if p.validation_step is not None and (not reports or reports[-1].validation_step
                                                  != p.validation_step):
                print(train.progress_description(p), flush=True)
            reports.append(p)

        ckpt = train.train_model(ts, ModelConfig(preset="small"), cfg, 0, st, progress=progress)
        out["train_cpu_s"] = round(time.process_time() - c0, 1)
        out["train_wall_s"] = round(time.perf_counter() - w0, 1)
        out["load_after_training"] = _load()
        out["training_pixels"] = ts.n_pixels
        out["loss_curve"] = losses
        import torch

        meta = torch.load(ckpt.uri, map_location="cpu", weights_only=False)
        out["steps_done"] = int(meta["step"])
        out["converged"] = bool(meta.get("converged", False))
        out["validation_curve"] = [[int(a), round(float(b), 3)] for a, b in meta.get("validation", [])]
        loss = np.asarray(meta["losses"], np.float64)
        w = 25  # mean training loss per validation interval
        out["loss_means"] = [[int(min(i + w, loss.size)), round(float(loss[i:i + w].mean()), 2)]
                             for i in range(0, loss.size, w)]
        out["validation_tiles"] = zarr_attrs(ts.uri).get("validation_tiles", [])
        with open(ckpt.uri, "rb") as f:
            models["trained"], _ = load_model(f)
    test_tiles = {t.id for i, t in enumerate(tiles) if i % 2 == 1}
    for target in targets:
        labels = synthetic_labels(tiles, YEAR, source, target, 1, 20, 0)
        s = samples_of(labels, tiles[0].epsg)
        sets = {"raw": dpixel_features(s, dps, st)}
        for name, m in models.items():
            e = encoder_embeddings(s, dps, m.eval(), 0, st)
            sets[name] = published(e)
            if name == "trained":
                sets["trained_float"] = e
        finite = np.all([np.isfinite(v).all(1) for v in sets.values()], axis=0)
        s = s.take(finite)
        sets = {k: v[finite] for k, v in sets.items()}
        test = np.zeros(len(s), bool)
        for t in tiles:
            if t.id in test_tiles:
                test |= (s.x >= t.x0) & (s.x < t.x1)
        if "trained" in sets:  # the headline set first
            sets = {"trained": sets.pop("trained"), **sets}
        rep = label_efficiency(sets, s, test, head or HeadConfig(kind="linear"), ks=ks,
                               seeds=seeds)
        out[target] = rep.model_dump()
        print(f"\n### {world} world, {target}\n\n{report_markdown(rep)}", flush=True)
    out["seconds_total"] = round(time.perf_counter() - t0, 1)
    out["load_end"] = _load()
    return out


def published(e: np.ndarray) -> np.ndarray:
    """What the store holds for these embeddings: int8 with a per-pixel scale, dequantised."""
    from tessera_model.quantise import dequantise, quantise

    q, scale = quantise(e)
    return dequantise(q, scale)


def _load() -> list[float]:
    import os

    return [round(v, 2) for v in os.getloadavg()]


def zarr_attrs(uri: str) -> dict:
    import zarr

    return dict(zarr.open_group(uri, mode="r").attrs)


def _kv(items: list[str]) -> dict:
    import yaml

    return {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--worlds", nargs="+", default=["default", "hard"])
    ap.add_argument("--steps", type=int, default=0, help="Training steps (0: no trained model).")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--root", default="/tmp/bench-heads")
    ap.add_argument("--json", help="Write the results here.")
    ap.add_argument("--world", nargs="*", default=[], help="Synthetic-world knobs KEY=VALUE.")
    ap.add_argument("--set", nargs="*", default=[], help="TrainingConfig fields KEY=VALUE.")
    ap.add_argument("--targets", nargs="+", default=["land_cover", "canopy_height"])
    ap.add_argument("--head", nargs="*", default=[],
                    help="HeadConfig fields KEY=VALUE (default: the linear head).")
    a = ap.parse_args()
    tiles = [Tile(zone=31, south=False, x0=X0 + 2560 * i, y0=Y0, size_px=256) for i in range(a.tiles)]
    results = [run_world(w, tiles, a.steps, Path(a.root), a.ks, a.seeds, _kv(a.world),
                         _kv(a.set), tuple(a.targets),
                         HeadConfig(**{"kind": "linear", **_kv(a.head)})) for w in a.worlds]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k not in ("land_cover", "canopy_height")}))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
