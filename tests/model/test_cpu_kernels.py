"""The compiled CPU kernels (tessera_model.cpu_kernels): math, independence, build, fallback."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tessera_model import backbone, cpu_kernels
from tessera_model.backbone import encoder_layer_cpu

needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc").split()[0]) is None
    or os.environ.get(cpu_kernels.ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"),
    reason="no C compiler, or the kernels switched off",
)


@pytest.fixture
def fresh_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """The module as in a new process, building into an empty cache (restored afterwards)."""
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    return tmp_path / "cache"


@needs_cc
def test_kernels_build_here() -> None:
    assert cpu_kernels.available()


@needs_cc
@pytest.mark.parametrize(
    ("n", "t", "heads", "dh"),
    [(5, 40, 4, 16), (3, 56, 4, 36), (2, 48, 4, 64), (2, 56, 4, 110), (2, 40, 4, 128),
     (1, 57, 4, 160), (3, 7, 3, 5), (2, 1, 2, 16), (1, 257, 1, 20)],
)  # fmt: skip
def test_attention_matches_the_softmax_math(n: int, t: int, heads: int, dh: int) -> None:
    gen = torch.Generator().manual_seed(t * dh)
    qkv = torch.randn(n * t, 3 * heads * dh, generator=gen) * 2
    got = cpu_kernels.attention(qkv, n, t, heads, dh)
    want = cpu_kernels.reference_attention(qkv, n, t, heads, dh)
    assert (got - want).abs().max() < 2e-6 * max(1.0, float(want.abs().max()))
    # against torch's own SDPA too
    q, k, v = qkv.view(n, t, 3, heads, dh).permute(2, 0, 3, 1, 4)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * t, heads * dh)
    assert torch.allclose(got, sdpa, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0, 400.0])
def test_attention_guards_the_exponent_range(scale: float) -> None:
    """Scores far outside exp2's range (redone with the row maximum) and tiny ones."""
    n, t, heads, dh = 3, 40, 2, 16
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(n * t, 3 * heads * dh, generator=gen)
    qkv[:, : 2 * heads * dh] *= scale  # q and k: scores scale with scale**2
    qkv[t : 2 * t, : heads * dh] -= 50.0 * scale  # one pixel's queries far off
    got = cpu_kernels.attention(qkv, n, t, heads, dh)
    want = cpu_kernels.reference_attention(qkv, n, t, heads, dh)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 2e-6 * max(1.0, float(want.abs().max()))


@needs_cc
def test_attention_is_per_pixel_and_thread_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    n, t, heads, dh = 64, 40, 4, 16
    qkv = torch.randn(n * t, 3 * heads * dh, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = cpu_kernels.attention(qkv, n, t, heads, dh)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    three = cpu_kernels.attention(qkv, n, t, heads, dh)
    part = cpu_kernels.attention(qkv[5 * t : 9 * t].contiguous(), 4, t, heads, dh)
    assert torch.equal(one, three)
    assert torch.equal(one[5 * t : 9 * t], part)


@needs_cc
def test_attention_rejects_bad_buffers() -> None:
    qkv = torch.randn(2 * 8, 3 * 4 * 4)
    with pytest.raises(ValueError, match="qkv float32 contiguous of shape"):
        cpu_kernels.attention(qkv.double(), 2, 8, 4, 4)
    with pytest.raises(ValueError, match="qkv float32 contiguous of shape"):
        cpu_kernels.attention(qkv, 2, 8, 2, 4)
    with pytest.raises(ValueError, match="out float32"):
        cpu_kernels.attention(qkv, 2, 8, 4, 4, out=torch.empty(2 * 8, 15))


@needs_cc
@pytest.mark.parametrize("d", [1, 7, 16, 64, 144, 440, 640])
def test_layer_norm_matches_torch(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(300, d, generator=gen) * 3 + 2
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    want = F.layer_norm(x.double(), (d,), w.double(), b.double(), 1e-5).float()
    got = cpu_kernels.layer_norm(x, w, b, 1e-5)
    assert (got - want).abs().max() < 1e-5
    plain = cpu_kernels.layer_norm(x, None, None, 1e-5)
    assert (plain - F.layer_norm(x.double(), (d,), eps=1e-5).float()).abs().max() < 1e-5
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_kernels, "MIN_ROWS_PER_THREAD", 16)  # split these 300 rows
    y = x.clone()
    assert torch.equal(cpu_kernels.layer_norm(y, w, b, 1e-5, out=y), got)  # in place, 2 threads


@needs_cc
@pytest.mark.parametrize(("d", "heads", "t"), [(64, 4, 40), (144, 4, 56), (440, 4, 48)])
def test_encoder_layer_with_kernels_matches_torch_ops(
    d: int, heads: int, t: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, 0.0, batch_first=True).eval()
    x = torch.randn(8, t, d)
    with torch.inference_mode():
        fast = encoder_layer_cpu(layer, x, {})
        monkeypatch.setattr(backbone, "USE_ATTENTION_KERNEL", False)
        plain = encoder_layer_cpu(layer, x, {})
        ref = layer(x)
    assert (fast - plain).abs().max() < 1e-5
    assert (fast - ref).abs().max() < 1e-5


@needs_cc
def test_build_is_cached_by_source_compiler_and_cpu(fresh_kernels) -> None:
    assert cpu_kernels.available()
    built = list(fresh_kernels.glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert cpu_kernels._build() == built[0]  # found, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert not list(fresh_kernels.glob(".kernels-*"))  # no temporary left behind


def test_without_a_compiler_inference_falls_back_to_torch(
    fresh_kernels, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with caplog.at_level(logging.WARNING, logger="tessera_model.cpu_kernels"):
        assert not cpu_kernels.available()
    assert "CPU kernels unavailable" in caplog.text
    assert not list(fresh_kernels.glob("*.so")) and not list(fresh_kernels.glob(".kernels-*"))
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, 0.0, batch_first=True).eval()
    x = torch.randn(4, 40, 64)
    with torch.inference_mode():
        assert (encoder_layer_cpu(layer, x, {}) - layer(x)).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.attention(torch.randn(40, 192), 1, 40, 4, 16)


def test_the_switch_turns_the_kernels_off(fresh_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.available()
    assert not fresh_kernels.exists()  # nothing built


@needs_cc
def test_int8_kernels_give_the_torch_forms_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera_model.int8 import int8_linear, quantise_rows, quantise_weight

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 99, generator=gen) * 4
    x[7] = 0.0
    lin = nn.Linear(99, 37)
    qw = quantise_weight(lin.weight, lin.bias)
    qw_nobias = quantise_weight(lin.weight, None)
    res = torch.randn(300, 37, generator=gen)
    cases = [(w, r, relu) for w in (qw, qw_nobias) for r in (None, res) for relu in (False, True)]
    with torch.inference_mode():
        fast_q = quantise_rows(x)
        fast = [int8_linear(x, w, residual=r, relu=relu) for w, r, relu in cases]
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
        slow_q = quantise_rows(x)
        slow = [int8_linear(x, w, residual=r, relu=relu) for w, r, relu in cases]
    assert torch.equal(fast_q[0], slow_q[0]) and torch.equal(fast_q[1], slow_q[1])
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


@needs_cc
@pytest.mark.parametrize("d", [7, 64, 144, 384])
def test_fused_int8_rows_are_quantise_rows_of_the_result(d: int) -> None:
    """LayerNorm and the int8 epilogue quantise their output rows in cache: exactly the values
    of quantising the float result afterwards (rows not a multiple of the 4-row blocks)."""
    from tessera_model.int8 import quantise_rows, quantise_weight

    gen = torch.Generator().manual_seed(d)
    rows = 4 * 8 + 3
    x = torch.randn(rows, d, generator=gen) * 3 + 0.5
    x[5] = 0.0  # a zero row: scale 1
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    q = (torch.empty(rows, d, dtype=torch.int8), torch.empty(rows, 1))
    y = cpu_kernels.layer_norm(x, w, b, 1e-5, None, q)
    want = quantise_rows(y.clone())
    assert torch.equal(q[0], want[0]) and torch.equal(q[1], want[1])
    assert torch.equal(y, cpu_kernels.layer_norm(x, w, b, 1e-5))  # the float rows unchanged

    qw = quantise_weight(torch.randn(d + 5, d, generator=gen), torch.randn(d + 5, generator=gen))
    xq = quantise_rows(x)
    acc = torch._int_mm(xq[0], qw.wq_t)
    res = torch.randn(rows, d + 5, generator=gen)
    for residual, relu in ((None, True), (res, False)):
        y = cpu_kernels.dequantise(acc, qw.scale, xq[1], qw.bias, residual, relu,
                                   torch.empty(rows, d + 5))  # fmt: skip
        q = (torch.empty(rows, d + 5, dtype=torch.int8), torch.empty(rows, 1))
        assert cpu_kernels.dequantise(acc, qw.scale, xq[1], qw.bias, residual, relu, None, q) is None
        want = quantise_rows(y)
        assert torch.equal(q[0], want[0]) and torch.equal(q[1], want[1])


@needs_cc
def test_int8_linear_chained_inputs_match_the_unfused_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera_model.int8 import int8_linear, quantise_rows, quantise_weight

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(50, 40, generator=gen)
    l1, l2 = nn.Linear(40, 96), nn.Linear(96, 40)
    q1, q2 = quantise_weight(l1.weight, l1.bias), quantise_weight(l2.weight, l2.bias)
    with torch.inference_mode():
        want = int8_linear(int8_linear(x, q1, relu=True), q2, residual=x)
        for kernels in (True, False):
            monkeypatch.setattr(cpu_kernels, "available", lambda k=kernels: k)
            fq = (torch.empty(50, 96, dtype=torch.int8), torch.empty(50, 1))
            assert int8_linear(None, q1, relu=True, xq=quantise_rows(x), q_out=fq,
                               float_out=False) is None  # fmt: skip
            got = int8_linear(None, q2, residual=x, xq=fq)
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="xq"):
        int8_linear(None, q1)
    with pytest.raises(ValueError, match="q_out"):
        int8_linear(x, q1, float_out=False)


@needs_cc
@pytest.mark.parametrize("preset", ["small", "v2-nano"])
def test_int8_encode_is_unchanged_by_fused_quantisation(
    preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 path quantises each layer input where it is produced (and, with VNNI, runs the
    fused int8 GEMM); the embeddings are bit-identical to torch's int8 product, the epilogue and
    quantising every input afterwards."""
    from tessera_model import ModelSpec, TesseraModel, int8
    from tessera_model.int8 import quantise_into

    torch.manual_seed(0)
    model = TesseraModel(ModelSpec.preset(preset), with_projector=False).eval()
    gen = torch.Generator().manual_seed(1)
    s2, s1 = torch.randn(20, 24, 11, generator=gen), torch.randn(20, 30, 3, generator=gen)
    s2[..., -1] = torch.randint(1, 366, (20, 24), generator=gen).float()
    s1[..., -1] = torch.randint(1, 366, (20, 30), generator=gen).float()
    with torch.inference_mode():
        fused = model.encode(s2, s1, "int8-dynamic")
        ln, deq = cpu_kernels.layer_norm, cpu_kernels.dequantise

        def ln_after(x, w, b, eps, out=None, q_out=None):
            y = ln(x, w, b, eps, out)
            if q_out is not None:
                quantise_into(y, q_out)
            return y

        def deq_after(acc, sw, sx, bias, res, relu, out, q_out=None):
            y = deq(acc, sw, sx, bias, res, relu, torch.empty(acc.shape) if out is None else out)
            if q_out is not None:
                quantise_into(y, q_out)
            return out if out is None else y

        monkeypatch.setattr(cpu_kernels, "layer_norm", ln_after)
        monkeypatch.setattr(cpu_kernels, "dequantise", deq_after)
        monkeypatch.setattr(int8, "USE_GEMM_I8", False)  # torch._int_mm, then deq_after
        unfused = model.encode(s2, s1, "int8-dynamic")
    assert torch.equal(fused, unfused)


needs_vnni = pytest.mark.skipif(
    not cpu_kernels.gemm_i8_available(), reason="the int8 GEMM kernel needs AVX-512 VNNI"
)


@needs_cc
@needs_vnni
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 16, 4), (17, 37, 36), (9, 440, 144), (64, 144, 384)])
def test_gemm_i8_gives_int_mm_and_epilogue_bits(rows: int, n: int, k: int) -> None:
    """The fused int8 GEMM: exactly torch's int8 product followed by the epilogue kernel, for
    column counts off the 16/32 panels and row counts off the 8-row blocks."""
    from tessera_model.int8 import quantise_rows, quantise_weight

    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen) * 2
    qw = quantise_weight(torch.randn(n, k, generator=gen), torch.randn(n, generator=gen))
    qw_nb = quantise_weight(torch.randn(n, k, generator=gen), None)
    q, sx = quantise_rows(x)
    res = torch.randn(rows, n, generator=gen)
    for w in (qw, qw_nb):
        acc = (q.long() @ w.wq_t.long()).to(torch.int32)  # exact
        for residual, relu in ((None, False), (res, True), (res, False)):
            want = cpu_kernels.dequantise(acc, w.scale, sx, w.bias, residual, relu,
                                          torch.empty(rows, n))  # fmt: skip
            got = cpu_kernels.gemm_i8(q, w.vnni, w.comp, w.scale, sx, w.bias, residual, relu,
                                      torch.empty(rows, n))  # fmt: skip
            assert torch.equal(got, want)
            qo = (torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, 1))
            assert cpu_kernels.gemm_i8(q, w.vnni, w.comp, w.scale, sx, w.bias, residual, relu,
                                       None, qo) is None  # fmt: skip
            want_q = quantise_rows(want)
            assert torch.equal(qo[0], want_q[0]) and torch.equal(qo[1], want_q[1])


@needs_cc
@needs_vnni
def test_gemm_i8_thread_split_and_fallback_keep_the_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera_model import int8
    from tessera_model.int8 import int8_linear, quantise_weight

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(700, 64, generator=gen)
    lin = nn.Linear(64, 48)
    qw = quantise_weight(lin.weight, lin.bias)
    with torch.inference_mode():
        one = int8_linear(x, qw, relu=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            two = int8_linear(x, qw, relu=True)
        finally:
            torch.set_num_threads(threads)
        monkeypatch.setattr(int8, "USE_GEMM_I8", False)  # torch._int_mm, then the epilogue
        unfused = int8_linear(x, qw, relu=True)
    assert torch.equal(one, two) and torch.equal(one, unfused)


@needs_cc
def test_gemm_i8_rejects_bad_inputs() -> None:
    from tessera_model.int8 import pack_vnni, quantise_weight

    with pytest.raises(ValueError, match="multiple of 4"):
        pack_vnni(torch.zeros(8, 10, dtype=torch.int8))
    qw = quantise_weight(torch.randn(8, 10), None)  # K = 10: no packed form, torch._int_mm
    assert qw.vnni is None and qw.comp is None
    if not cpu_kernels.gemm_i8_available():
        return
    qw = quantise_weight(torch.randn(8, 12), None)
    q, s = torch.zeros(3, 12, dtype=torch.int8), torch.ones(3, 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        cpu_kernels.gemm_i8(torch.zeros(3, 10, dtype=torch.int8), qw.vnni, qw.comp, qw.scale, s,
                            None, None, False, torch.empty(3, 8))  # fmt: skip
    with pytest.raises(ValueError, match="out"):
        cpu_kernels.gemm_i8(q, qw.vnni, qw.comp, qw.scale, s, None, None, False, None)
    with pytest.raises(ValueError, match="packed"):
        cpu_kernels.gemm_i8(q, qw.vnni[:-1], qw.comp, qw.scale, s, None, None, False,
                            torch.empty(3, 8))  # fmt: skip


@needs_cc
@pytest.mark.parametrize(("t", "dh"), [(5, 36), (40, 16)])
def test_attention_int8_rows_are_quantise_rows_of_its_output(t: int, dh: int) -> None:
    from tessera_model.int8 import quantise_rows

    gen = torch.Generator().manual_seed(t)
    n, heads = 3, 4
    qkv = torch.randn(n * t, 3 * heads * dh, generator=gen)
    q = (torch.empty(n * t, heads * dh, dtype=torch.int8), torch.empty(n * t, 1))
    out = cpu_kernels.attention(qkv, n, t, heads, dh, None, q)
    assert torch.equal(out, cpu_kernels.attention(qkv, n, t, heads, dh))
    want = quantise_rows(out)
    assert torch.equal(q[0], want[0]) and torch.equal(q[1], want[1])


@needs_cc
@needs_vnni
@pytest.mark.parametrize("affine", [True, False])
def test_gemm_i8_layer_norm_epilogue_is_the_layer_norm_kernel(affine: bool) -> None:
    """The post-LN LayerNorm in the int8 GEMM's epilogue: the bits of the product, then the
    LayerNorm kernel, then quantise_rows; the same through int8_linear without the kernel."""
    from tessera_model import int8
    from tessera_model.int8 import int8_linear, quantise_rows, quantise_weight

    gen = torch.Generator().manual_seed(7)
    rows, n, k = 21, 144, 64
    x, res = torch.randn(rows, k, generator=gen), torch.randn(rows, n, generator=gen)
    qw = quantise_weight(torch.randn(n, k, generator=gen), torch.randn(n, generator=gen))
    w, b = (torch.randn(n, generator=gen), torch.randn(n, generator=gen)) if affine else (None, None)
    q, sx = quantise_rows(x)
    plain = cpu_kernels.gemm_i8(q, qw.vnni, qw.comp, qw.scale, sx, qw.bias, res, False,
                                torch.empty(rows, n))  # fmt: skip
    want = cpu_kernels.layer_norm(plain, w, b, 1e-5)
    want_q = quantise_rows(want)
    qo = (torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, 1))
    got = cpu_kernels.gemm_i8(q, qw.vnni, qw.comp, qw.scale, sx, qw.bias, res, False,
                              torch.empty(rows, n), qo, (w, b, 1e-5))  # fmt: skip
    assert torch.equal(got, want)
    assert torch.equal(qo[0], want_q[0]) and torch.equal(qo[1], want_q[1])
    try:
        int8.USE_GEMM_I8 = False
        qo2 = (torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, 1))
        got2 = int8_linear(x, qw, residual=res, q_out=qo2, norm=(w, b, 1e-5))
    finally:
        int8.USE_GEMM_I8 = True
    assert torch.equal(got2, want) and torch.equal(qo2[0], want_q[0])
    with pytest.raises(ValueError, match="norm"):
        cpu_kernels.gemm_i8(q, qw.vnni, qw.comp, qw.scale, sx, None, None, False, None, qo,
                            (w, b, 1e-5))  # fmt: skip


@needs_cc
def test_kernel_pool_serves_concurrent_callers_with_the_same_bits() -> None:
    """The kernels' C thread pool: many short calls in a row, and two Python threads calling at
    once (one gets the pool, the other runs its call in its own thread), give the bits of one
    thread."""
    import threading

    gen = torch.Generator().manual_seed(2)
    n, t, heads, dh = 40, 24, 4, 16
    qkv = torch.randn(n * t, 3 * heads * dh, generator=gen)
    x = torch.randn(2 * cpu_kernels.MIN_ROWS_PER_THREAD + 3, 64, generator=gen)  # split in 2
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    want_a = cpu_kernels.attention(qkv, n, t, heads, dh)
    want_ln = cpu_kernels.layer_norm(x, w, b, 1e-5)
    torch.set_num_threads(2)
    try:
        for _ in range(200):  # back-to-back hand-offs
            assert torch.equal(cpu_kernels.attention(qkv, n, t, heads, dh), want_a)
        errors: list[BaseException] = []

        def caller() -> None:
            try:
                torch.set_num_threads(2)
                for _ in range(100):
                    assert torch.equal(cpu_kernels.attention(qkv, n, t, heads, dh), want_a)
                    assert torch.equal(cpu_kernels.layer_norm(x, w, b, 1e-5), want_ln)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a kernel call never returned"
        assert not errors, errors
    finally:
        torch.set_num_threads(before)


def _child_attention(queue) -> None:
    """In a forked child (the parent's pool workers are gone): the kernel over two parts.
    torch's own threads stay at one (libgomp cannot run a parallel region in a child forked
    after one ran in the parent; that is torch's rule, not the kernels')."""
    import hashlib

    torch.set_num_threads(1)
    qkv = torch.randn(40 * 24, 3 * 64, generator=torch.Generator().manual_seed(2))
    out = cpu_kernels._attention(cpu_kernels._library(), qkv, 40, 24, 4, 16,
                                 torch.empty(40 * 24, 64), 2)  # fmt: skip
    queue.put(hashlib.sha256(out.numpy().tobytes()).hexdigest())


@needs_cc
def test_kernel_pool_works_in_a_forked_child() -> None:
    import hashlib
    import multiprocessing

    qkv = torch.randn(40 * 24, 3 * 64, generator=torch.Generator().manual_seed(2))
    out = cpu_kernels._attention(cpu_kernels._library(), qkv, 40, 24, 4, 16,
                                 torch.empty(40 * 24, 64), 2)  # the pool has a worker now
    want = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_attention, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) == want


@needs_cc
def test_kernel_pool_with_polling_workers_keeps_the_bits(tmp_path) -> None:
    """``TESSERA_KERNEL_SPIN_US`` (read once per process): polling workers, the same bits."""
    import subprocess
    import sys

    code = (
        "import torch, hashlib\n"
        "from tessera_model import cpu_kernels\n"
        "qkv = torch.randn(40 * 24, 192, generator=torch.Generator().manual_seed(2))\n"
        "outs = set()\n"
        "for threads in (1, 2, 2, 2):\n"
        "    torch.set_num_threads(threads)\n"
        "    for _ in range(50):\n"
        "        a = cpu_kernels.attention(qkv, 40, 24, 4, 16)\n"
        "    outs.add(hashlib.sha256(a.numpy().tobytes()).hexdigest())\n"
        "assert cpu_kernels.available() and len(outs) == 1, outs\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TESSERA_KERNEL_SPIN_US": "200"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
