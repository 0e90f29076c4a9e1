from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera_model import (
    CheckpointError,
    ModelSpec,
    TesseraModel,
    TrainingArrays,
    TrainSettings,
    fit,
    load_model,
)
from tessera_model.train import lr_factor


def _settings(**kw: object) -> TrainSettings:
    base = dict(steps=8, batch_size=32, lr=2e-2, checkpoint_every=3, seed=1, device="cpu")
    return TrainSettings.model_validate({**base, **kw})


def test_lr_schedule() -> None:
    assert lr_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0.1) < 0.001


def test_loss_decreases(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    result = fit(tiny_spec, training_arrays_factory(), _settings(steps=30, checkpoint_every=100),
                 str(tmp_path / "ck.pt"))  # fmt: skip
    assert result.steps == 30 and len(result.losses) == 30
    assert np.mean(result.losses[-5:]) < 0.8 * np.mean(result.losses[:5])
    model, spec = load_model(tmp_path / "ck.pt", inference_only=False)
    assert spec == tiny_spec and model.projector is not None


def test_resume_matches_uninterrupted(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    data, settings = training_arrays_factory(), _settings()
    full = fit(tiny_spec, data, settings, str(tmp_path / "a.pt"))
    part = fit(tiny_spec, data, settings, str(tmp_path / "b.pt"), stop_after=3)
    assert part.steps == 3
    resumed = fit(tiny_spec, data, settings, str(tmp_path / "b.pt"))
    assert resumed.steps == 8
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model_state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # Deterministic on CPU: re-running the first three steps gives the same losses.
    restarted = fit(tiny_spec, data, settings, str(tmp_path / "c.pt"), stop_after=3)
    assert restarted.losses == part.losses


def test_resume_refuses_other_settings(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    data = training_arrays_factory()
    fit(tiny_spec, data, _settings(steps=2), str(tmp_path / "ck.pt"))
    with pytest.raises(CheckpointError, match="settings"):
        fit(tiny_spec, data, _settings(steps=2, lr=1e-3), str(tmp_path / "ck.pt"))


def test_training_arrays_validated(training_arrays_factory: Callable[..., TrainingArrays]) -> None:
    d = training_arrays_factory(n=8)
    with pytest.raises(ValueError, match="s1_valid"):
        TrainingArrays(**{**d.__dict__, "s1_valid": d.s1_valid[:, :-1]})
    with pytest.raises(ValueError, match="dtype"):
        TrainingArrays(**{**d.__dict__, "s2": d.s2.astype(np.float32)})


def test_model_from_training_is_a_tessera_model(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    fit(tiny_spec, training_arrays_factory(), _settings(steps=1), str(tmp_path / "ck.pt"))
    model, _ = load_model(tmp_path / "ck.pt")
    assert isinstance(model, TesseraModel)


def test_should_stop_checkpoints_and_resumes_exactly(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    """A stop request ends fit before the next step with a checkpoint of the steps done;
    the next call resumes there and ends where an uninterrupted run ends."""
    data, settings = training_arrays_factory(), _settings(checkpoint_every=100)
    full = fit(tiny_spec, data, settings, str(tmp_path / "a.pt"))
    polls: list[int] = []
    saves: list[int] = []

    def stop_at_four() -> bool:
        polls.append(1)
        return len(polls) > 4

    part = fit(tiny_spec, data, settings, str(tmp_path / "b.pt"), should_stop=stop_at_four,
               on_checkpoint=lambda path, step: saves.append(step))
    assert part.stopped and part.steps == 4 and saves == [4]
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4
    resumed = fit(tiny_spec, data, settings, str(tmp_path / "b.pt"), should_stop=lambda: False)
    assert not resumed.stopped and resumed.steps == 8
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)


def test_plateau_rule() -> None:
    from tessera_model.train import best_validation, plateaued

    h = [(10, 10.0), (20, 8.0), (30, 7.99), (40, 7.98)]
    assert not plateaued(h, 0, 0.01)  # patience 0: never
    assert not plateaued(h[:2], 2, 0.01)  # too few validations
    assert plateaued(h, 2, 0.01)  # 7.99 and 7.98 are within 1 % of 8.0
    assert not plateaued(h, 2, 0.0001)
    assert not plateaued([*h[:2], (30, 7.0), (40, 7.5)], 2, 0.01)  # the best was 1 back
    assert best_validation(h) == (40, 7.98) and best_validation([]) == (None, None)


def test_validation_does_not_change_training(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    data, held = training_arrays_factory(), training_arrays_factory(n=64, seed=5)
    plain = fit(tiny_spec, data, _settings(steps=6), str(tmp_path / "a.pt"))
    validated = fit(tiny_spec, data, _settings(steps=6, validate_every=2), str(tmp_path / "b.pt"),
                    validation=held)
    assert validated.losses == plain.losses  # same trajectory, bit for bit on CPU
    assert [s for s, _ in validated.validation] == [2, 4, 6]
    assert all(np.isfinite(v) and v > 0 for _, v in validated.validation)
    ck = torch.load(tmp_path / "b.pt", weights_only=False)
    assert [list(x) for x in ck["validation"]] == [list(x) for x in validated.validation]
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model_state_dict"]
    for k, v in ck["model_state_dict"].items():
        assert torch.equal(v, a[k]), k  # BatchNorm running statistics untouched too
    # the validation loss is a fixed function of the weights and pixels
    from tessera_model.train import validation_loss

    model, _ = load_model(tmp_path / "b.pt", inference_only=False)
    s = _settings(steps=6)
    assert validation_loss(model.train(), held, s) == validation_loss(model, held, s)


def test_plateau_stop_and_resume(
    tiny_spec: ModelSpec, tmp_path: Path, training_arrays_factory: Callable[..., TrainingArrays]
) -> None:
    data, held = training_arrays_factory(), training_arrays_factory(n=64, seed=5)
    # min_delta 1 (a 100 % drop needed): the second validation after the first already stops
    s = _settings(steps=40, validate_every=2, patience=1, min_delta=1.0, checkpoint_every=100)
    r = fit(tiny_spec, data, s, str(tmp_path / "ck.pt"), validation=held)
    assert r.converged and r.steps == 4 and len(r.losses) == 4
    assert [st for st, _ in r.validation] == [2, 4]
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert ck["step"] == 4 and ck["converged"] is True
    again = fit(tiny_spec, data, s, str(tmp_path / "ck.pt"), validation=held)  # resumed: done
    assert again.converged and again.steps == 4 and again.losses == r.losses
    # without patience the same run goes to its cap
    full = fit(tiny_spec, data, s.model_copy(update={"patience": 0, "steps": 8}),
               str(tmp_path / "full.pt"), validation=held)
    assert not full.converged and full.steps == 8 and len(full.validation) == 4
