"""The demo ends with its evaluation: a table, a predicted-map preview and a gate that fails on
a random-init encoder (the gate's logic here; the whole demo build with a random-init
checkpoint in the slow test)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import demo_config
from tasks.heads.evaluate import Gates, label_efficiency, summary_table
from tasks.heads.models import HeadConfig
from tasks.heads.samples import Samples


def _gates() -> Gates:
    ev = demo_config().evaluation
    return Gates(at_k=ev.gate_k, min_score=ev.min_score,
                 min_gain_over_random_init=ev.min_gain_over_random_init,
                 min_gain_over_raw=ev.min_gain_over_raw)


def test_the_demo_evaluates_with_a_gate_against_random_init() -> None:
    ev = demo_config().evaluation
    assert ev.enabled and ev.fail_build and ev.predict_map and ev.labels == "land_cover"
    assert ev.raw_baseline and ev.random_init_baseline
    assert ev.min_gain_over_random_init is not None and ev.min_gain_over_random_init >= 0
    assert ev.gate_k in ev.ks and max(ev.ks) <= 20  # cheap: seconds, not minutes


def _samples(n_poly: int = 40, per: int = 6, n_cls: int = 4, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_poly * n_cls), per)
    label = pid % n_cls
    n = pid.size
    x = (pid * 1000.0) + rng.uniform(0, 10, n)
    return Samples(features=np.zeros((n, 0), np.float32), label=label.astype(np.int64),
                   polygon_id=pid.astype(np.int64), epsg=np.full(n, 32631, np.int32), x=x,
                   y=np.zeros(n), lon=np.zeros(n), lat=np.zeros(n), task="classification",
                   classes=tuple(f"c{i}" for i in range(n_cls)))


def test_the_demo_gate_fails_on_random_init_features_and_passes_on_informative_ones() -> None:
    s = _samples()
    rng = np.random.default_rng(1)
    def features(strength: float) -> np.ndarray:
        signal = np.eye(4)[s.label] * strength + rng.normal(size=(len(s), 4))
        return np.concatenate([signal, rng.normal(size=(len(s), 12))], axis=1).astype(np.float32)

    weak, informative = features(1.0), features(3.0)  # a random-init encoder keeps some signal
    noise = features(0.0)  # a broken or collapsed encoder: none
    test = (s.polygon_id // 4) % 3 == 0  # whole polygons held out
    ks = demo_config().evaluation.ks
    head = HeadConfig(kind="linear")
    bad = label_efficiency({"embeddings": noise, "random_init": weak}, s, test, head,
                           ks=ks, seeds=2, gates=_gates())
    assert not bad.passed
    assert any(c.startswith("FAIL") and "over random_init" in c for c in bad.checks)
    good = label_efficiency({"embeddings": informative, "random_init": weak}, s, test, head,
                            ks=ks, seeds=2, gates=_gates())
    assert good.passed, good.checks
    table = summary_table(bad, "Evaluation (land_cover)")
    assert "trained" in table and "random-init" in table and "gate FAIL" in table
    assert len([ln for ln in table.splitlines() if ln.strip()[:1].isdigit()]) == len(ks)


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_fails_its_evaluation_with_a_random_init_encoder(tmp_path, prefect_harness) -> None:
    """The demo's own region and gate, but the published model is a random-init `small`
    encoder (another seed than the random-init baseline's): the build fails with the table."""
    import torch

    from flows.build import build_region
    from tasks.heads.evaluate import EvaluationFailed
    from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint

    torch.manual_seed(7)
    ck = tmp_path / "random-small.pt"
    save_checkpoint(build_checkpoint(TesseraModel(ModelSpec.preset("small"))), ck)
    cfg = demo_config(storage={"output_uri": str(tmp_path / "out"),
                               "work_uri": str(tmp_path / "work")},
                      training={"enabled": False, "checkpoint_uri": str(ck)})
    with pytest.raises(EvaluationFailed) as info:
        build_region(config=cfg)
    msg = str(info.value)
    assert "gain of embeddings over random_init" in msg and "FAIL" in msg
    assert "trained" in msg and "raw baseline" in msg and "Predicted map preview:" in msg
    png = msg.split("Predicted map preview: ")[1].split()[0]
    assert (tmp_path / "out").as_posix() in png and open(png, "rb").read(4) == b"\x89PNG"
