"""Benchmark: embedding throughput of the TESSERA model against the machine's matmul peak.

Measures, in one run on one device:

- dense fp32 matmul GFLOP/s (best over a few square and model-shaped sizes) as the peak;
- pixels/s of :func:`tessera_model.embed_pixels` (sampling + normalisation + model) and of
  ``model.encode`` alone, for the ``small`` and ``v1`` presets;
- the model's analytic FLOP per pixel and the achieved fraction of the matmul peak;
- with ``--memory``: peak device memory of ``embed_pixels`` against the batch size (CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: peak RSS above the RSS before the call, in a
  fresh subprocess per batch size, Linux only), beside the automatic batch size.

Usage::

    python benchmarks/bench_embedding.py [--device cpu|cuda|auto] [--presets small v1]
        [--batch 256|0] [--pixels 512] [--v1-pixels 128] [--threads N] [--compile]
        [--memory 256 1024 4096]

``--batch 0`` uses the automatic batch size. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tessera_model import ModelSpec, TesseraModel, embed_pixels  # noqa: E402
from tessera_model.infer import auto_batch_size  # noqa: E402
from tessera_model.inputs import resolve_device  # noqa: E402


def flops_per_pixel(spec: ModelSpec, steps: int | None = None) -> float:
    """Analytic forward FLOP per pixel (a multiply-add counts 2), both modalities + fusion.

    Per modality with T steps, width d, FFN f, C channels: band embedding
    ``2T(Cd + d^2)``; per layer QKV ``6Td^2``, scores and weighted values ``4T^2 d``, output
    projection ``2Td^2``, FFN ``4Tdf``; GRU ``6Td^2`` (input maps) + ``6(T-1)d^2`` (hidden
    maps); pooling ``~4Td``. Fusion ``2 * 2d * L``. Element-wise ops are ignored.
    """
    t = steps or spec.sample_steps
    d, f = spec.d_model, spec.ffn_dim

    def modality(c: int) -> float:
        emb = 2 * t * (c * d + d * d)
        layer = 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * f
        gru = 6 * t * d * d + 6 * (t - 1) * d * d
        return emb + spec.n_layers * layer + gru + 4 * t * d

    return modality(spec.s2_channels) + modality(spec.s1_channels) + 4 * d * spec.latent_dim


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dev: torch.device, reps: int = 5, clock: str = "wall") -> tuple[float, str]:
    """Best matmul GFLOP/s over a few sizes (square and the FFN shape of v1) and libraries.

    fp32 on CPU; bf16 on CUDA, the dtype the model runs in there (autocast). On CPU both of
    torch's fp32 GEMM libraries are timed, MKL (``torch.mm``) and oneDNN
    (``torch.ops.mkldnn._linear_pointwise``, what CPU inference uses): MKL runs its AVX2
    kernels on AMD processors, so on the AVX-512 dev box its best is about 45 % of oneDNN's and
    would understate the machine's peak. The label names the library and shape of the best.
    ``clock="cpu"`` times with the process CPU time (one thread on a shared CPU: the work, not
    the waits).
    """
    return max(matmul_peaks(dev, reps, clock).items(), key=lambda kv: kv[1][0])[1]


def matmul_peaks(
    dev: torch.device, reps: int = 5, clock: str = "wall"
) -> dict[str, tuple[float, str]]:
    """:func:`matmul_peak` per library: ``{"mkl"|"onednn"|"cuda": (GFLOP/s, label)}``."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (8192, 512, 4096)]
    if dev.type == "cuda":
        shapes += [(8192, 8192, 8192), (163840, 512, 4096)]
    libs: dict[str, object] = {"cuda": torch.mm} if dev.type == "cuda" else {"mkl": torch.mm}
    if dev.type == "cpu" and torch.backends.mkldnn.is_available():
        libs["onednn"] = lambda a, b_t: torch.ops.mkldnn._linear_pointwise(
            a, b_t, None, "none", [], ""
        )
    out: dict[str, tuple[float, str]] = {}
    for lib, fn in libs.items():
        best, best_shape = 0.0, ""
        for m, k, n in shapes:
            a = torch.randn(m, k, device=dev, dtype=dtype)
            b = torch.randn(k, n, device=dev, dtype=dtype)
            arg = b.t().contiguous() if lib == "onednn" else b  # oneDNN takes the (N, K) weight
            fn(a, arg)  # warm-up
            _sync(dev)
            for _ in range(reps):
                t0 = now()
                fn(a, arg)
                _sync(dev)
                gflops = 2 * m * k * n / max(now() - t0, 1e-9) / 1e9
                if gflops > best:
                    best, best_shape = gflops, f"{lib} {m}x{k}x{n}"
        out[lib] = (best, best_shape)
    return out


def _pixels(n: int, t2: int = 60, t1: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        s2=rng.integers(0, 6000, (n, t2, 10)).astype(np.uint16),
        s2_valid=rng.random((n, t2)) < 0.75,
        s2_doy=np.linspace(1, 365, t2).astype(np.uint16),
        s1=rng.integers(1, 12000, (n, t1, 2)).astype(np.int16),
        s1_valid=rng.random((n, t1)) < 0.9,
        s1_doy=np.linspace(1, 365, t1).astype(np.uint16),
        s1_keys=np.arange(t1, dtype=np.int64),
        pixel_ids=np.arange(n, dtype=np.uint64),
    )


def bench_model(
    preset: str, dev: torch.device, n: int, batch: int, compile: bool = False
) -> tuple[float, float, float]:
    """Return (pipeline pixels/s, encode-only pixels/s, FLOP per pixel)."""
    spec = ModelSpec.preset(preset)
    torch.manual_seed(0)
    model = TesseraModel(spec, with_projector=False)
    data = _pixels(n)
    warm = min(2 * batch, n)  # two batches: the prefetch thread and (with compile) the graph
    embed_pixels(model, **{k: v[:warm] if v.shape[0] == n else v for k, v in data.items()},
                 seed=0, batch_size=batch, device=dev, compile=compile)  # fmt: skip
    _sync(dev)
    t0 = time.perf_counter()
    embed_pixels(model, **data, seed=0, batch_size=batch, device=dev, compile=compile)
    _sync(dev)
    pipeline = n / (time.perf_counter() - t0)

    k = spec.sample_steps
    x2 = torch.randn(batch, k, spec.s2_channels + 1, device=dev)
    x1 = torch.randn(batch, k, spec.s1_channels + 1, device=dev)
    x2[..., -1] = x1[..., -1] = 100.0
    encode = torch.compile(model.encode, dynamic=False) if compile else model.encode
    ctx = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.no_grad()
    with torch.inference_mode(), ctx:
        encode(x2, x1)
        _sync(dev)
        n_batches = max(1, n // batch)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            encode(x2, x1)
        _sync(dev)
        rate = n_batches * batch / (time.perf_counter() - t0)
    return pipeline, rate, flops_per_pixel(spec)


def _rss_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(preset: str, dev: torch.device, batch: int, n: int) -> float:
    """Peak memory (MiB) of embedding ``n`` pixels at ``batch`` (see the module docstring)."""
    if dev.type != "cuda":
        code = (
            "import sys, torch; sys.path.insert(0, sys.argv[1]);"
            "from benchmarks.bench_embedding import _pixels, _rss_kib;"
            "from tessera_model import ModelSpec, TesseraModel, embed_pixels;"
            "m = TesseraModel(ModelSpec.preset(sys.argv[2]), with_projector=False);"
            "d = _pixels(int(sys.argv[4]));"
            "open('/proc/self/clear_refs', 'w').write('5');"  # reset the peak (VmHWM)
            "r0 = _rss_kib('VmRSS');"
            "embed_pixels(m, **d, seed=0, batch_size=int(sys.argv[3]), device='cpu');"
            "print((_rss_kib('VmHWM') - r0) / 1024)"
        )
        root = str(Path(__file__).resolve().parents[1])
        out = subprocess.run([sys.executable, "-c", code, root, preset, str(batch), str(n)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    model = TesseraModel(ModelSpec.preset(preset), with_projector=False).to(dev)
    data = _pixels(n)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    embed_pixels(model, **data, seed=0, batch_size=batch, device=dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--presets", nargs="+", default=["small", "v1"])
    p.add_argument("--batch", type=int, default=256, help="pixels per forward pass (0: auto)")
    p.add_argument("--pixels", type=int, default=4096, help="pixels to embed (small)")
    p.add_argument("--v1-pixels", type=int, default=256, help="pixels to embed (v1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--memory", type=int, nargs="*", default=None,
                   help="batch sizes for the peak-memory table (v1 only)")  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
          f", compile {args.compile}")  # fmt: skip
    print(
        f"matmul peak: best {'bf16' if dev.type == 'cuda' else 'fp32'} GFLOP/s, "
        "measured just before each preset's run\n"
    )
    print("| preset | FLOP/pixel | batch | pixels/s (embed_pixels) | pixels/s (encode) "
          "| GFLOP/s (encode) | matmul peak GFLOP/s | % of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        n = args.v1_pixels if preset == "v1" else args.pixels
        batch = min(args.batch or auto_batch_size(ModelSpec.preset(preset), dev), n)
        peak, _ = matmul_peak(dev)
        pipe, enc, fpp = bench_model(preset, dev, n, batch, args.compile)
        achieved = enc * fpp / 1e9
        print(f"| {preset} | {fpp / 1e9:.3f} G | {batch} | {pipe:,.0f} | {enc:,.0f} "
              f"| {achieved:.1f} | {peak:.1f} | {100 * achieved / peak:.0f}% |")  # fmt: skip
    if args.memory:
        auto = auto_batch_size(ModelSpec.preset("v1"), dev)
        print(f"\nv1 peak memory vs batch size (automatic batch here: {auto})\n")
        print("| batch | pixels embedded | peak MiB | MiB per pixel of batch |")
        print("|---|---|---|---|")
        for batch in args.memory:
            n = 4 * batch
            mib = peak_memory_mib("v1", dev, batch, n)
            print(f"| {batch} | {n} | {mib:,.0f} | {mib / batch:.3f} |")


if __name__ == "__main__":
    main()
