"""v1.1 and v2 students: architecture, selection, loading, and the math against reference_math."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera_model import (
    CheckpointError,
    ModelSpec,
    StateDictMismatchError,
    TesseraModel,
    embed_pixels_binned,
    load_model,
)
from tessera_model.binning import bin_size_v2, bin_size_v11, positions_v2, positions_v11
from tessera_model.quantise import quantise
from tests.model import reference_math as ref

KEYS_TSV = Path(__file__).resolve().parents[3] / "shared" / "reference" / "tessera-v2-keys.tsv"
PARAMS = {"v2-nano": 1_066_402, "v2-small": 7_112_322, "v2-medium": 21_031_506,
          "v2-large": 43_831_170, "v1.1": 57_708_738}  # fmt: skip


def tiny(family: str) -> ModelSpec:
    """A tiny model of a family (same code paths, d_model 32)."""
    base = ModelSpec.preset("v2-nano" if family == "v2" else "v1.1")
    upd = {"d_model": 32, "n_layers": 2, "n_heads": 4, "ffn_dim": 48}
    if family == "v1.1":
        upd["latent_dim"] = 136  # keeps the first 128 of more outputs, like 128 of 192
    return base.model_copy(update=upd)


def random_model(spec: ModelSpec, seed: int = 0) -> TesseraModel:
    torch.manual_seed(seed)
    model = TesseraModel(spec, with_projector=False)
    with torch.no_grad():  # move every parameter off its init (LayerNorm gains too)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def edge_pixels(t2: int = 300, ta: int = 7, td: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    """Pixels with the reference document's edge cases (section 3 and 8)."""
    rng = np.random.default_rng(seed)
    counts = [300, 295, 257, 256, 1, 3, 5, 6, 7, 9, 13, 40, 0, 60, 0]
    n = len(counts) + 4
    s2 = rng.integers(0, 9000, (n, t2, 10)).astype(np.uint16)
    valid = np.zeros((n, t2), bool)
    for p, c in enumerate(counts):
        valid[p, rng.choice(t2, min(c, t2), replace=False)] = True
    valid[len(counts) :] = rng.random((4, t2)) < 0.1
    s2[len(counts), valid[len(counts)]] = 0  # clear frames whose bands are all zero
    asc = rng.integers(1, 12000, (n, ta, 2)).astype(np.int16)
    desc = rng.integers(1, 12000, (n, td, 2)).astype(np.int16)
    asc[rng.random((n, ta)) < 0.4] = 0  # all-zero S1 steps (invalid)
    desc[rng.random((n, td)) < 0.4, 1] = 0  # one band zero: still valid
    asc[12], desc[12] = 0, 0  # pixel 12: no S2 and no S1 -> no-data
    asc[13], desc[13] = 0, 0  # pixel 13: S2 only
    asc[0], desc[0] = rng.integers(1, 9000, (ta, 2)), rng.integers(1, 9000, (td, 2))
    return {
        "s2": s2, "s2_valid": valid, "s2_doy": np.sort(rng.integers(1, 367, t2)).astype(np.uint16),
        "asc": asc, "asc_doy": np.sort(rng.integers(1, 366, ta)).astype(np.uint16),
        "desc": desc, "desc_doy": np.sort(rng.integers(1, 366, td)).astype(np.uint16),
    }  # fmt: skip


def ours(model: TesseraModel, px: dict[str, np.ndarray], batch: int = 0) -> np.ndarray:
    s1 = np.concatenate([px["asc"], px["desc"]], axis=1)
    doy1 = np.concatenate([px["asc_doy"], px["desc_doy"]])
    desc = np.arange(doy1.size) >= px["asc_doy"].size
    return embed_pixels_binned(model, px["s2"], px["s2_valid"], px["s2_doy"], s1, doy1, desc,
                               batch_size=batch, device="cpu")


def theirs(model: TesseraModel, px: dict[str, np.ndarray]) -> np.ndarray:
    return ref.reference_embed(model.state_dict(), model.spec.family, model.spec.n_heads,
                               px["s2"], px["s2_valid"], px["s2_doy"], px["asc"], px["asc_doy"],
                               px["desc"], px["desc_doy"])


@pytest.mark.parametrize("preset", list(PARAMS))
def test_preset_keys_shapes_and_params_match_the_reference(preset: str) -> None:
    rows = [ln.rstrip("\n").split("\t") for ln in KEYS_TSV.read_text().splitlines()
            if ln and not ln.startswith("#")][1:]  # fmt: skip
    want = {k: tuple(int(x) for x in s.strip("()").split(",") if x) for m, k, s in rows
            if m == preset}  # fmt: skip
    with torch.device("meta"):
        model = TesseraModel(ModelSpec.preset(preset), with_projector=False)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset]


def test_selection_examples_from_the_document() -> None:
    assert positions_v2(3, 8).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert positions_v2(5, 8).tolist() == [0, 1, 2, 3, 4, 1, 3, 4]
    assert positions_v2(6, 8).tolist() == [0, 1, 2, 3, 4, 5, 1, 4]
    assert positions_v2(7, 8).tolist() == [0, 1, 2, 3, 4, 5, 6, 3]
    assert positions_v2(13, 16).tolist() == list(range(13)) + [2, 7, 11]
    assert positions_v11(2, 8).tolist() == [0, 1, 0, 0, 0, 1, 1, 1]
    assert positions_v11(5, 8).tolist() == [0, 1, 2, 3, 4, 1, 2, 3]
    assert bin_size_v2([0, 1, 8, 9, 256, 400]).tolist() == [0, 8, 8, 16, 256, 256]
    assert bin_size_v11([0, 1, 8, 9, 256, 400]).tolist() == [8, 8, 8, 16, 256, 256]


def test_selection_matches_the_numpy_statement_for_every_count() -> None:
    for family, fn, binf in (("v2", positions_v2, bin_size_v2), ("v1.1", positions_v11,
                                                                   bin_size_v11)):
        for n in range(1, 700):
            b = int(binf([n])[0])
            assert fn(n, b).tolist() == ref.select(n, b, family).tolist(), (family, n)


@pytest.mark.parametrize("family", ["v2", "v1.1"])
def test_tiny_model_matches_reference_math(family: str) -> None:
    model = random_model(tiny(family))
    px = edge_pixels()
    got, want = ours(model, px), theirs(model, px)
    assert np.isnan(got[12]).all() and np.isnan(want[12]).all()
    ok = ~np.isnan(want).any(1)
    assert ok.sum() == len(ok) - 1 and not np.isnan(got[ok]).any()
    assert np.abs(got[ok] - want[ok]).max() < 1e-5


def test_v2_nano_matches_reference_math() -> None:
    model = random_model(ModelSpec.preset("v2-nano"))
    px = edge_pixels()
    got, want = ours(model, px), theirs(model, px)
    ok = ~np.isnan(want).any(1)
    diff = float(np.abs(got[ok] - want[ok]).max())
    assert diff < 1e-5, diff
    np.testing.assert_allclose(got[ok].mean(1), 0, atol=1e-5)  # final non-affine LayerNorm


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["v2-small", "v2-medium", "v2-large", "v1.1"])
def test_full_size_presets_match_reference_math(preset: str) -> None:
    model = random_model(ModelSpec.preset(preset))
    px = edge_pixels(t2=40)
    px = {k: (v[4:12] if v.ndim > 1 else v) for k, v in px.items()}  # 1..40 observations
    got, want = ours(model, px), theirs(model, px)
    assert np.abs(got - want).max() < 1e-5


def test_normalisation_values_are_the_documented_ones() -> None:
    from tessera_model.normalisation import NORMALISATION

    assert NORMALISATION["v2"].s2_mean[0] == 1633.0042
    assert NORMALISATION["v2"].s1_desc_std == (1554.6475, 1546.4733)
    assert NORMALISATION["v1.1-aws"].s2_mean[-1] == 2038.1504
    assert NORMALISATION["v1.1-aws"].s1_desc_mean == (5759.1367, 2873.2854)
    assert NORMALISATION["v1.1-mpc"].s1_asc_std == (1713.4646, 1693.0471)


@pytest.mark.parametrize("family", ["v2", "v1.1"])
def test_bit_identical_whatever_the_batch_or_split(family: str) -> None:
    model = random_model(tiny(family))
    px = edge_pixels(t2=50)
    full = ours(model, px, batch=0)
    for batch in (1, 3, 64, 100):
        assert np.array_equal(ours(model, px, batch=batch), full, equal_nan=True)
    order = np.random.default_rng(0).permutation(full.shape[0])
    half = order[: len(order) // 2]
    sub = ours(model, {k: (v[half] if v.ndim > 1 else v) for k, v in px.items()})
    assert np.array_equal(sub, full[half], equal_nan=True)


def _student_file(spec: ModelSpec, model: TesseraModel, **args_over: object) -> io.BytesIO:
    args = {"repr_dim": 128, "latent_dim": spec.d_model // 4, "num_layers": spec.n_layers,
            "nhead": spec.n_heads, "dim_feedforward": spec.ffn_dim, "max_seq_len": 256,
            "enable_qk_norm": False, "matryoshka_dims": "16,32,64,128", **args_over}  # fmt: skip
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "args": args}, buf)
    buf.seek(0)
    return buf


def test_student_file_loads_strictly_with_its_size_from_args() -> None:
    spec = ModelSpec.preset("v2-nano")
    model = random_model(spec)
    loaded, got = load_model(_student_file(spec, model), preset="v2-nano")
    assert got == spec
    px = edge_pixels(t2=30)
    assert np.array_equal(ours(loaded, px), ours(model, px), equal_nan=True)
    with pytest.raises(CheckpointError, match="preset 'v2-small'"):
        load_model(_student_file(spec, model), preset="v2-small")
    with pytest.raises(CheckpointError, match="num_layers=4 to fit"):
        load_model(_student_file(spec, model, num_layers=4))
    with pytest.raises(CheckpointError, match="Missing: \\['latent_dim', 'nhead'"):
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "args": {"num_layers": 2}}, buf)
        buf.seek(0)
        load_model(buf)
    state = model.state_dict()
    del state["s1_backbone.attn_pool.query.bias"]
    buf = io.BytesIO()
    torch.save({"model": state, "args": {"repr_dim": 128, "latent_dim": 36, "num_layers": 2,
                                         "nhead": 4, "dim_feedforward": 384}}, buf)  # fmt: skip
    buf.seek(0)
    with pytest.raises(StateDictMismatchError, match="s1_backbone.attn_pool.query.bias"):
        load_model(buf)


def test_v11_encoder_file_loads_with_prefix_and_training_keys_dropped() -> None:
    spec = tiny("v1.1")
    model = random_model(spec)
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.projector.net.0.weight"] = torch.zeros(2, 2)
    state["segmented_matryoshka_projector.0.weight"] = torch.zeros(2, 2)
    buf = io.BytesIO()
    torch.save({"model_state": state, "config": {"latent_dim": 8}}, buf)
    buf.seek(0)
    loaded, got = load_model(buf, spec=spec)
    px = edge_pixels(t2=30)
    assert got == spec
    assert np.array_equal(ours(loaded, px), ours(model, px), equal_nan=True)
    buf.seek(0)
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):
        load_model(buf, preset="v1.1")  # a file of another size names the mismatch


def test_v2_quantisation_rule() -> None:
    e = np.array([[0.5, -1.0, 0.25], [0, 0, 0], [np.nan, 1, 1]], np.float32)
    q, s = quantise(e, rule="v2")
    assert s[0] == np.float32(1.0) / np.float32(127) and q[0].tolist() == [64, -127, 32]
    assert s[1] == np.float32(1e-12) / np.float32(127) and (q[1] == 0).all()
    assert np.isnan(s[2]) and (q[2] == 0).all()
    q1, s1 = quantise(e[1:2], rule="v1")
    assert s1[0] == np.float32(1e-8)
