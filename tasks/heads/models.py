"""Task heads on embeddings: typed config, fitting, leak-free splits, metrics, versioned artifacts.

Heads (``HeadConfig.kind``), for classification and regression alike:

- ``linear``: logistic regression (multinomial, L2) / ridge regression (scikit-learn).
- ``random_forest``: random forest (scikit-learn).
- ``gradient_boosting``: histogram gradient boosting (scikit-learn).
- ``mlp``: a small PyTorch MLP (hidden layers of ``hidden`` units, ReLU, dropout), Adam with
  weight decay, full passes over the data; CPU or CUDA.

Features are standardised with the training set's mean and std (stored with the head).

Splits never put pixels of one polygon on both sides: samples are grouped by polygon, or
by the spatial block (``block_m``) of each polygon's first pixel, and whole groups go to the
test side (:func:`split_test`).

A head is saved as a folder: ``model.pkl`` (the fitted estimator or MLP weights, pickled)
and ``head.json`` (config, task, classes, store, year, model version, metrics, sha256 of
``model.pkl``), committed with :func:`tasks.storage.commit_stage`. :func:`load_head`
checks the sha256 recorded in ``head.json`` before it unpickles: load only heads you trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.config import StorageConfig
from tasks.errors import DataError
from tasks.heads.samples import Samples
from tasks.sources._noise import hash_keys, tag, uniform
from tasks.storage import commit_stage, get_fs, join, write_bytes_atomic

__all__ = ["Head", "HeadConfig", "HeadRef", "SplitConfig", "fit_head", "load_head",
           "metrics", "save_head", "split_test", "write_head"]

HeadKind = Literal["linear", "random_forest", "gradient_boosting", "mlp"]


class HeadConfig(BaseModel):
    """Which head to fit, and its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: HeadKind = Field(default="linear", description="linear (logistic / ridge regression), "
                           "random_forest, gradient_boosting or mlp (PyTorch).")
    c: float = Field(default=1.0, gt=0, le=1e6, description="Inverse L2 strength of the linear "
                     "head (ridge alpha = 1 / c).")
    n_estimators: int = Field(default=200, ge=1, le=5000, description="Trees (random forest) or "
                              "boosting iterations (gradient boosting).")
    max_depth: int | None = Field(default=None, ge=1, le=64, description="Tree depth limit "
                                  "(None: unlimited).")
    hidden: tuple[int, ...] = Field(default=(256,), description="MLP hidden layer widths.")
    epochs: int = Field(default=150, ge=1, le=10_000, description="MLP passes over the data.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="MLP AdamW learning rate.")
    boosting_rate: float = Field(default=0.1, gt=0, le=1.0, description="Gradient boosting "
                                 "shrinkage.")
    weight_decay: float = Field(default=1e-4, ge=0, le=1.0, description="MLP weight decay.")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="MLP dropout.")
    balanced: bool = Field(default=True, description="Weight classes inversely to their "
                           "frequency (classification).")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="MLP device.")
    seed: int = Field(default=0, ge=0, description="Seed of the head's own randomness.")


class SplitConfig(BaseModel):
    """How samples are split into training and test sets, never splitting a polygon."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    by: Literal["polygon", "block"] = Field(default="block", description="Group samples by "
                                            "polygon, or by the spatial block of the polygon.")
    block_m: float = Field(default=1280.0, ge=10, le=1e6, description="Spatial block side, "
                           "metres (by: block).")
    test_fraction: float = Field(default=0.3, gt=0, lt=1, description="Share of groups held "
                                 "out for testing.")
    seed: int = Field(default=0, ge=0, description="Which groups are held out.")


class HeadRef(BaseModel):
    """A committed head artifact."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="The head's folder.")
    key: str = Field(description="Content key (config, store, model version, samples).")
    task: Literal["classification", "regression"]
    classes: list[str] = Field(default_factory=list)
    store_uri: str
    year: int
    model_version: str
    n_samples: int
    n_polygons: int
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0


class Head:
    """A fitted head: standardisation + estimator; ``predict`` / ``predict_proba`` on (N, D)."""

    def __init__(self, cfg: HeadConfig, task: str, n_classes: int, mean: np.ndarray,
                 std: np.ndarray, model: Any, seen: np.ndarray | None = None) -> None:
        self.cfg, self.task, self.n_classes = cfg, task, n_classes
        self.mean, self.std, self.model = mean, std, model
        self.seen = seen  # class codes the estimator was fitted on (its column order)

    def _z(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, n_classes) float32 class probabilities (classification)."""
        if self.task != "classification":
            raise DataError(f"Expected a classification head for probabilities. Got {self.task}.")
        z = self._z(x)
        if self.cfg.kind == "mlp":
            p = _mlp_forward(self.model, z, self.n_classes, softmax=True)
        else:
            p = self.model.predict_proba(z)
        out = np.zeros((z.shape[0], self.n_classes), np.float32)
        out[:, self.seen] = p
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N,) int64 class codes or float32 values."""
        if self.task == "classification":
            return self.predict_proba(x).argmax(1).astype(np.int64)
        z = self._z(x)
        if self.cfg.kind == "mlp":
            return _mlp_forward(self.model, z, 1, softmax=False)[:, 0]
        return self.model.predict(z).astype(np.float32)


def fit_head(x: np.ndarray, y: np.ndarray, cfg: HeadConfig, task: str, n_classes: int = 0) -> Head:
    """Fit a head on (N, D) features and (N,) labels (class codes or values).

    Raises:
        DataError: no samples, non-finite features, or a single class.
    """
    x = np.asarray(x, np.float32)
    if x.shape[0] == 0:
        raise DataError("Expected training samples. Got none.")
    if not np.isfinite(x).all():
        raise DataError("Expected finite features. Got NaN or infinite values.")
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    z = ((x - mean) / std).astype(np.float32)
    seen = None
    if task == "classification":
        seen = np.unique(y)
        if seen.size < 2:
            raise DataError(f"Expected at least 2 classes in the training samples. Got {seen.size}.")
        yy = np.searchsorted(seen, y)
    else:
        yy = np.asarray(y, np.float32)
    model = _fit(z, yy, cfg, task, int(seen.size) if seen is not None else 1)
    return Head(cfg, task, n_classes, mean.astype(np.float32), std, model, seen)


def _fit(z: np.ndarray, y: np.ndarray, cfg: HeadConfig, task: str, n_out: int) -> Any:
    clf = task == "classification"
    cw = "balanced" if (clf and cfg.balanced) else None
    if cfg.kind == "mlp":
        return _fit_mlp(z, y, cfg, clf, n_out)
    if cfg.kind == "linear":
        from sklearn.linear_model import LogisticRegression, Ridge

        m = (LogisticRegression(C=cfg.c, max_iter=500, class_weight=cw) if clf
             else Ridge(alpha=1.0 / cfg.c))
    elif cfg.kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        kw = {"n_estimators": cfg.n_estimators, "max_depth": cfg.max_depth,
              "random_state": cfg.seed, "n_jobs": 1, "min_samples_leaf": 2}
        m = RandomForestClassifier(class_weight=cw, **kw) if clf else RandomForestRegressor(**kw)
    else:
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        kw = {"max_iter": cfg.n_estimators, "learning_rate": cfg.boosting_rate,
              "max_depth": cfg.max_depth, "random_state": cfg.seed, "early_stopping": False}
        m = (HistGradientBoostingClassifier(class_weight=cw, **kw) if clf
             else HistGradientBoostingRegressor(**kw))
    m.fit(z, y)
    return m


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fit_mlp(z: np.ndarray, y: np.ndarray, cfg: HeadConfig, clf: bool, n_out: int) -> dict[str, Any]:
    """Train the MLP; returns its state (weights as numpy arrays) and layer widths."""
    import torch
    from torch import nn

    dev = _device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = _mlp(z.shape[1], cfg.hidden, n_out, cfg.dropout).to(dev)
    xt = torch.from_numpy(z).to(dev)
    if clf:
        yt = torch.from_numpy(np.asarray(y, np.int64)).to(dev)
        counts = np.bincount(np.asarray(y, np.int64), minlength=n_out).astype(np.float32)
        w = (counts.sum() / np.maximum(counts, 1) / n_out) if cfg.balanced else np.ones(n_out, np.float32)
        loss_fn: nn.Module = nn.CrossEntropyLoss(weight=torch.from_numpy(w.astype(np.float32)).to(dev))
    else:
        yt = torch.from_numpy(np.asarray(y, np.float32)).to(dev)[:, None]
        loss_fn = nn.MSELoss()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    n = xt.shape[0]
    batch = 512
    net.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g).to(dev)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    net.eval()
    return {"in": z.shape[1], "hidden": list(cfg.hidden), "out": n_out, "dropout": cfg.dropout,
            "state": {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}}


def _mlp(n_in: int, hidden: tuple[int, ...] | list[int], n_out: int, dropout: float) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def _mlp_forward(state: dict[str, Any], z: np.ndarray, n_out: int, softmax: bool) -> np.ndarray:
    import torch

    net = _mlp(state["in"], state["hidden"], state["out"], state["dropout"])
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state["state"].items()})
    net.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, z.shape[0], 65536):
            o = net(torch.from_numpy(z[s:s + 65536]))
            out.append((torch.softmax(o, 1) if softmax else o).numpy())
    return np.concatenate(out) if out else np.zeros((0, state["out"]), np.float32)


# --- splits and metrics --------------------------------------------------------------------


def split_groups(samples: Samples, cfg: SplitConfig) -> np.ndarray:
    """(N,) int64 group of each sample: its polygon, or the block of its polygon's first pixel."""
    if cfg.by == "polygon":
        return np.asarray(hash_keys(tag("polygon"), samples.polygon_id.astype(np.int64))).view(np.int64)
    order = np.lexsort((samples.y, samples.x, samples.polygon_id))
    pid = samples.polygon_id[order]
    first = np.r_[True, pid[1:] != pid[:-1]]
    starts = order[first]
    bx = np.floor(samples.x[starts] / cfg.block_m).astype(np.int64)
    by = np.floor(samples.y[starts] / cfg.block_m).astype(np.int64)
    block = np.asarray(hash_keys(tag("block"), samples.epsg[starts].astype(np.int64), bx, by)).view(np.int64)
    inv = np.searchsorted(pid[first], samples.polygon_id)
    return block[inv]


def split_test(samples: Samples, cfg: SplitConfig) -> np.ndarray:
    """(N,) bool: True for held-out (test) samples; whole polygons/blocks on one side."""
    groups = split_groups(samples, cfg)
    u = uniform(hash_keys(int(cfg.seed), tag("split"), groups.view(np.uint64)))
    return u < cfg.test_fraction


def metrics(y_true: np.ndarray, y_pred: np.ndarray, task: str, n_classes: int = 0) -> dict[str, float]:
    """Classification: accuracy and macro-F1 (over classes present in ``y_true``);
    regression: RMSE, MAE and R^2."""
    if y_true.size == 0:
        return {}
    if task == "classification":
        cm = confusion(y_true, y_pred, n_classes)
        tp = np.diag(cm).astype(np.float64)
        prec = tp / np.maximum(cm.sum(0), 1)
        rec = tp / np.maximum(cm.sum(1), 1)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
        present = cm.sum(1) > 0
        return {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1[present].mean())}
    err = np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64)
    var = float(np.var(y_true))
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
            "r2": float(1 - np.mean(err**2) / var) if var > 0 else float("nan")}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = truth, columns = prediction."""
    n = max(n_classes, int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1)
    return np.bincount(y_true.astype(np.int64) * n + y_pred.astype(np.int64),
                       minlength=n * n).reshape(n, n)


# --- artifacts -----------------------------------------------------------------------------


def write_head(head: Head, uri: str, storage: StorageConfig, ref: HeadRef) -> HeadRef:
    """Write a head's folder (``model.pkl`` then ``head.json``); no commit marker."""
    t0 = time.perf_counter()
    blob = pickle.dumps({"cfg": head.cfg.model_dump(mode="json"), "task": head.task,
                         "n_classes": head.n_classes, "mean": head.mean, "std": head.std,
                         "seen": head.seen, "model": head.model}, protocol=5)
    write_bytes_atomic(join(uri, "model.pkl"), blob, storage)
    meta = {**ref.model_dump(mode="json", exclude={"seconds"}),
            "config": head.cfg.model_dump(mode="json"),
            "model_sha256": hashlib.sha256(blob).hexdigest()}
    write_bytes_atomic(join(uri, "head.json"), json.dumps(meta, indent=1).encode(), storage)
    return ref.model_copy(update={"seconds": ref.seconds + round(time.perf_counter() - t0, 3)})


def save_head(head: Head, uri: str, storage: StorageConfig, ref: HeadRef) -> HeadRef:
    """Write a head's folder and commit it at ``uri`` (:func:`tasks.storage.commit_stage`).

    Idempotent: a committed head at ``uri`` is returned as it is.
    """
    return commit_stage(uri, storage, HeadRef, lambda: write_head(head, uri, storage, ref))


def load_head(uri: str, storage: StorageConfig | None = None) -> tuple[Head, dict[str, Any]]:
    """A committed head and its ``head.json`` metadata.

    Raises:
        DataError: missing or uncommitted head, or ``model.pkl`` whose sha256 differs from
            the one recorded in ``head.json`` (it was changed after it was saved).
    """
    from tasks.storage import is_done

    storage = storage or StorageConfig()
    if is_done(uri, storage) is None:
        raise DataError(f"Expected a committed head at {uri}. Got none (train one with "
                        "'tessera train-head').")
    fs, path = get_fs(join(uri, "head.json"), storage)
    with fs.open(path, "rb") as f:
        meta = json.loads(f.read())
    fs, path = get_fs(join(uri, "model.pkl"), storage)
    with fs.open(path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != meta.get("model_sha256"):
        raise DataError(f"Expected model.pkl of {uri} to match the sha256 in head.json. Got "
                        "different bytes; refusing to load it.")
    obj = pickle.load(io.BytesIO(blob))  # noqa: S301 - integrity checked against head.json
    head = Head(HeadConfig.model_validate(obj["cfg"]), obj["task"], obj["n_classes"], obj["mean"],
                obj["std"], obj["model"], obj["seen"])
    return head, meta
