"""CPU inference forms of the tail: fusion head, v2 query pooling, input preparation.

Each form against the module forward (or the plain numpy statement it replaces): the same
values to float32 rounding for the model parts, the same bits for the input preparation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera_model import ModelSpec, TesseraModel
from tessera_model.attention_pooling import QueryAttentionPooling
from tessera_model.binning import gather_positions
from tessera_model.constants import normalisation_arrays
from tessera_model.heads import fusion_head, fusion_head_cpu
from tessera_model.infer_binned import _any_nonzero, _tokens
from tessera_model.inputs import gather_inputs
from tessera_model.int8 import PackedWeight, cpu_weights, onednn_available
from tessera_model.normalisation import band_stats
from tessera_model.sampling import _M1, _M2, _mix64


def _spec(family: str) -> ModelSpec:
    return ModelSpec.preset({"v1.0": "small", "v1.1": "v1.1", "v2": "v2-nano"}[family])


def _model(family: str) -> TesseraModel:
    torch.manual_seed(0)
    return TesseraModel(_spec(family), with_projector=False).eval()


@pytest.mark.parametrize("family", ["v1.0", "v1.1", "v2"])
@pytest.mark.parametrize("packed", [True, False])
def test_fusion_head_cpu_matches_the_sequential(family: str, packed: bool) -> None:
    model = _model(family)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for mod in model.dim_reducer:
            if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    x = torch.randn(48, 2 * model.spec.d_model, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model.dim_reducer(x)
        got = fusion_head_cpu(model.dim_reducer, x, cpu_weights(model) if packed else None)
    assert got.shape == want.shape == (48, model.spec.latent_dim)
    assert float((got - want).abs().max()) <= 1e-5


@pytest.mark.parametrize("family", ["v1.0", "v2"])
def test_fusion_head_cpu_rows_are_independent(family: str) -> None:
    """Permuting the rows of a batch permutes the result exactly (no reduction across rows)."""
    model = _model(family)
    x = torch.randn(32, 2 * model.spec.d_model, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        qw = cpu_weights(model)
        a = fusion_head_cpu(model.dim_reducer, x, qw)
        b = fusion_head_cpu(model.dim_reducer, x[perm].contiguous(), qw)
    assert torch.equal(a[perm], b)


def test_head_weights_are_prepared_and_stay_float32_under_int8() -> None:
    model = _model("v2")
    for precision in ("fp32", "int8-dynamic"):
        qw = cpu_weights(model, precision)
        if onednn_available():
            assert isinstance(qw["dim_reducer.head_0"], PackedWeight)
            assert isinstance(qw["dim_reducer.head_4"], PackedWeight)
    if onednn_available():
        assert "dim_reducer.head_4" not in cpu_weights(_model("v1.0"))
        assert isinstance(cpu_weights(_model("v1.0"))["dim_reducer.head_0"], PackedWeight)


def test_fusion_head_cpu_needs_no_packed_weights_for_an_untouched_spec() -> None:
    """The head built by fusion_head alone (no model, no weights) runs the CPU form too."""
    head = fusion_head(_spec("v2")).eval()
    x = torch.randn(5, 288)
    with torch.inference_mode():
        assert float((fusion_head_cpu(head, x) - head(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("t", [1, 7, 48])
def test_query_pooling_cpu_form_matches_the_forward(t: int) -> None:
    torch.manual_seed(0)
    pool = QueryAttentionPooling(64).eval()
    with torch.no_grad():
        pool.query.weight.mul_(8.0)  # peaked softmax weights
        pool.query.bias.fill_(0.7)
    x = torch.randn(19, t, 64)
    want = pool(x).detach()  # autograd on: the forward's own ops
    with torch.inference_mode():
        got = pool.forward_cpu(x)
        plain = pool(x)  # the module forward keeps its own ops without autograd too
    # scores up to ~40 (peaked): float32 rounding of the scores is ~4e-6 relative to them
    assert float((got - want).abs().max()) <= 2e-6
    assert torch.equal(plain, want)
    if t == 1:
        assert torch.equal(got, x[:, 0])


def test_query_pooling_keeps_autograd_and_training_on_the_forward() -> None:
    torch.manual_seed(0)
    pool = QueryAttentionPooling(16)
    x = torch.randn(4, 6, 16, requires_grad=True)
    pool(x).sum().backward()
    assert x.grad is not None and pool.query.weight.grad is not None
    with torch.no_grad():  # training mode without autograd: the forward's ops, not the CPU form
        pool.train()
        want = (torch.softmax(pool.query(x), dim=1) * x).sum(dim=1)
        assert torch.equal(pool(x), want)


def test_query_pooling_cpu_form_is_row_independent() -> None:
    torch.manual_seed(0)
    pool = QueryAttentionPooling(32).eval()
    x = torch.randn(24, 40, 32)
    perm = torch.randperm(24)
    with torch.inference_mode():
        assert torch.equal(pool.forward_cpu(x)[perm], pool.forward_cpu(x[perm].contiguous()))


def _gather_reference(bands: np.ndarray, doy: np.ndarray, idx: np.ndarray, modality: str):
    """The former statement of gather_inputs (per-step broadcasting)."""
    mean, std = normalisation_arrays(modality)
    out = np.empty((*idx.shape, mean.shape[0] + 1), dtype=np.float32)
    picked = np.take_along_axis(bands, idx[:, :, None], axis=1).astype(np.float32)
    out[..., :-1] = (picked - mean) / std
    out[..., -1] = doy[idx] if doy.ndim == 1 else np.take_along_axis(doy, idx, axis=1)
    return out


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_gather_inputs_gives_the_bits_of_the_plain_statement(modality: str) -> None:
    rng = np.random.default_rng(0)
    c = 10 if modality == "s2" else 2
    dtype = np.uint16 if modality == "s2" else np.int16
    lo = 0 if modality == "s2" else -30000
    bands = rng.integers(lo, 30000, (50, 33, c)).astype(dtype)
    doy = rng.integers(1, 367, 33).astype(np.uint16)
    idx = np.sort(rng.integers(0, 33, (50, 12)), axis=1)
    want = _gather_reference(bands, doy, idx, modality)
    assert np.array_equal(gather_inputs(bands, doy, idx, modality), want)
    # rows of a larger block, contiguous or not, and a per-pixel DOY
    block = np.concatenate([bands[::-1], bands])  # row 50 + i is bands[i]
    rows = np.arange(50) + 50
    assert np.array_equal(gather_inputs(block, doy, idx, modality, rows), want)
    strided = np.ascontiguousarray(np.repeat(block, 2, axis=2))[:, :, ::2]
    assert not strided.flags.c_contiguous
    assert np.array_equal(gather_inputs(strided, doy, idx, modality, rows), want)
    doy2 = rng.integers(1, 367, (50, 33)).astype(np.float32)
    want2 = _gather_reference(bands, doy2, idx, modality)
    assert np.array_equal(gather_inputs(bands, doy2, idx, modality), want2)
    assert np.array_equal(
        gather_inputs(block, np.concatenate([doy2[::-1], doy2]), idx, modality, rows), want2
    )


def _tokens_reference(values, valid, doy, mean, std, length, family):
    """The former statement of infer_binned._tokens (whole rows gathered first)."""
    g, _, c = values.shape
    out = np.zeros((g, length, c + 1), dtype=np.float32)
    has = valid.any(axis=1)
    if not has.any():
        return out
    rows = np.flatnonzero(has)
    idx = gather_positions(valid[rows], length, family)
    picked = np.take_along_axis(values[rows], idx[:, :, None], axis=1).astype(np.float32)
    if mean.ndim == 2:
        mean, std = mean[idx], std[idx]
    out[rows, :, :c] = (picked - mean) / std
    out[rows, :, c] = np.asarray(doy)[idx]
    return out


@pytest.mark.parametrize("family", ["v2", "v1.1"])
def test_binned_tokens_give_the_bits_of_the_plain_statement(family: str) -> None:
    rng = np.random.default_rng(1)
    n, t = 40, 60
    stats = band_stats(_spec(family).normalisation)
    s1 = rng.integers(-3000, 12000, (n, t, 2)).astype(np.int16)
    valid = rng.random((n, t)) < 0.6
    valid[:4] = False  # empty stream rows inside a group
    s1[~valid] = 0
    doy = np.linspace(1, 365, t).astype(np.uint16)
    mean, std = stats.s1(np.arange(t) >= t // 2)
    rows = np.array([3, 0, 17, 5, 22, 39, 1, 8])
    for length in (8, 32, 48):
        want = _tokens_reference(s1[rows], valid[rows], doy, mean, std, length, family)
        got = _tokens(s1, valid, doy, mean, std, length, family, rows)
        assert np.array_equal(got, want)
        full = rows[rows >= 4]
        assert np.array_equal(
            _tokens(s1, valid, doy, mean, std, length, family, full),
            _tokens_reference(s1[full], valid[full], doy, mean, std, length, family),
        )
    s2 = rng.integers(0, 9000, (n, t, 10)).astype(np.uint16)
    m2, sd2 = stats.s2()
    assert np.array_equal(
        _tokens(s2, valid, doy, m2, sd2, 40, family),
        _tokens_reference(s2, valid, doy, m2, sd2, 40, family),
    )
    assert np.array_equal(_tokens(s2, valid, doy, m2, sd2, 8, family, np.array([0, 2])),
                          np.zeros((2, 8, 11), np.float32))  # fmt: skip


def test_any_nonzero_matches_numpy() -> None:
    x = np.random.default_rng(2).integers(-1, 2, (30, 20, 3)).astype(np.int16)
    assert np.array_equal(_any_nonzero(x), (x != 0).any(axis=-1))


def test_in_place_mix64_is_the_splitmix64_finaliser() -> None:
    z = np.random.default_rng(3).integers(0, 2**63, (7, 9), dtype=np.int64).view(np.uint64)
    z[0, 0] = np.uint64(2**64 - 1)
    keep = z.copy()
    with np.errstate(over="ignore"):
        a = (z ^ (z >> np.uint64(30))) * _M1
        a = (a ^ (a >> np.uint64(27))) * _M2
        want = a ^ (a >> np.uint64(31))
    assert np.array_equal(_mix64(z), want)
    assert np.array_equal(z, keep)  # not in place unless asked
    assert np.array_equal(_mix64(z, inplace=True), want) and np.array_equal(z, want)


@pytest.mark.parametrize("preset", ["v2-nano", "v1.1"])
@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_encode_with_the_tail_forms_is_bit_identical_whatever_the_batch(
    preset: str, precision: str
) -> None:
    """The CPU head and pooling forms inside ``encode``: a pixel's bits never depend on its batch;
    the values agree with the module forwards (``_encode``) to float32 rounding."""
    from tessera_model.model import cpu_chunk_rows

    spec = ModelSpec.preset(preset)
    torch.manual_seed(0)
    model = TesseraModel(spec, with_projector=False).eval()
    g = torch.Generator().manual_seed(4)
    n = cpu_chunk_rows(spec, 24) + 3  # two chunks, the last one padded
    x2 = torch.randn(n, 16, 11, generator=g)
    x2[..., 10] = torch.randint(1, 366, (n, 16), generator=g).float()
    x1 = torch.randn(n, 24, 3, generator=g)
    x1[..., 2] = torch.randint(1, 366, (n, 24), generator=g).float()
    with torch.inference_mode():
        full = model.encode(x2, x1, precision)
        parts = torch.cat([model.encode(x2[:5], x1[:5], precision),
                           model.encode(x2[5:], x1[5:], precision)])  # fmt: skip
        order = torch.randperm(n, generator=g)
        shuffled = model.encode(x2[order], x1[order], precision)
    assert torch.equal(parts, full)
    assert torch.equal(shuffled, full[order])
    if precision == "fp32":
        with torch.enable_grad():  # the module forwards with their own ops
            want = model._encode(x2, x1).detach()
        assert float((full - want).abs().max()) <= 1e-5
