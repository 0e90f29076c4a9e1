"""The int8 GRU pooling of the int8-dynamic CPU path (issue 11 item 2): the compiled kernel
(``kernels/gru_i8.c``) against its torch form, row independence, accuracy against float32."""

from __future__ import annotations

import pytest
import torch

from tessera_model import cpu_kernels
from tessera_model.int8 import QuantisedWeight, quantise_rows, quantise_weight
from tessera_model.pooling import TemporalAttentionPooling

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.gru_pool_i8_available(), reason="needs the int8 GRU kernel (AVX-512 VNNI)"
)


def _pool(d: int, seed: int = 0) -> tuple[TemporalAttentionPooling, tuple[QuantisedWeight, ...]]:
    torch.manual_seed(seed)
    pool = TemporalAttentionPooling(d).eval()
    with torch.no_grad():  # biases and LayerNorm away from their initial 0 / 1
        for p in (pool.layer_norm.weight, pool.layer_norm.bias, pool.query.bias):
            p.add_(torch.randn_like(p) * 0.2)
    cell = pool.temporal_context.gru_cell
    w_in = quantise_weight(
        torch.cat([cell.W_ir.weight, cell.W_iz.weight, cell.W_ih.weight]),
        torch.cat([cell.b_r, cell.b_z, cell.b_h]) + 0.1,
    )
    w_rz = quantise_weight(torch.cat([cell.W_hr.weight, cell.W_hz.weight]), None)
    w_hh = quantise_weight(cell.W_hh.weight, None)
    return pool, (w_in, w_rz, w_hh)


def _run(pool: TemporalAttentionPooling, w: tuple, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pool.forward_int8(x, quantise_rows(x.reshape(-1, x.shape[-1])), *w)


def _torch_form(pool: TemporalAttentionPooling, w: tuple, x: torch.Tensor,
                monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "gru_pool_i8_available", lambda: False)
        return _run(pool, w, x)


@needs_kernel
@pytest.mark.parametrize(
    ("d", "b", "t"), [(64, 37, 40), (64, 3, 2), (32, 9, 7), (48, 4, 3), (512, 5, 12), (16, 2, 70)]
)
def test_kernel_matches_its_torch_form(d: int, b: int, t: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    pool, w = _pool(d)
    x = torch.randn(b, t, d) * 2
    got, want = _run(pool, w, x), _torch_form(pool, w, x, monkeypatch)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@needs_kernel
def test_rows_independent_of_batch_and_thread_split() -> None:
    pool, w = _pool(64, seed=1)
    x = torch.randn(70, 40, 64)
    whole = _run(pool, w, x)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(_run(pool, w, x), whole)
    finally:
        torch.set_num_threads(threads)
    for rows in (slice(0, 1), slice(5, 13), slice(63, 70)):
        assert torch.equal(_run(pool, w, x[rows].contiguous()), whole[rows])


@pytest.mark.parametrize("d", [64, 20])  # 20: not a multiple of 16, the torch form runs
def test_int8_pooling_close_to_float32(d: int) -> None:
    """A pixel's tokens share most of their value (its year of observations): cosine >= 0.999
    to the float32 pooling; with independent random tokens, where every weight error shows in
    full, >= 0.99 (the model-level bound is in test_cpu_inference.py)."""
    pool, w = _pool(d, seed=2)
    base = torch.randn(64, 1, d)
    for x, bound in ((base + 0.5 * torch.randn(64, 40, d), 0.999), (torch.randn(64, 40, d), 0.99)):
        with torch.no_grad():
            ref = pool(x)
        got = _run(pool, w, x)
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        assert float(cos.min()) >= bound, float(cos.min())
        assert not torch.equal(got, ref)


def test_one_step_is_the_step_itself() -> None:
    pool, w = _pool(32)
    x = torch.randn(5, 1, 32)
    assert torch.equal(_run(pool, w, x), x[:, 0])


@needs_kernel
def test_kernel_rejects_bad_shapes() -> None:
    pool, (w_in, w_rz, w_hh) = _pool(64)
    x = torch.randn(4, 6, 64)
    xq = quantise_rows(x.reshape(-1, 64))
    a, c = pool.query_constants()
    ins = (w_in.vnni, w_in.comp, w_in.scale, w_in.bias)
    rz, hh = (w_rz.vnni, w_rz.comp, w_rz.scale), (w_hh.vnni, w_hh.comp, w_hh.scale)
    with pytest.raises(ValueError, match="out"):
        cpu_kernels.gru_pool_i8(xq, x, ins, rz, hh, a, c, 1e-5, torch.empty(3, 64))
    with pytest.raises(ValueError, match="w_hh"):
        cpu_kernels.gru_pool_i8(xq, x, ins, rz, rz, a, c, 1e-5, torch.empty(4, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        cpu_kernels.gru_pool_i8(xq, x, ins, rz, hh, a[:40].contiguous(), c, 1e-5,
                                torch.empty(4, 64))  # fmt: skip
