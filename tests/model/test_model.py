from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera_model import InputShapeError, ModelSpec, TesseraModel, inference_state_dict

KEYS_TSV = Path(__file__).resolve().parent / "data" / "tessera-v1-keys.tsv"
"""Copy of ``shared/reference/tessera-v1-keys.tsv`` (the official v1.0 inference keys)."""


def read_reference_keys() -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in KEYS_TSV.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((key, dims, dtype.strip()))
    return rows


def test_v1_inference_state_dict_matches_reference() -> None:
    model = TesseraModel(ModelSpec.preset("v1"), with_projector=False)
    sd = inference_state_dict(model)
    got = [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()]
    assert got == read_reference_keys()
    assert sum(v.numel() for v in sd.values()) == 45_828_226


def test_projector_keys_and_exclusion(tiny_spec: ModelSpec) -> None:
    model = TesseraModel(tiny_spec)
    keys = set(model.state_dict())
    assert {
        "projector.net.0.weight",
        "projector.net.1.running_mean",
        "projector.net.6.weight",
    } <= keys
    assert not any(k.startswith("projector.") for k in inference_state_dict(model))


def test_encode_and_forward_shapes(tiny_spec: ModelSpec) -> None:
    model = TesseraModel(tiny_spec)
    s2, s1 = torch.randn(5, 8, 11), torch.randn(5, 6, 3)
    emb, proj = model(s2, s1)
    assert emb.shape == (5, 16) and proj.shape == (5, 32)
    assert model.encode(s2, s1).shape == (5, 16)


def test_bad_input_raises(tiny_spec: ModelSpec) -> None:
    model = TesseraModel(tiny_spec)
    with pytest.raises(InputShapeError, match=r"\(B, T, 11\)"):
        model.encode(torch.randn(2, 8, 10), torch.randn(2, 8, 3))


def test_forward_needs_projector(tiny_spec: ModelSpec) -> None:
    model = TesseraModel(tiny_spec, with_projector=False)
    with pytest.raises(ValueError):
        model(torch.randn(2, 8, 11), torch.randn(2, 8, 3))
