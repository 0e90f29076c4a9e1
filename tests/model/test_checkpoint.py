from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from tessera_model import (
    CheckpointError,
    ModelSpec,
    StateDictMismatchError,
    TesseraModel,
    build_checkpoint,
    inference_state_dict,
    load_model,
    save_checkpoint,
)


def _small_model() -> TesseraModel:
    torch.manual_seed(0)
    return TesseraModel(ModelSpec.preset("small"))


def _same_weights(a: TesseraModel, b: TesseraModel) -> bool:
    sa, sb = inference_state_dict(a), inference_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _buffer(obj: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_our_format_roundtrip_path(tmp_path: Path) -> None:
    model = _small_model()
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint(build_checkpoint(model), path)
    loaded, spec = load_model(path)
    assert spec == model.spec and _same_weights(model, loaded)
    assert loaded.projector is None and not loaded.training
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temp file left


def test_our_format_with_projector_file_object() -> None:
    model = _small_model()
    buf = io.BytesIO()
    save_checkpoint(build_checkpoint(model, inference_only=False), buf)
    buf.seek(0)
    loaded, _ = load_model(buf, inference_only=False)
    assert loaded.projector is not None
    assert torch.equal(loaded.state_dict()["projector.net.0.weight"],
                       model.state_dict()["projector.net.0.weight"])  # fmt: skip


class _NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        data = self._buf.read(len(b))
        b[: len(data)] = data
        return len(data)


def test_non_seekable_stream() -> None:
    model = _small_model()
    data = _buffer(build_checkpoint(model)).getvalue()
    loaded, _ = load_model(_NonSeekable(data))
    assert _same_weights(model, loaded)


@pytest.mark.parametrize("top_key", ["model_state", "model_state_dict"])
def test_official_format_with_compile_prefix(top_key: str) -> None:
    model = _small_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # includes projector
    loaded, spec = load_model(_buffer({top_key: state, "epoch": 3}), preset="small")
    assert spec == ModelSpec.preset("small") and _same_weights(model, loaded)


def test_official_format_assumes_v1() -> None:
    state = inference_state_dict(_small_model())
    with pytest.raises(StateDictMismatchError) as err:
        load_model(_buffer({"model_state": state}))
    assert "s2_backbone.embedding.0.weight expected (512, 10) got (64, 10)" in str(err.value)


def test_missing_and_unexpected_keys_named() -> None:
    state = dict(inference_state_dict(_small_model()))
    del state["s1_backbone.attn_pool.query.bias"]
    del state["dim_reducer.0.weight"]
    state["s2_backbone.extra.weight"] = torch.zeros(2)
    with pytest.raises(StateDictMismatchError) as err:
        load_model(_buffer({"model_state_dict": state}), preset="small")
    msg = str(err.value)
    for key in (
        "s1_backbone.attn_pool.query.bias",
        "dim_reducer.0.weight",
        "s2_backbone.extra.weight",
    ):
        assert key in msg
    assert err.value.missing == ["s1_backbone.attn_pool.query.bias", "dim_reducer.0.weight"]


def test_projector_required_for_training_load() -> None:
    state = inference_state_dict(_small_model())
    with pytest.raises(StateDictMismatchError, match="projector.net.0.weight"):
        load_model(_buffer({"model_state": state}), preset="small", inference_only=False)


def test_stored_spec_conflicting_preset() -> None:
    buf = _buffer(build_checkpoint(_small_model()))
    with pytest.raises(CheckpointError, match="preset 'v1'"):
        load_model(buf, preset="v1")


def test_unknown_layout() -> None:
    with pytest.raises(CheckpointError, match="model_state"):
        load_model(_buffer({"weights": {}}))


def _official_v1_state(prefix: str = "") -> dict[str, torch.Tensor]:
    """Random tensors with exactly the reference v1.0 keys and shapes, plus projector keys."""
    from tests.model.test_model import read_reference_keys

    gen = torch.Generator().manual_seed(0)
    state = {f"{prefix}{k}": torch.randn(shape, generator=gen) for k, shape, _ in read_reference_keys()}
    # the official file also holds the 1.3 B-parameter projector; inference ignores it (any shape)
    state[f"{prefix}projector.net.0.weight"] = torch.zeros(4, 128)
    state[f"{prefix}projector.net.1.running_mean"] = torch.zeros(4)
    return state


def test_reference_v1_keys_load_strictly() -> None:
    state = _official_v1_state("_orig_mod.")
    model, spec = load_model(_buffer({"model_state_dict": state, "epoch": 1}))
    assert spec == ModelSpec.preset("v1") and model.projector is None and not model.training
    got = inference_state_dict(model)
    assert len(got) == len(state) - 2
    for k, v in got.items():
        assert torch.equal(v, state[f"_orig_mod.{k}"]), k


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("drop", "s1_backbone.attn_pool.temporal_context.gru_cell.b_z"),
        ("rename", "s2_backbone.transformer_encoder.layers.3.linear1.weight"),
        ("reshape", "dim_reducer.0.weight expected (128, 1024) got (128, 1023)"),
    ],
)
def test_reference_v1_mismatch_names_the_key(edit: str, named: str) -> None:
    state = _official_v1_state()
    if edit == "drop":
        del state["s1_backbone.attn_pool.temporal_context.gru_cell.b_z"]
    elif edit == "rename":
        w = state.pop("s2_backbone.transformer_encoder.layers.3.linear1.weight")
        state["s2_backbone.transformer_encoder.layers.3.linear_1.weight"] = w
    else:
        state["dim_reducer.0.weight"] = torch.zeros(128, 1023)
    with pytest.raises(StateDictMismatchError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_model(_buffer({"model_state": state}))


def test_our_checkpoint_carries_spec_and_format_version() -> None:
    obj = build_checkpoint(_small_model())
    assert obj["format_version"] == 1 and obj["model_spec"] == ModelSpec.preset("small").model_dump()
    with pytest.raises(CheckpointError, match="format_version 1. Got 2"):
        load_model(_buffer({**obj, "format_version": 2}))
