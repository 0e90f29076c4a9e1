"""Compiled CPU kernels of inference, built on first use with the machine's C compiler.

Kernels (``kernels/*.c``): the fused self-attention of an encoder layer (:func:`attention`),
LayerNorm (:func:`layer_norm`), and the int8-dynamic path's row quantisation and GEMM epilogue
(:func:`quantise_rows`, :func:`dequantise`: the values of their torch forms in
:mod:`tessera_model.int8`, in one pass instead of six to eight) and, with AVX-512 VNNI, its
GEMM with the epilogue fused (:func:`gemm_i8`: the bits of ``torch._int_mm`` then
:func:`dequantise`) and its GRU pooling (:func:`gru_pool_i8`: input maps, int8 recurrence and
pooling of a block of pixels in one pass). The attention, LayerNorm and epilogues can also write their output rows'
int8 form (``q_out``), made while the rows are in cache: the next int8 layer's input.

torch's CPU attention for TESSERA's short sequences (T = 8-256 tokens) and narrow heads (16-192
wide) runs two batched matrix products through MKL (AVX2 kernels on AMD processors, 30-65
GFLOP/s on the dev box at one thread) around a softmax that reads and writes the whole score
tensor twice, plus two head-major copies; the kernel keeps one (pixel, head) in the first-level
cache and reaches 108-184 GFLOP/s there (``BENCHMARKS.md``, "Final figures"). torch's LayerNorm
runs its AVX2 code on this CPU, about a third of the kernel's speed on rows of 64.

Build: ``$CC`` (default ``cc``) ``-O3 -march=native -shared -fPIC``, once per sources, compiler
and CPU, into ``$TESSERA_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/tessera-factory/kernels``,
else ``~/.cache/tessera-factory/kernels``); about a second. The library is checked against
torch on a small input before first use. Without a compiler, on a failed build or check, or with
``TESSERA_CPU_KERNELS=0``, :func:`available` is False and callers use the torch path (the same
values to float32 rounding, about 1e-6; a different binary gives different low bits, as any
change of BLAS kernel does).

Each call's pixels (rows) are split over ``torch.get_num_threads()`` threads of the kernels'
own C thread pool (``kernels/pool.c``: the range cut into chunks that the caller and the
workers claim, so the caller never waits for a worker that got no core; idle workers sleep,
or with ``TESSERA_KERNEL_SPIN_US`` first poll that long; a hand-off costs microseconds against
45-70 us for Python's ``ThreadPoolExecutor``). ctypes releases the GIL. Each pixel's (row's)
result depends only on its own rows, so the split never changes a bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = (
    "attention.c", "layernorm.c", "quant.c", "gemm_i8.c", "gru_i8.c", "pool.c", "parallel.c"
)  # fmt: skip
HEADERS = ("vec.h", "pool.h")
SOURCE_FLAGS = {"quant.c": ("-ffp-contract=off",), "gemm_i8.c": ("-ffp-contract=off",)}
"""Per-source flags: the int8 kernels round every product as torch does (``quant.c``)."""
CFLAGS = (
    "-O3", "-march=native", "-std=gnu11", "-fno-math-errno", "-shared", "-fPIC", "-pthread"
)  # fmt: skip
ENV_SWITCH = "TESSERA_CPU_KERNELS"
ENV_CACHE = "TESSERA_KERNEL_CACHE"
MIN_PIXELS_PER_THREAD = 4
"""Least pixels per thread when :func:`attention` splits a call (below, one thread)."""
MIN_GEMM_ROWS_PER_THREAD = 32
"""Least rows per thread when :func:`gemm_i8` splits a call (its work per row is a GEMM row)."""
MIN_GRU_ROWS_PER_THREAD = 8
"""Least pixels per thread when :func:`gru_pool_i8` splits a call (a pixel is T GRU steps)."""
MIN_ROWS_PER_THREAD = 256
"""Least rows per thread when :func:`layer_norm` and the int8 kernels split a call (below, one
thread): a hand-off to the kernels' pool costs about 2 us (``kernels/pool.c``), and a (1792,
144) LayerNorm took 21 us at two threads against 35 with a 4,096-row least (the least of the
Python thread pool before, whose hand-offs cost 45-70 us)."""
MAX_SCRATCH_ROW = 16384
"""Widest row :func:`dequantise` takes without a float result (its stack scratch; quant.c)."""
CHECK_TOLERANCE = 1e-5
"""Largest error of the load-time self-check, relative to the output's magnitude (at least 1)."""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where built kernels are kept (module docstring)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tessera-factory" / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` depends on them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> list[str]:
    return (os.environ.get("CC") or "cc").split()


def _compile(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1])} failed: {res.stderr.strip()[-2000:]}")


def _build() -> Path:
    """Compile the sources for this machine (or find them built); return the library path."""
    cc = _compiler()
    version = subprocess.run(
        [*cc, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    texts = [(KERNEL_DIR / name).read_text() for name in (*SOURCES, *HEADERS)]
    parts = (*texts, version, " ".join(CFLAGS), repr(SOURCE_FLAGS), _cpu_signature())
    key = hashlib.sha256(b"\0".join(s.encode() for s in parts)).hexdigest()[:20]
    out = cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as work:
            objects = []
            for name in SOURCES:
                obj = str(Path(work) / f"{name}.o")
                _compile([*cc, *CFLAGS, *SOURCE_FLAGS.get(name, ()), "-c", "-o", obj,
                          str(KERNEL_DIR / name)])  # fmt: skip
                objects.append(obj)
            _compile([*cc, *CFLAGS, "-o", tmp, *objects, "-lm", "-lpthread"])
        os.replace(tmp, out)  # atomic: concurrent builders each publish a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.tessera_attention.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 2
    )
    lib.tessera_attention.restype = ctypes.c_int
    lib.tessera_attention_scratch.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.tessera_attention_scratch.restype = ctypes.c_int64
    lib.tessera_layer_norm.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 2
    )
    lib.tessera_layer_norm.restype = ctypes.c_int
    lib.tessera_quantise_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.tessera_quantise_rows.restype = ctypes.c_int
    lib.tessera_dequantise.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    )
    lib.tessera_dequantise.restype = ctypes.c_int
    lib.tessera_gemm_i8.argtypes = (
        [ctypes.c_void_p] * 7 + [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
        + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_float]
    )  # fmt: skip
    lib.tessera_gemm_i8.restype = ctypes.c_int
    lib.tessera_gemm_i8_supported.argtypes = []
    lib.tessera_gemm_i8_supported.restype = ctypes.c_int
    lib.tessera_gru_pool_i8_supported.argtypes = []
    lib.tessera_gru_pool_i8_supported.restype = ctypes.c_int
    ptr, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    parallel = {  # the parallel forms (parallel.c), the thread count last
        "tessera_attention_mt": [ptr, ptr, i64, i64, i64, i64, f32, ptr, ptr, cint],
        "tessera_layer_norm_mt": [ptr] * 4 + [i64, i64, f32, ptr, ptr, cint],
        "tessera_quantise_rows_mt": [ptr] * 3 + [i64, i64, cint],
        "tessera_dequantise_mt": [ptr] * 6 + [cint, i64, i64, ptr, ptr, cint],
        "tessera_gemm_i8_mt": [ptr] * 7 + [cint] + [ptr] * 3 + [i64] * 3 + [cint, ptr, ptr, f32]
        + [cint],
        "tessera_gru_pool_i8_mt": [ptr] * 4 + [i64] * 4 + [ptr] * 11 + [f32, f32, cint],
    }  # fmt: skip
    for name, args in parallel.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            _tried = True
            return None
        try:
            lib = _load(_build())
            _check(lib)
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means: use the torch path
            log.warning("CPU kernels unavailable, using torch's ops: %s", exc)
            _lib = None
        _tried = True
    return _lib


def available() -> bool:
    """True when the compiled kernels are built, loaded and checked (module docstring)."""
    return _library() is not None


def reference_attention(qkv: Tensor, n: int, t: int, heads: int, dh: int) -> Tensor:
    """The kernel's math in torch (float64 inside): ``(n t, 3 d)`` QKV rows -> ``(n t, d)``."""
    q, k, v = qkv.double().view(n, t, 3, heads, dh).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) * dh**-0.5, dim=-1) @ v
    return a.transpose(1, 2).reshape(n * t, heads * dh).to(qkv.dtype)


def _check(lib: ctypes.CDLL) -> None:
    """Compare the built kernels with torch on awkward shapes."""
    gen = torch.Generator().manual_seed(0)
    for n, t, heads, dh in ((3, 9, 2, 5), (2, 40, 4, 16), (1, 33, 3, 36), (2, 1, 2, 8)):
        qkv = torch.randn(n * t, 3 * heads * dh, generator=gen) * 3
        got = _attention(lib, qkv, n, t, heads, dh, torch.empty(n * t, heads * dh), 1)
        want = reference_attention(qkv, n, t, heads, dh)
        err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
        if not err <= CHECK_TOLERANCE:
            raise RuntimeError(f"attention self-check failed (t={t}, dh={dh}): error {err:.2e}")
    for rows, d in ((5, 7), (3, 64), (4, 144), (2, 1)):
        x = torch.randn(rows, d, generator=gen) * 2 + 1
        w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
        want = torch.nn.functional.layer_norm(x.double(), (d,), w.double(), b.double(), 1e-5)
        for wb in ((w, b), (None, None)):
            got = _layer_norm(lib, x, *wb, 1e-5, torch.empty_like(x), 1)
            q, s = torch.empty(rows, d, dtype=torch.int8), torch.empty(rows, 1)
            got_q = _layer_norm(lib, x, *wb, 1e-5, torch.empty_like(x), 1, (q, s))
            if not (torch.equal(got_q, got) and _same_quantisation(lib, got, q, s)):
                raise RuntimeError(f"layer_norm self-check failed (d={d}): fused int8 rows")
            ref = want if wb[0] is not None else torch.nn.functional.layer_norm(
                x.double(), (d,), eps=1e-5)  # fmt: skip
            err = float((got - ref).abs().max())
            if not err <= CHECK_TOLERANCE:
                raise RuntimeError(f"layer_norm self-check failed (d={d}): error {err:.2e}")
    _check_quant(lib, gen)


def _check_quant(lib: ctypes.CDLL, gen: torch.Generator) -> None:
    """The int8 kernels give exactly the torch forms' values (module docstring)."""
    x = torch.randn(6, 37, generator=gen) * 5
    x[2] = 0.0
    q, s = torch.empty(6, 37, dtype=torch.int8), torch.empty(6, 1)
    _quantise_rows(lib, x, q, s, 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    s_ref = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q_ref = torch.mul(x, s_ref.reciprocal()).round_().to(torch.int8)
    if not (torch.equal(q, q_ref) and torch.equal(s, s_ref)):
        raise RuntimeError("quantise_rows self-check failed: values differ from torch's")
    acc = torch.randint(-(2**20), 2**20, (6, 21), dtype=torch.int32, generator=gen)
    sw, b, res = torch.rand(21, generator=gen), torch.randn(21, generator=gen), torch.randn(6, 21)
    y = torch.empty(6, 21)
    _dequantise(lib, acc, sw, s, b, res, True, y, 1)
    y_ref = torch.addcmul(b, acc * sw, s).add_(res).relu_()
    if not torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6):
        raise RuntimeError("dequantise self-check failed: values differ from torch's")
    q2, s2 = torch.empty(6, 21, dtype=torch.int8), torch.empty(6, 1)
    _dequantise(lib, acc, sw, s, b, res, True, None, 1, (q2, s2))
    if not _same_quantisation(lib, y, q2, s2):
        raise RuntimeError("dequantise self-check failed: fused int8 rows")
    if lib.tessera_gemm_i8_supported():
        _check_gemm_i8(lib, gen)
    if lib.tessera_gru_pool_i8_supported():
        _check_gru_pool_i8(lib, gen)


def _check_gemm_i8(lib: ctypes.CDLL, gen: torch.Generator) -> None:
    """The fused int8 GEMM gives exactly ``torch._int_mm`` then the epilogue kernel's values."""
    from tessera_model.int8 import pack_vnni  # the weight layout is the model's

    for rows, n, k, relu in ((11, 37, 20, True), (9, 64, 36, False), (3, 24, 144, True)):
        q = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        sx, sw = torch.rand(rows, 1, generator=gen), torch.rand(n, generator=gen)
        b, res = torch.randn(n, generator=gen), torch.randn(rows, n, generator=gen)
        packed, comp = pack_vnni(w)
        want = torch.empty(rows, n)
        acc = (q.long() @ w.long().t()).to(torch.int32)  # exact
        _dequantise(lib, acc, sw, sx, b, res, relu, want, 1)
        got = torch.empty(rows, n)
        qo, so = torch.empty(rows, n, dtype=torch.int8), torch.empty(rows, 1)
        _gemm_i8(lib, q, packed, comp, sw, sx, b, res, relu, got, (qo, so), 1)
        if not (torch.equal(got, want) and _same_quantisation(lib, want, qo, so)):
            raise RuntimeError(f"gemm_i8 self-check failed (n={n}, k={k})")


def _check_gru_pool_i8(lib: ctypes.CDLL, gen: torch.Generator) -> None:
    """The int8 GRU pooling against the same math in float64 (a wrong build gives garbage; a
    rounding flip of one int8 value moves the result by less than the tolerance; measured 1e-6)."""
    from tessera_model.int8 import pack_vnni

    b, t, hd = 3, 6, 16
    xq = torch.randint(-127, 128, (b * t, hd), dtype=torch.int8, generator=gen)
    xs = torch.rand(b * t, 1, generator=gen) * 0.02
    x = torch.randn(b, t, hd, generator=gen)
    w = {n: torch.randint(-127, 128, (n, hd), dtype=torch.int8, generator=gen)
         for n in (3 * hd, 2 * hd, hd)}  # fmt: skip
    sw = {n: torch.rand(n, generator=gen) * 0.02 for n in w}
    bias, a = torch.randn(3 * hd, generator=gen), torch.randn(hd, generator=gen)
    packed = {n: pack_vnni(w[n]) for n in w}
    out = torch.empty(b, hd)
    ptrs = [p.data_ptr() for n, extra in ((3 * hd, (bias,)), (2 * hd, ()), (hd, ()))
            for p in (*packed[n], sw[n], *extra)]  # fmt: skip
    rc = lib.tessera_gru_pool_i8_mt(xq.data_ptr(), xs.data_ptr(), x.data_ptr(), out.data_ptr(),
                                    b, t, hd, hd, *ptrs, a.data_ptr(), 0.25, 1e-5, 1)  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"gru_pool_i8 self-check failed (code {rc})")

    def mm(q: Tensor, n: int) -> Tensor:  # exact integer product, then the channel scales
        return (q.double() @ w[n].double().t()) * sw[n].double()

    def rows(v: Tensor) -> tuple[Tensor, Tensor]:  # quantise_rows, in float64
        s = v.abs().amax(1, keepdim=True).float().double() / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        return torch.round(v / s), s

    gi = (mm(xq, 3 * hd) * xs.double() + bias.double()).view(b, t, 3 * hd)
    h = torch.zeros(b, hd, dtype=torch.float64)
    scores = torch.empty(b, t, dtype=torch.float64)
    for step in range(t):
        g = gi[:, step]
        q, s = rows(h)
        rz = torch.sigmoid(mm(q, 2 * hd) * s + g[:, : 2 * hd])
        q, s = rows(rz[:, :hd] * h)
        h = h + rz[:, hd:] * (torch.tanh(mm(q, hd) * s + g[:, 2 * hd :]) - h)
        cen = h - h.mean(1, keepdim=True)
        scores[:, step] = cen @ a.double() / torch.sqrt((cen * cen).mean(1) + 1e-5) + 0.25
    want = torch.bmm(torch.softmax(scores, 1).unsqueeze(1), x.double()).squeeze(1)
    err = float((out.double() - want).abs().max())
    if not err <= 1e-3 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"gru_pool_i8 self-check failed: error {err:.2e}")


def _same_quantisation(lib: ctypes.CDLL, y: Tensor, q: Tensor, s: Tensor) -> bool:
    """Whether ``(q, s)`` is exactly :func:`quantise_rows` of ``y``."""
    q_ref, s_ref = torch.empty_like(q), torch.empty_like(s)
    _quantise_rows(lib, y, q_ref, s_ref, 1)
    return torch.equal(q, q_ref) and torch.equal(s, s_ref)


def _parts(n: int, threads: int, least: int) -> int:
    """Threads for a call over ``n`` pixels or rows: at most ``threads``, at least ``least``
    each (one below that)."""
    return max(1, min(threads, n // least))


def _q_ptrs(q_out: tuple[Tensor, Tensor] | None) -> tuple[int, int]:
    return (0, 0) if q_out is None else (q_out[0].data_ptr(), q_out[1].data_ptr())


def _attention(lib: ctypes.CDLL, qkv: Tensor, n: int, t: int, heads: int, dh: int,
               out: Tensor, threads: int,
               q_out: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    rc = lib.tessera_attention_mt(qkv.data_ptr(), out.data_ptr(), n, t, heads, dh, dh**-0.5,
                                  *_q_ptrs(q_out), _parts(n, threads, MIN_PIXELS_PER_THREAD))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"tessera_attention rejected t={t}, dh={dh}")
    return out


def _layer_norm(lib: ctypes.CDLL, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float, out: Tensor, threads: int,
                q_out: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    rows, d = x.shape
    rc = lib.tessera_layer_norm_mt(x.data_ptr(), out.data_ptr(), _ptr(weight), _ptr(bias), rows,
                                   d, eps, *_q_ptrs(q_out),
                                   _parts(rows, threads, MIN_ROWS_PER_THREAD))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"tessera_layer_norm rejected d={d}")
    return out


def _library_or_raise() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available (see available())")
    return lib


def _check_f32(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape:
        raise ValueError(
            f"Expected {name} float32 contiguous of shape {shape}. Got {t.dtype} "
            f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'}."
        )


def attention(
    qkv: Tensor, n: int, t: int, heads: int, dh: int, out: Tensor | None = None,
    q_out: tuple[Tensor, Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """Multi-head self-attention of ``n`` pixels from their packed QKV projections.

    Args:
        qkv: ``(n t, 3 d)`` float32, contiguous, rows ``[q | k | v]`` with heads of ``dh``
            inside each part (the in-projection's output; ``d = heads dh``).
        n, t, heads, dh: pixels, tokens per pixel, heads, head width.
        out: optional ``(n t, d)`` float32 contiguous buffer.
        q_out: optional ``(q, scale)`` buffers (``(n t, d)`` int8, ``(n t, 1)`` float32) that
            also receive the output's :func:`quantise_rows` (made per pixel while in cache).

    Returns:
        ``(n t, d)``: the heads' outputs side by side per token (the out-projection's input),
        ``softmax(q k^T / sqrt(dh)) v`` per pixel and head.

    Raises:
        RuntimeError: when the kernels are not :func:`available`.
    """
    lib = _library_or_raise()
    d = heads * dh
    _check_f32("qkv", qkv, (n * t, 3 * d))
    out = torch.empty(n * t, d, dtype=torch.float32) if out is None else out
    _check_f32("out", out, (n * t, d))
    _check_q_out(q_out, (n * t, d))
    return _attention(lib, qkv, n, t, heads, dh, out, torch.get_num_threads(), q_out)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
               out: Tensor | None = None,
               q_out: tuple[Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """``F.layer_norm(x, (d,), weight, bias, eps)`` of ``(rows, d)`` float32 rows.

    ``out`` may be ``x`` itself (in place). ``q_out``: optional ``(q, scale)`` buffers
    (``(rows, d)`` int8, ``(rows, 1)`` float32) that also receive the output's
    :func:`quantise_rows` (the same values; made while each row is in cache). Raises
    ``RuntimeError`` when the kernels are not :func:`available`.
    """
    lib = _library_or_raise()
    _check_f32("x", x, tuple(x.shape))
    if x.ndim != 2:
        raise ValueError(f"Expected x of shape (rows, d). Got {tuple(x.shape)}.")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_f32(name, p, (x.shape[1],))
    out = torch.empty_like(x) if out is None else out
    _check_f32("out", out, tuple(x.shape))
    _check_q_out(q_out, tuple(x.shape))
    return _layer_norm(lib, x, weight, bias, eps, out, torch.get_num_threads(), q_out)


def _check_q_out(q_out: tuple[Tensor, Tensor] | None, shape: tuple[int, ...]) -> None:
    if q_out is None:
        return
    q, scale = q_out
    if q.dtype != torch.int8 or not q.is_contiguous() or tuple(q.shape) != shape:
        raise ValueError(f"Expected q int8 contiguous of shape {shape}. Got {q.dtype} "
                         f"{tuple(q.shape)}.")  # fmt: skip
    _check_f32("scale", scale, (shape[0], 1))


def _quantise_rows(lib: ctypes.CDLL, x: Tensor, q: Tensor, scale: Tensor, threads: int) -> None:
    rows, k = x.shape
    rc = lib.tessera_quantise_rows_mt(x.data_ptr(), q.data_ptr(), scale.data_ptr(), rows, k,
                                      _parts(rows, threads, MIN_ROWS_PER_THREAD))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"tessera_quantise_rows rejected k={k}")


def _dequantise(lib: ctypes.CDLL, acc: Tensor, w_scale: Tensor, x_scale: Tensor,
                bias: Tensor | None, residual: Tensor | None, relu: bool, out: Tensor | None,
                threads: int, q_out: tuple[Tensor, Tensor] | None = None) -> None:  # fmt: skip
    rows, n = acc.shape
    rc = lib.tessera_dequantise_mt(acc.data_ptr(), _ptr(out), w_scale.data_ptr(),
                                   x_scale.data_ptr(), _ptr(bias), _ptr(residual), int(relu),
                                   rows, n, *_q_ptrs(q_out),
                                   _parts(rows, threads, MIN_ROWS_PER_THREAD))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"tessera_dequantise rejected n={n}")


Norm = tuple[Tensor | None, Tensor | None, float]
"""A LayerNorm's ``(weight, bias, eps)`` (weight and bias ``None`` without affine)."""


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def gemm_i8_available() -> bool:
    """True when :func:`gemm_i8` runs here (the kernels are :func:`available` and the CPU and
    compiler have AVX-512 VNNI)."""
    lib = _library()
    return lib is not None and bool(lib.tessera_gemm_i8_supported())


def _gemm_i8(lib: ctypes.CDLL, q: Tensor, packed: Tensor, comp: Tensor, w_scale: Tensor,
             x_scale: Tensor, bias: Tensor | None, residual: Tensor | None, relu: bool,
             out: Tensor | None, q_out: tuple[Tensor, Tensor] | None,
             threads: int, norm: Norm | None = None) -> None:  # fmt: skip
    rows, k = q.shape
    n = w_scale.shape[0]
    ln = (0, 0, 0, 0.0) if norm is None else (1, _ptr(norm[0]), _ptr(norm[1]), norm[2])
    rc = lib.tessera_gemm_i8_mt(q.data_ptr(), packed.data_ptr(), comp.data_ptr(),
                                w_scale.data_ptr(), x_scale.data_ptr(), _ptr(bias),
                                _ptr(residual), int(relu), _ptr(out), *_q_ptrs(q_out), rows, n,
                                k, *ln, _parts(rows, threads, MIN_GEMM_ROWS_PER_THREAD))  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"tessera_gemm_i8 rejected n={n}, k={k} (code {rc})")


def gemm_i8(q: Tensor, packed: Tensor, comp: Tensor, w_scale: Tensor, x_scale: Tensor,
            bias: Tensor | None, residual: Tensor | None, relu: bool, out: Tensor | None,
            q_out: tuple[Tensor, Tensor] | None = None,
            norm: Norm | None = None) -> Tensor | None:  # fmt: skip
    """The int8 GEMM with its epilogue fused: :func:`dequantise` of ``torch._int_mm(q, W^T)``
    (the same bits), without the int32 product in memory.

    Args:
        q: (rows, k) int8 activations, ``k`` a multiple of 4.
        packed, comp: the weight as :func:`tessera_model.int8.pack_vnni` packs it.
        w_scale: (n,) float32; x_scale: (rows, 1) float32; bias: (n,) or ``None``;
        residual: (rows, n) float32 or ``None``; relu: ReLU last.
        out: (rows, n) float32, or ``None`` with ``q_out`` (only the int8 rows are kept).
        q_out: optional ``(q, scale)`` buffers for the result's :func:`quantise_rows`.
        norm: optional ``(weight, bias, eps)``: the result then goes through :func:`layer_norm`
            (the same kernel, in place in ``out``, which it needs), and ``q_out`` receives the
            normalised rows' int8 form.

    Raises:
        RuntimeError: when :func:`gemm_i8_available` is False.
    """
    lib = _library_or_raise()
    if not lib.tessera_gemm_i8_supported():
        raise RuntimeError("the int8 GEMM kernel needs AVX-512 VNNI (see gemm_i8_available())")
    rows, k = q.shape
    n = w_scale.shape[0]
    if q.dtype != torch.int8 or not q.is_contiguous() or k % 4:
        raise ValueError(f"Expected q int8 contiguous with k a multiple of 4. Got {q.dtype} "
                         f"{tuple(q.shape)}.")  # fmt: skip
    npad = -(-n // 16) * 16
    if packed.dtype != torch.int8 or packed.numel() != npad * k or not packed.is_contiguous():
        raise ValueError(f"Expected packed int8 of {npad * k} values (pack_vnni).")
    if comp.dtype != torch.int32 or tuple(comp.shape) != (n,) or not comp.is_contiguous():
        raise ValueError(f"Expected comp int32 of shape ({n},).")
    _check_f32("w_scale", w_scale, (n,))
    _check_f32("x_scale", x_scale, (rows, 1))
    if bias is not None:
        _check_f32("bias", bias, (n,))
    if residual is not None:
        _check_f32("residual", residual, (rows, n))
    if out is None and (q_out is None or n > MAX_SCRATCH_ROW):
        raise ValueError(f"Expected out (or q_out with n <= {MAX_SCRATCH_ROW}).")
    if out is not None:
        _check_f32("out", out, (rows, n))
    _check_q_out(q_out, (rows, n))
    if norm is not None:
        if out is None:
            raise ValueError("Expected out with norm (the LayerNorm runs in place there).")
        for name, p in (("norm weight", norm[0]), ("norm bias", norm[1])):
            if p is not None:
                _check_f32(name, p, (n,))
    _gemm_i8(lib, q, packed, comp, w_scale, x_scale, bias, residual, relu, out, q_out,
             torch.get_num_threads(), norm)  # fmt: skip
    return out


def quantise_rows(x: Tensor, q: Tensor, scale: Tensor) -> None:
    """Per-row symmetric int8 of ``(rows, k)`` float32 ``x`` into ``q`` (int8, same shape) and
    ``scale`` (``(rows, 1)`` float32): :func:`tessera_model.int8.quantise_rows`'s values."""
    lib = _library_or_raise()
    _check_f32("x", x, tuple(x.shape))
    _check_q_out((q, scale), tuple(x.shape))
    _quantise_rows(lib, x, q, scale, torch.get_num_threads())


def dequantise(acc: Tensor, w_scale: Tensor, x_scale: Tensor, bias: Tensor | None,
               residual: Tensor | None, relu: bool, out: Tensor | None,
               q_out: tuple[Tensor, Tensor] | None = None) -> Tensor | None:  # fmt: skip
    """``relu((acc * w_scale) * x_scale + bias + residual)`` of an int8 GEMM's ``(rows, n)`` int32
    product into ``out`` (float32), as :func:`tessera_model.int8.int8_linear` computes it.

    ``q_out``: optional ``(q, scale)`` buffers (``(rows, n)`` int8, ``(rows, 1)`` float32) that
    also receive the result's :func:`quantise_rows` (the next int8 layer's input, made while
    each row is in cache); with it ``out`` may be ``None`` (no float result is written, and
    ``None`` is returned).
    """
    lib = _library_or_raise()
    rows, n = acc.shape
    if acc.dtype != torch.int32 or not acc.is_contiguous():
        raise ValueError(f"Expected acc int32 contiguous. Got {acc.dtype}.")
    _check_f32("w_scale", w_scale, (n,))
    _check_f32("x_scale", x_scale, (rows, 1))
    if bias is not None:
        _check_f32("bias", bias, (n,))
    if residual is not None:
        _check_f32("residual", residual, (rows, n))
    if out is None and q_out is None:
        raise ValueError("Expected out or q_out (dequantise needs somewhere to write).")
    if out is None and n > MAX_SCRATCH_ROW:
        raise ValueError(f"Expected out for rows wider than {MAX_SCRATCH_ROW}. Got {n}.")
    if out is not None:
        _check_f32("out", out, (rows, n))
    _check_q_out(q_out, (rows, n))
    _dequantise(lib, acc, w_scale, x_scale, bias, residual, relu, out, torch.get_num_threads(),
                q_out)  # fmt: skip
    return out


def gru_pool_i8_available() -> bool:
    """True when :func:`gru_pool_i8` runs here (the kernels are :func:`available`, with AVX-512
    VNNI)."""
    lib = _library()
    return lib is not None and bool(lib.tessera_gru_pool_i8_supported())


def gru_pool_i8(xq: tuple[Tensor, Tensor], x: Tensor, w_in: tuple[Tensor, Tensor, Tensor, Tensor],
                w_rz: tuple[Tensor, Tensor, Tensor], w_hh: tuple[Tensor, Tensor, Tensor],
                query: Tensor, c: float, eps: float, out: Tensor) -> Tensor:  # fmt: skip
    """The GRU's int8 input maps and recurrence and the attention pooling after them
    (``kernels/gru_i8.c``; the math of :func:`tessera_model.pooling.gru_pool_int8_torch`, with
    the input maps' bits of :func:`tessera_model.int8.int8_linear`).

    Args:
        xq: ``(q, scale)``: (B T, D) int8 and (B T, 1) float32, the int8 rows of ``x``.
        x: (B, T, D) float32, the transformer outputs the pooling weights apply to.
        w_in: ``(packed, comp, scale, bias)`` of the int8 ``[W_ir; W_iz; W_ih]`` (3H, D).
        w_rz, w_hh: ``(packed, comp, scale)`` of the int8 ``[W_hr; W_hz]`` (2H, H) and
            ``W_hh`` (H, H) (:func:`tessera_model.int8.pack_vnni`, per-channel scales).
        query: (H,) float32, the pooling query's weight times the LayerNorm's weight.
        c: the query's bias plus its dot product with the LayerNorm's bias.
        eps: the LayerNorm's epsilon.
        out: (B, D) float32, receives the pooled rows.

    Raises:
        RuntimeError: when :func:`gru_pool_i8_available` is False.
        ValueError: bad shapes (H and D must be multiples of 16).
    """
    lib = _library_or_raise()
    if not lib.tessera_gru_pool_i8_supported():
        raise RuntimeError("the int8 GRU kernel needs AVX-512 VNNI (see gru_pool_i8_available())")
    b, t, d = x.shape
    hd = query.shape[0]
    if hd % 16 or d % 16 or hd < 16 or d < 16:
        raise ValueError(f"Expected H and D multiples of 16. Got H {hd}, D {d}.")
    _check_f32("x", x, (b, t, d))
    _check_f32("out", out, (b, d))
    _check_f32("query", query, (hd,))
    _check_q_out(xq, (b * t, d))
    for name, w, n, k in (("w_in", w_in, 3 * hd, d), ("w_rz", w_rz, 2 * hd, hd),
                          ("w_hh", w_hh, hd, hd)):  # fmt: skip
        packed, comp = w[0], w[1]
        if packed.dtype != torch.int8 or packed.numel() != n * k or not packed.is_contiguous():
            raise ValueError(f"Expected {name} packed int8 of {n * k} values (pack_vnni).")
        if comp.dtype != torch.int32 or tuple(comp.shape) != (n,) or not comp.is_contiguous():
            raise ValueError(f"Expected {name} comp int32 of shape ({n},).")
        for label, v in zip(("scale", "bias"), w[2:], strict=False):
            _check_f32(f"{name} {label}", v, (n,))
    rc = lib.tessera_gru_pool_i8_mt(
        xq[0].data_ptr(), xq[1].data_ptr(), x.data_ptr(), out.data_ptr(), b, t, hd, d,
        *(p.data_ptr() for p in (*w_in, *w_rz, *w_hh)), query.data_ptr(), c, eps,
        _parts(b, torch.get_num_threads(), MIN_GRU_ROWS_PER_THREAD),
    )
    if rc != 0:
        raise RuntimeError(f"tessera_gru_pool_i8 failed for x {tuple(x.shape)} (code {rc})")
    return out
