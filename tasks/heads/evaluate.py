"""Label-efficiency evaluation: how well a head does with k labelled polygons per class.

For every feature set of the same pixels (the build's embeddings, the raw-feature baseline
from the d-pixels, a random-init encoder's embeddings), every k in ``ks`` and every seed,
k polygons per class are drawn from the training side of a leak-free split (nested: a
seed's k = 2 draw holds its k = 1 draw), a head is fitted on their pixels and scored on every
pixel of the held-out side. The report gives mean and spread (sample std over seeds) of
macro-F1 and accuracy (classification) or RMSE and R^2 (regression; "classes" are then the
quintiles of the polygons' values), the confusion matrix of the embeddings' head at the
largest k, and whether the report passes its gates.

Figures (Pillow only): the label-efficiency curves and the confusion matrix as PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, Field

from tasks.errors import DataError, FactoryError
from tasks.heads.models import HeadConfig, confusion, fit_head, metrics
from tasks.heads.samples import Samples
from tasks.stop import check_stop

__all__ = ["EvaluationFailed", "EvaluationReport", "Gates", "confusion_png", "curves_png",
           "label_efficiency", "report_markdown", "summary_table"]

KS = (1, 2, 5, 10, 20, 50, 100)
"""Labelled polygons per class of the label-efficiency curve."""


class EvaluationFailed(FactoryError, RuntimeError):
    """An evaluation did not pass its gates (the message lists each failed check)."""


class Gates(BaseModel):
    """Thresholds an evaluation must pass (classification: macro-F1; regression: R^2)."""

    at_k: int = Field(default=10, description="k at which the gates are checked (or the "
                      "largest k with data below it).")
    min_score: float | None = Field(default=None, description="Minimum mean score of the "
                                    "embeddings.")
    min_gain_over_random_init: float | None = Field(default=None, description="Minimum mean "
                                                    "score of embeddings minus random-init.")
    min_gain_over_raw: float | None = Field(default=None, description="Minimum mean score of "
                                            "embeddings minus the raw-feature baseline.")


class EvaluationReport(BaseModel):
    """A label-efficiency report."""

    task: str
    classes: list[str]
    head: str
    ks: list[int]
    seeds: int
    score: str = Field(description="The headline metric (macro_f1 or r2).")
    rows: list[dict[str, float | int | str]] = Field(description="One row per feature set and k.")
    confusion: list[list[int]] = Field(default_factory=list)
    confusion_classes: list[str] = Field(default_factory=list)
    n_train_polygons: dict[str, int] = Field(default_factory=dict)
    n_test_samples: int = 0
    n_test_polygons: int = 0
    dropped_classes: list[str] = Field(default_factory=list)
    checks: list[str] = Field(default_factory=list)
    passed: bool = True

    def mean(self, features: str, k: int, metric: str | None = None) -> float:
        """Mean of a metric for a feature set at k (NaN when absent)."""
        m = metric or self.score
        for r in self.rows:
            if r["features"] == features and r["k"] == k:
                return float(r[f"{m}_mean"])
        return float("nan")


def _strata(samples: Samples, n_bins: int = 5) -> tuple[np.ndarray, list[str]]:
    """Per-sample stratum: the class, or the quintile of the polygon's mean value."""
    if samples.task == "classification":
        return samples.label.astype(np.int64), list(samples.classes)
    uniq, inv = np.unique(samples.polygon_id, return_inverse=True)
    pmean = np.bincount(inv, weights=samples.label) / np.bincount(inv)
    edges = np.quantile(pmean, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, pmean)[inv], [f"q{i + 1}" for i in range(n_bins)]


def label_efficiency(
    feature_sets: Mapping[str, np.ndarray],
    samples: Samples,
    test: np.ndarray,
    head: HeadConfig,
    ks: Sequence[int] = KS,
    seeds: int = 3,
    min_polygons_per_class: int = 2,
    gates: Gates | None = None,
    label_noise: float = 0.0,
) -> EvaluationReport:
    """The label-efficiency report of several feature sets of the same samples.

    Args:
        feature_sets: name -> (N, D) features, rows as ``samples`` (first = the embeddings).
        samples: Labels, polygon ids and locations.
        test: (N,) bool held-out mask (whole polygons; :func:`~tasks.heads.models.split_test`).
        head: The head fitted for every (feature set, k, seed).
        ks: Polygons per class.
        seeds: Draws per k.
        min_polygons_per_class: Classes with fewer training (or no test) polygons are
            dropped and listed in the report.
        gates: Thresholds; failed checks are listed and ``passed`` is False.
        label_noise: Share of training polygons whose class is replaced by another class
            (drawn per seed; classification only; the test side stays clean).

    Raises:
        DataError: fewer than two classes left, or empty train or test side.
    """
    strata, names = _strata(samples)
    n_cls = len(names)
    train = ~test
    pid = samples.polygon_id
    # polygons of each stratum on the training side, and test coverage
    keep_cls, dropped, n_train_poly = [], [], {}
    for c in range(n_cls):
        tr = np.unique(pid[train & (strata == c)])
        has_test = bool((test & (strata == c)).any())
        n_train_poly[names[c]] = int(tr.size)
        if tr.size >= min_polygons_per_class and has_test:
            keep_cls.append(c)
        elif tr.size or has_test:
            dropped.append(names[c])
    if len(keep_cls) < 2:
        raise DataError(f"min_polygons_per_class: Expected at least 2 classes with "
                        f"{min_polygons_per_class} training polygons and test pixels. Got "
                        f"{n_train_poly} (test pixels {int(test.sum())}).")
    in_cls = np.isin(strata, keep_cls)
    te = test & in_cls
    pools = {c: np.unique(pid[train & (strata == c)]) for c in keep_cls}
    rows: list[dict[str, float | int | str]] = []
    score = "macro_f1" if samples.task == "classification" else "r2"
    y = samples.label
    cm_out: np.ndarray | None = None
    kmax = max(ks)
    for name, feats in feature_sets.items():
        feats = np.asarray(feats, np.float32)
        finite = np.isfinite(feats).all(1)
        for k in sorted(ks):
            per_seed: list[dict[str, float]] = []
            k_eff = min(k, max(p.size for p in pools.values()))
            for s in range(seeds):
                check_stop("label-efficiency evaluation")
                rng = np.random.default_rng([s, 1234])
                chosen = np.concatenate([rng.permutation(pools[c])[:k] for c in keep_cls])
                tr_m = train & in_cls & finite & np.isin(pid, chosen)
                te_m = te & finite
                y_tr = _noisy(y[tr_m], pid[tr_m], keep_cls, label_noise, s) \
                    if label_noise > 0 and samples.task == "classification" else y[tr_m]
                h = fit_head(feats[tr_m], y_tr, head, samples.task, n_cls)
                pred = h.predict(feats[te_m])
                per_seed.append(metrics(y[te_m], pred, samples.task, n_cls))
                if name == next(iter(feature_sets)) and k == kmax and s == 0 \
                        and samples.task == "classification":
                    cm_out = confusion(y[te_m], pred, n_cls)
            row: dict[str, float | int | str] = {"features": name, "k": k, "k_effective": k_eff}
            for m in per_seed[0]:
                vals = np.asarray([p[m] for p in per_seed])
                row[f"{m}_mean"] = round(float(vals.mean()), 4)
                row[f"{m}_std"] = round(float(vals.std(ddof=1)) if vals.size > 1 else 0.0, 4)
            rows.append(row)
    rep = EvaluationReport(
        task=samples.task, classes=list(names), head=head.kind, ks=sorted(ks), seeds=seeds,
        score=score, rows=rows,
        confusion=cm_out[np.ix_(keep_cls, keep_cls)].tolist() if cm_out is not None else [],
        confusion_classes=[names[c] for c in keep_cls] if cm_out is not None else [],
        n_train_polygons=n_train_poly, n_test_samples=int(te.sum()),
        n_test_polygons=int(np.unique(pid[te]).size), dropped_classes=dropped,
    )
    return _check(rep, list(feature_sets), gates)


def _noisy(y: np.ndarray, pid: np.ndarray, classes: list[int], share: float,
           seed: int) -> np.ndarray:
    """Labels with a ``share`` of polygons (whole polygons) relabelled as another class."""
    from tasks.sources._noise import hash_keys, tag, uniform

    u = uniform(hash_keys(int(seed), tag("label-noise"), pid.astype(np.int64)))
    flip = u < share
    cls = np.asarray(classes)
    other = (np.searchsorted(cls, y) + 1 + (uniform(hash_keys(int(seed), tag("label-noise-to"),
                                                             pid.astype(np.int64)))
                                             * (cls.size - 1)).astype(np.int64)) % cls.size
    return np.where(flip, cls[other], y)


def _check(rep: EvaluationReport, names: list[str], gates: Gates | None) -> EvaluationReport:
    if gates is None:
        return rep
    ks = [k for k in rep.ks if k <= gates.at_k] or rep.ks[:1]
    k = ks[-1]
    emb = rep.mean(names[0], k)
    checks, ok = [], True

    def check(label: str, value: float, limit: float) -> None:
        nonlocal ok
        good = bool(np.isfinite(value) and value >= limit)
        ok &= good
        checks.append(f"{'pass' if good else 'FAIL'}: {label} at k={k} is {value:.3f} "
                      f"(expected >= {limit:.3f})")

    if gates.min_score is not None:
        check(f"{rep.score} of {names[0]}", emb, gates.min_score)
    if gates.min_gain_over_random_init is not None and "random_init" in names:
        check(f"{rep.score} gain of {names[0]} over random_init", emb - rep.mean("random_init", k),
              gates.min_gain_over_random_init)
    if gates.min_gain_over_raw is not None and "raw" in names:
        check(f"{rep.score} gain of {names[0]} over raw", emb - rep.mean("raw", k),
              gates.min_gain_over_raw)
    return rep.model_copy(update={"checks": checks, "passed": ok})


def report_markdown(rep: EvaluationReport) -> str:
    """The report as a Markdown table (mean +- std of the headline metric per k)."""
    names = list(dict.fromkeys(str(r["features"]) for r in rep.rows))
    head = f"| features | {' | '.join(f'k={k}' for k in rep.ks)} |"
    lines = [f"**{rep.score}** ({rep.head} head, {rep.seeds} seeds, {rep.n_test_samples} test "
             f"pixels in {rep.n_test_polygons} held-out polygons)", "", head,
             "|" + "---|" * (len(rep.ks) + 1)]
    for n in names:
        cells = []
        for k in rep.ks:
            r = next(r for r in rep.rows if r["features"] == n and r["k"] == k)
            cells.append(f"{r[f'{rep.score}_mean']:.3f} ± {r[f'{rep.score}_std']:.3f}")
        lines.append(f"| {n} | {' | '.join(cells)} |")
    if rep.dropped_classes:
        lines += ["", f"Dropped (too few polygons): {', '.join(rep.dropped_classes)}"]
    if rep.checks:
        lines += ["", *[f"- {c}" for c in rep.checks]]
    return "\n".join(lines)


_TITLES = {"embeddings": "trained", "raw": "raw baseline", "random_init": "random-init"}


def summary_table(rep: EvaluationReport, title: str = "Evaluation") -> str:
    """The report as a plain-text table for a terminal: one row per k, one column per feature
    set (``embeddings`` shown as "trained"), mean ± std of the headline metric, then the
    gates' checks."""
    names = list(dict.fromkeys(str(r["features"]) for r in rep.rows))
    heads = [_TITLES.get(n, n) for n in names]
    width = max(15, *(len(h) + 2 for h in heads))
    lines = [f"{title}: {rep.score} on held-out blocks ({rep.n_test_samples} pixels of "
             f"{rep.n_test_polygons} polygons), {rep.head} head fitted on k labelled polygons "
             f"per class, mean ± std over {rep.seeds} seeds",
             "  k    " + "".join(h.ljust(width) for h in heads)]
    for k in rep.ks:
        cells = []
        for n in names:
            r = next(r for r in rep.rows if r["features"] == n and r["k"] == k)
            cells.append(f"{r[f'{rep.score}_mean']:.3f} ± {r[f'{rep.score}_std']:.3f}"
                         .ljust(width))
        lines.append(f"  {k:<5}" + "".join(cells))
    if rep.dropped_classes:
        lines.append(f"  dropped (too few polygons): {', '.join(rep.dropped_classes)}")
    lines += [f"  gate {c}" for c in rep.checks]
    return "\n".join(lines)


# --- figures (Pillow) ----------------------------------------------------------------------

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def curves_png(rep: EvaluationReport, size: tuple[int, int] = (640, 420)) -> bytes:
    """Label-efficiency curves: mean headline metric vs k (log axis), +-1 std bars."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 150, 30, h - 50
    vals = [float(r[f"{rep.score}_mean"]) for r in rep.rows]
    lo = min(0.0, math.floor(min(vals + [0.0]) * 10) / 10)
    hi = 1.0 if rep.score in ("macro_f1", "accuracy", "r2") else max(vals) * 1.1
    kx = np.log([max(k, 1) for k in rep.ks])
    span = max(kx[-1] - kx[0], 1e-9)

    def px(k: int, v: float) -> tuple[float, float]:
        x = left + (math.log(k) - kx[0]) / span * (right - left)
        y = bottom - (v - lo) / (hi - lo) * (bottom - top)
        return x, min(max(y, top), bottom)

    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        y = px(rep.ks[0], v)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.text((8, y - 6), f"{v:.2f}", fill="black")
    for k in rep.ks:
        x = px(k, lo)[0]
        d.line([x, bottom, x, bottom + 4], fill="black")
        d.text((x - 8, bottom + 8), str(k), fill="black")
    d.text(((left + right) // 2 - 70, h - 22), "labelled polygons per class", fill="black")
    d.text((left, 8), f"{rep.score} ({rep.head} head)", fill="black")
    names = list(dict.fromkeys(str(r["features"]) for r in rep.rows))
    for i, n in enumerate(names):
        col = _COLOURS[i % len(_COLOURS)]
        pts = []
        for k in rep.ks:
            r = next(r for r in rep.rows if r["features"] == n and r["k"] == k)
            m, s = float(r[f"{rep.score}_mean"]), float(r[f"{rep.score}_std"])
            x, y = px(k, m)
            d.line([x, px(k, m - s)[1], x, px(k, m + s)[1]], fill=col)
            pts.append((x, y))
        d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.line([right + 12, top + 10 + 18 * i, right + 32, top + 10 + 18 * i], fill=col, width=3)
        d.text((right + 38, top + 4 + 18 * i), n, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def confusion_png(cm: Sequence[Sequence[int]], classes: Sequence[str], cell: int = 44) -> bytes:
    """Row-normalised confusion matrix (rows = truth) as a PNG with counts."""
    from PIL import Image, ImageDraw

    a = np.asarray(cm, np.float64)
    n = a.shape[0]
    norm = a / np.maximum(a.sum(1, keepdims=True), 1)
    left, top = 130, 120
    img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), "white")
    d = ImageDraw.Draw(img)
    for i in range(n):
        d.text((4, top + i * cell + cell // 2 - 6), str(classes[i])[:18], fill="black")
        txt = Image.new("RGB", (110, 14), "white")
        ImageDraw.Draw(txt).text((0, 0), str(classes[i])[:18], fill="black")
        img.paste(txt.rotate(90, expand=True), (left + i * cell + cell // 2 - 7, 4))
        for j in range(n):
            v = norm[i, j]
            c = int(255 * (1 - v))
            d.rectangle([left + j * cell, top + i * cell, left + (j + 1) * cell - 1,
                         top + (i + 1) * cell - 1], fill=(c, c, 255))
            d.text((left + j * cell + 4, top + i * cell + cell // 2 - 6), str(int(a[i, j])),
                   fill="white" if v > 0.5 else "black")
    d.text((left, top + n * cell + 8), "rows: truth, columns: prediction", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
