"""The fused time-major GRU scan of CPU inference (small cells) against the reference cell."""

from __future__ import annotations

import pytest
import torch

from tessera_model import ModelSpec, TesseraModel, int8, pooling
from tessera_model.int8 import PackedWeight, cpu_weights, onednn_available, pack_weight
from tessera_model.model import CPU_CHUNK_MIN_FUSED_GRU, cpu_chunk_rows
from tessera_model.pooling import (
    GRUCell,
    TemporalAttentionPooling,
    fused_scan_weights,
    scan_time_major,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN linear")


def _cell(d: int, seed: int = 0) -> GRUCell:
    torch.manual_seed(seed)
    cell = GRUCell(d, d)
    with torch.no_grad():
        for b in (cell.b_r, cell.b_z, cell.b_h):
            b.normal_()
    return cell


def _stepwise(cell: GRUCell, x: torch.Tensor) -> torch.Tensor:
    """The reference step of the cell in float64, (B, T, D) -> (B, T, H)."""
    cell64 = GRUCell(cell.W_ir.in_features, cell.hidden_dim)
    cell64.load_state_dict(cell.state_dict())
    cell64 = cell64.double()
    h = torch.zeros(x.shape[0], cell.hidden_dim, dtype=torch.float64)
    outs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            h = cell64(x[:, t].double(), h)
            outs.append(h)
    return torch.stack(outs, 1)


def _packed(cell: GRUCell) -> tuple[PackedWeight, PackedWeight]:
    (w_rz, b_rz), (w_h, b_h) = fused_scan_weights(cell)
    return pack_weight(w_rz, b_rz), pack_weight(w_h, b_h)


def _time_major(x: torch.Tensor, hidden: int) -> torch.Tensor:
    b, t, d = x.shape
    xh = torch.full((t + 1, b, d + hidden), float("nan"))  # the scan must overwrite the h part
    xh[:t, :, :d] = x.transpose(0, 1)
    return xh


@needs_onednn
@pytest.mark.parametrize("b,t", [(37, 40), (512, 9), (1, 2)])
def test_scan_time_major_matches_the_reference_cell(b: int, t: int) -> None:
    """Float32 rounding only: about 1e-6 after 40 steps of unit-scale inputs (each step's
    GEMM sums D + H products in one accumulator; the precomputed-input scan: about 0.7e-6)."""
    cell = _cell(64)
    x = torch.randn(b, t, 64)
    want = _stepwise(cell, x)
    xh = _time_major(x, 64)
    with torch.inference_mode():
        got = scan_time_major(xh, 64, *_packed(cell), {})
    assert got.shape == (t, b, 64)
    assert float((got.transpose(0, 1).double() - want).abs().max()) <= 2e-6
    assert torch.equal(xh[:t, :, :64], x.transpose(0, 1))  # the inputs are left as they were


@needs_onednn
def test_scan_time_major_is_not_the_cell_with_gates_swapped() -> None:
    """The test above can fail: the same scan with r and z exchanged is far off."""
    cell = _cell(64)
    x = torch.randn(16, 12, 64)
    want = _stepwise(cell, x)
    with torch.no_grad():
        cell.W_ir.weight, cell.W_iz.weight = cell.W_iz.weight, cell.W_ir.weight
        cell.W_hr.weight, cell.W_hz.weight = cell.W_hz.weight, cell.W_hr.weight
        b_r = cell.b_r.clone()
        cell.b_r.copy_(cell.b_z)
        cell.b_z.copy_(b_r)
    with torch.inference_mode():
        got = scan_time_major(_time_major(x, 64), 64, *_packed(cell), {})
    assert float((got.transpose(0, 1).double() - want).abs().max()) > 1e-2


@needs_onednn
def test_forward_time_major_matches_the_pooling_forward() -> None:
    torch.manual_seed(3)
    pool = TemporalAttentionPooling(64).eval()
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(70, 40, 64)
    ws: dict = {}
    with torch.inference_mode():
        want = pool(x)
        xh = pool.scan_buffer(ws, 70, 40, x)
        xh[:40, :, :64] = x.transpose(0, 1)
        w_rz, w_h = _packed(pool.temporal_context.gru_cell)
        got = pool.forward_time_major(xh, ws, w_rz, w_h)
        again = pool.forward_time_major(xh, ws, w_rz, w_h)  # reused buffers: the same bits
    assert got.shape == (70, 64)
    assert float((got - want).abs().max()) <= 1e-6
    assert torch.equal(got, again)


@needs_onednn
def test_a_pixel_gets_the_same_bits_wherever_it_sits_in_the_chunk() -> None:
    torch.manual_seed(5)
    pool = TemporalAttentionPooling(64).eval()
    x = torch.randn(64, 40, 64)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    w_rz, w_h = _packed(pool.temporal_context.gru_cell)
    outs = []
    with torch.inference_mode():
        for xs in (x, x[order]):
            ws: dict = {}
            xh = pool.scan_buffer(ws, 64, 40, xs)
            xh[:40, :, :64] = xs.transpose(0, 1)
            outs.append(pool.forward_time_major(xh, ws, w_rz, w_h))
    assert torch.equal(outs[1], outs[0][order])


@needs_onednn
def test_gru_weights_by_precision() -> None:
    """fp32: small cells the fused-scan maps, wide cells the precomputed input map; int8: every
    cell the int8 input and recurrent maps (TemporalAttentionPooling.forward_int8)."""
    torch.manual_seed(0)
    model = TesseraModel(ModelSpec.preset("small"), with_projector=False).eval()
    qw, q8 = cpu_weights(model, "fp32"), cpu_weights(model, "int8-dynamic")
    for name in ("s2_backbone", "s1_backbone"):
        assert isinstance(qw[f"{name}.gru_xrz"], PackedWeight)
        assert isinstance(qw[f"{name}.gru_xh"], PackedWeight)
        assert f"{name}.gru_in" not in qw and f"{name}.gru_rz" not in qw
        for key in ("gru_in", "gru_i8_rz", "gru_i8_hh"):
            assert isinstance(q8[f"{name}.{key}"], int8.QuantisedWeight)
        assert not any(k.startswith(f"{name}.gru_x") for k in q8)
    assert int8._fused_scan(GRUCell(64, 64))
    assert not int8._fused_scan(GRUCell(512, 512))  # v1, v1.1 keep the precomputed input map


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x2 = torch.randn(n, 40, 11, generator=g)
    x2[..., 10] = torch.randint(1, 366, (n, 40), generator=g).float()
    x1 = torch.randn(n, 40, 3, generator=g)
    x1[..., 2] = torch.randint(1, 366, (n, 40), generator=g).float()
    return x2, x1


@needs_onednn
def test_encode_with_the_fused_scan_matches_the_precomputed_input_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole small model: fused scan vs the scan of ``GRUCell.scan`` (same chunks)."""
    spec = ModelSpec.preset("small")
    x2, x1 = _inputs(40, seed=2)
    outs = []
    for max_dim in (pooling.FUSED_SCAN_MAX_DIM, 0):
        monkeypatch.setattr(pooling, "FUSED_SCAN_MAX_DIM", max_dim)
        torch.manual_seed(0)
        model = TesseraModel(spec, with_projector=False).eval()
        with torch.inference_mode():
            outs.append(model.encode(x2, x1))
        assert ("s2_backbone.gru_xrz" in cpu_weights(model)) == (max_dim > 0)
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-6 * max(1.0, float(outs[1].abs().max()))
    assert not torch.equal(outs[0], outs[1])  # the two paths really ran


def test_without_onednn_the_small_model_falls_back_to_the_plain_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ModelSpec.preset("small")
    x2, x1 = _inputs(9, seed=3)
    torch.manual_seed(0)
    model = TesseraModel(spec, with_projector=False).eval()
    with torch.inference_mode():
        generic = model._encode(x2, x1)
        monkeypatch.setattr(int8, "USE_ONEDNN", False)
        assert not any("gru" in k for k in cpu_weights(model))
        plain = model.encode(x2, x1)
    assert float((plain - generic).abs().max()) <= 1e-5


def test_fused_gru_models_take_larger_chunks_only_in_the_v1_family() -> None:
    assert cpu_chunk_rows(ModelSpec.preset("small"), 40) == CPU_CHUNK_MIN_FUSED_GRU
    assert cpu_chunk_rows(ModelSpec.preset("v1"), 40) == 32
    assert cpu_chunk_rows(ModelSpec.preset("v1.1"), 40) == 32


@needs_onednn
def test_scan_time_major_gives_the_same_bits_at_one_and_two_threads() -> None:
    cell = _cell(64, seed=7)
    x = torch.randn(512, 12, 64)  # 512 x 64 step tensors: torch's element-wise ops go parallel
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(scan_time_major(_time_major(x, 64), 64, *_packed(cell), {}).clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
