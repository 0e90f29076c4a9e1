"""CPU inference forms: fused GRU scan, own encoder-layer forward, fixed-size chunks, int8."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tessera_model import ModelSpec, TesseraModel, embed_pixels, embed_pixels_binned
from tessera_model.backbone import encoder_layer_cpu
from tessera_model.errors import SpecError
from tessera_model.int8 import int8_linear, quantise_rows, quantise_weight
from tessera_model.model import cpu_chunk_rows
from tessera_model.pooling import GRUCell
from tests.model.test_v2_family import edge_pixels

TilePixels = Any


def _model(spec: ModelSpec, seed: int = 0) -> TesseraModel:
    torch.manual_seed(seed)
    return TesseraModel(spec, with_projector=False).eval()


def _inputs(n: int, t2: int, t1: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x2 = torch.randn(n, t2, 11, generator=g)
    x2[..., 10] = torch.randint(1, 366, (n, t2), generator=g).float()
    x1 = torch.randn(n, t1, 3, generator=g)
    x1[..., 2] = torch.randint(1, 366, (n, t1), generator=g).float()
    return x2, x1


def test_fused_gru_scan_matches_the_plain_step_loop() -> None:
    """The buffered no-grad scan (tanh as 2 sigmoid(2a) - 1) agrees with the cell to 1e-6."""
    torch.manual_seed(0)
    cell = GRUCell(64, 64)
    with torch.no_grad():
        for b in (cell.b_r, cell.b_z, cell.b_h):
            b.normal_()
    x = torch.randn(37, 40, 64)
    with torch.no_grad():
        h = torch.zeros(37, 64)
        outs = []
        for t in range(40):
            h = cell(x[:, t], h)
            outs.append(h)
        plain = torch.stack(outs, 1)
    with torch.inference_mode():
        fused = cell.scan(x, {})
    assert float((fused - plain).abs().max()) <= 1e-6
    autograd_form = cell.scan(x)  # grad enabled: the reference form
    assert float((fused - autograd_form.detach()).abs().max()) <= 1e-6


@pytest.mark.parametrize("d,heads,ffn,t", [(64, 4, 256, 40), (144, 4, 384, 48)])
def test_encoder_layer_cpu_matches_torch(d: int, heads: int, ffn: int, t: int) -> None:
    """Both attention forms (bmm for 16-wide heads, SDPA for 36-wide) vs torch's layer."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d, heads, ffn, 0.0, batch_first=True).eval()
    x = torch.randn(9, t, d)
    with torch.inference_mode():
        want = layer(x)
        got = encoder_layer_cpu(layer, x, {})
    assert float((got - want).abs().max()) <= 5e-6


@pytest.mark.parametrize("preset", ["small", "v2-nano", "v1.1"])
def test_chunked_cpu_encode_matches_the_generic_forward(preset: str) -> None:
    spec = ModelSpec.preset(preset)
    model = _model(spec)
    t = 40 if spec.family == "v1.0" else 24
    x2, x1 = _inputs(21, t, t + 8)
    with torch.inference_mode():
        fast = model.encode(x2, x1)
        generic = model._encode(x2, x1)
    assert float((fast - generic).abs().max()) <= 1e-5  # float32 rounding of ~unit outputs


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_chunked_encode_is_bit_identical_whatever_the_batch(precision: str) -> None:
    spec = ModelSpec.preset("small")
    model = _model(spec)
    rows = cpu_chunk_rows(spec, 40)
    n = 2 * rows + 5  # three chunks, the last one padded
    x2, x1 = _inputs(n, 40, 40, seed=1)
    with torch.inference_mode():
        full = model.encode(x2, x1, precision)
        parts = torch.cat([model.encode(x2[:3], x1[:3], precision),
                           model.encode(x2[3:], x1[3:], precision)])  # fmt: skip
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        shuffled = model.encode(x2[order], x1[order], precision)
    assert torch.equal(parts, full)
    assert torch.equal(shuffled, full[order])


def test_chunk_rows_depend_on_the_spec_and_length_only() -> None:
    for preset in ("small", "v1", "v2-nano", "v2-large"):
        spec = ModelSpec.preset(preset)
        rows = cpu_chunk_rows(spec, 40)
        assert rows & (rows - 1) == 0 and 8 <= rows <= 512
    assert cpu_chunk_rows(ModelSpec.preset("v1"), 40) < cpu_chunk_rows(
        ModelSpec.preset("small"), 40
    )


def test_int8_rows_are_quantised_independently() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 64)
    x[2] *= 1000  # an outlier row must not change the others' scales
    x[4] = 0  # an all-zero row stays zero
    q, s = quantise_rows(x)
    q1, s1 = quantise_rows(x[:2])
    assert torch.equal(q[:2], q1) and torch.equal(s[:2], s1)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and not q[4].any()
    lin = torch.nn.Linear(64, 40)
    qw = quantise_weight(lin.weight, lin.bias)
    y = int8_linear(x, qw)
    ref = lin(x).detach()
    assert torch.equal(int8_linear(x[3:4], qw), y[3:4])  # one row alone: the same bits
    cos = torch.nn.functional.cosine_similarity(y, ref, dim=1)
    assert float(cos[[0, 1, 2, 3, 5]].min()) > 0.9999
    torch.testing.assert_close(y[4], lin.bias.detach())


@pytest.mark.parametrize("preset", ["v1", "small"])
def test_int8_embeddings_close_to_fp32_per_pixel_and_batch_independent(
    tile_pixels: TilePixels, preset: str
) -> None:
    """v1.0 (the real preset) and small (int8 GRU through the kernel's fused input maps):
    cosine >= 0.999 on every pixel; two batch sizes, same bytes."""
    model = _model(ModelSpec.preset(preset))
    p = tile_pixels

    def run(bs: int, precision: str) -> np.ndarray:
        return embed_pixels(
            model, p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy, p.s1_keys,
            p.pixel_ids, seed=3, batch_size=bs, device="cpu", precision=precision,
            all_steps_fallback=True,
        )  # fmt: skip

    fp32 = run(0, "fp32")
    q = run(0, "int8-dynamic")
    ok = np.isfinite(fp32).all(1)
    assert ok.sum() >= 35 and np.array_equal(ok, np.isfinite(q).all(1))
    cos = (
        (fp32[ok] * q[ok]).sum(1) / np.linalg.norm(fp32[ok], axis=1) / np.linalg.norm(q[ok], axis=1)
    )
    assert cos.min() >= 0.999, cos.min()
    assert not np.array_equal(q[ok], fp32[ok])  # really another path
    np.testing.assert_array_equal(run(20, "int8-dynamic"), q)


@pytest.mark.parametrize("preset", ["v2-nano", "v1.1"])  # v1.1: the int8 GRU, binned inputs
def test_int8_binned_close_and_batch_independent(preset: str) -> None:
    model = _model(ModelSpec.preset(preset))
    px = edge_pixels(t2=60)

    s1 = np.concatenate([px["asc"], px["desc"]], axis=1)
    doy1 = np.concatenate([px["asc_doy"], px["desc_doy"]])
    desc = np.arange(doy1.size) >= px["asc_doy"].size

    def run(bs: int, precision: str) -> np.ndarray:
        return embed_pixels_binned(
            model, px["s2"], px["s2_valid"], px["s2_doy"], s1, doy1, desc, batch_size=bs,
            device="cpu", precision=precision,
        )  # fmt: skip

    fp32, q = run(0, "fp32"), run(0, "int8-dynamic")
    ok = np.isfinite(fp32).all(1)
    cos = (
        (fp32[ok] * q[ok]).sum(1) / np.linalg.norm(fp32[ok], axis=1) / np.linalg.norm(q[ok], axis=1)
    )
    assert cos.min() >= 0.999, cos.min()
    np.testing.assert_array_equal(run(3, "int8-dynamic"), q)


def test_precision_is_fp32_by_default_and_checked(tile_pixels: TilePixels) -> None:
    model = _model(ModelSpec.preset("small"))
    p = tile_pixels
    args = (model, p.s2, p.s2_valid, p.s2_doy, p.s1, p.s1_valid, p.s1_doy, p.s1_keys,
            p.pixel_ids)  # fmt: skip
    default = embed_pixels(*args, seed=1, device="cpu")
    np.testing.assert_array_equal(default, embed_pixels(*args, seed=1, device="cpu",
                                                        precision="fp32"))  # fmt: skip
    with pytest.raises(ValueError, match="precision"):
        embed_pixels(*args, seed=1, device="cpu", precision="int4")
    x2, x1 = _inputs(4, 40, 40)
    with pytest.raises(SpecError, match="precision"):
        model.encode(x2, x1, "int8-dynamic")  # autograd on: not an inference call


# ---- oneDNN float32 path, packed weights, exp2 softmax, DOY table (issue 11 item 2) -----------


@pytest.mark.parametrize("preset", ["small", "v2-nano", "v1.1"])
def test_onednn_path_matches_the_addmm_path(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN GEMMs (fused bias/residual/ReLU, packed weights) vs MKL addmm: float rounding."""
    from tessera_model import int8

    if not int8.onednn_available():
        pytest.skip("torch without oneDNN linear")
    spec = ModelSpec.preset(preset)
    model = _model(spec)
    t = 40 if spec.family == "v1.0" else 24
    x2, x1 = _inputs(37, t, t + 8, seed=2)
    with torch.inference_mode():
        fast = model.encode(x2, x1)
        monkeypatch.setattr(int8, "USE_ONEDNN", False)
        plain = model.encode(x2, x1)
    assert not torch.equal(fast, plain) or preset == "small"  # another GEMM (small: same bits)
    assert float((fast - plain).abs().max()) <= 2e-6 * max(1.0, float(plain.abs().max()))


def test_packed_weights_follow_parameter_changes() -> None:
    """The per-model cache of packed/int8 weights is rebuilt when a parameter changes."""
    spec = ModelSpec.preset("small")
    model = _model(spec)
    x2, x1 = _inputs(8, 40, 40, seed=3)
    with torch.inference_mode():
        before = model.encode(x2, x1)
        before_q = model.encode(x2, x1, "int8-dynamic")
    with torch.no_grad():
        model.s2_backbone.transformer_encoder.layers[0].linear1.weight.mul_(1.5)
        model.s1_backbone.attn_pool.temporal_context.gru_cell.W_hh.weight.mul_(0.5)
    fresh = _model(spec)
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        after, want = model.encode(x2, x1), fresh.encode(x2, x1)
        after_q = model.encode(x2, x1, "int8-dynamic")
    assert not torch.equal(after, before) and torch.equal(after, want)
    assert not torch.equal(after_q, before_q)


def test_softmax_exp2_matches_softmax_and_guards_its_range() -> None:
    from tessera_model.backbone import LOG2E, softmax_exp2

    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 40, 40, generator=g)
    out = torch.empty_like(x)
    got = softmax_exp2(x * LOG2E, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, torch.softmax(x, -1), atol=1e-7, rtol=2e-6)
    for shift in (200.0, -200.0):  # exp2 alone would overflow / vanish: the max is subtracted
        y = x.clone()
        y[5] += shift
        got = softmax_exp2(y * LOG2E, torch.empty_like(y))
        assert torch.isfinite(got).all()
        # scores near 300 (base 2) carry a rounding of 300 x 2^-24 from their scaling: ~2e-5
        want = torch.softmax(y.double(), -1).float()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=4e-5)
        torch.testing.assert_close(got[:5], want[:5], atol=1e-7, rtol=2e-6)


def test_doy_table_matches_the_formula() -> None:
    from tessera_model.backbone import doy_encoding_cpu
    from tessera_model.encoding import doy_encoding

    doy = torch.tensor([[0.0, 1.0, 180.0, 365.0, 366.0]])
    torch.testing.assert_close(doy_encoding_cpu(doy, 64), doy_encoding(doy, 64), atol=1e-6, rtol=0)
    odd = torch.tensor([[1.5, 400.0]])  # not in the table: computed
    assert torch.equal(doy_encoding_cpu(odd, 64), doy_encoding(odd, 64))
    a = doy_encoding_cpu(torch.tensor([[7.0]]), 144)
    b = doy_encoding_cpu(torch.tensor([[3.0, 7.0, 9.0]]), 144)
    assert torch.equal(a[0, 0], b[0, 1])  # a day's row never depends on the batch


def test_quantise_rows_scale_is_the_row_max_abs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 70, generator=g)
    x[3] = -x[3].abs()  # a row whose largest magnitude is negative
    _, s = quantise_rows(x)
    want = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True) / 127.0
    assert torch.equal(s, want)


def test_transformer_pieces_of_a_gru_chunk_change_nothing_but_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GRU-pooled chunk runs its transformer in pieces; one piece gives the same to 1e-6."""
    from tessera_model import backbone

    spec = ModelSpec.preset("small")
    model = _model(spec)
    rows = cpu_chunk_rows(spec, 40)
    x2, x1 = _inputs(rows, 40, 40, seed=4)
    with torch.inference_mode():
        pieces = model.encode(x2, x1)
        monkeypatch.setattr(backbone, "TRANSFORMER_CHUNK_BYTES", 1 << 40)
        whole = model.encode(x2, x1)
    assert float((pieces - whole).abs().max()) <= 1e-6 * max(1.0, float(whole.abs().max()))
