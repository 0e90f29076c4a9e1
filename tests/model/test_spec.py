from __future__ import annotations

import pytest
from pydantic import ValidationError

from tessera_model import ModelSpec, SpecError


def test_v1_preset_is_tessera_v1() -> None:
    s = ModelSpec.preset("v1")
    assert (s.latent_dim, s.d_model, s.n_layers, s.n_heads, s.ffn_dim) == (128, 512, 4, 4, 4096)
    assert (s.dropout, s.projector_dim, s.s2_channels, s.s1_channels) == (0.1, 16384, 10, 2)
    assert s.sample_steps == 40


def test_small_preset_outputs_128() -> None:
    assert ModelSpec.preset("small").latent_dim == 128


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"\['small', 'v1', 'v1.1', .*'v2-nano'.*\]. Got 'v2'"):
        ModelSpec.preset("v2")


def test_spec_is_frozen_and_validated() -> None:
    s = ModelSpec.preset("small")
    with pytest.raises(ValidationError):
        s.d_model = 8  # type: ignore[misc]
    with pytest.raises((SpecError, ValidationError), match="divisible"):
        ModelSpec.model_validate({**s.model_dump(), "n_heads": 3})


def test_spec_roundtrips_through_dict() -> None:
    s = ModelSpec.preset("v1")
    assert ModelSpec.model_validate(s.model_dump()) == s
