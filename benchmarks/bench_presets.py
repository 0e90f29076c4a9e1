"""Benchmark: pixels/s of every model preset as a fraction of this machine's matmul peak.

Measures in one run on one device:

- the dense matmul peak (fp32 on CPU; bf16 and fp32 on CUDA), with
  :func:`bench_embedding.matmul_peak`; on CPU measured again before and after each preset
  and the highest value used (a shared machine's peak drifts with its load);
- for each preset, random weights, end-to-end pixels/s of the embedding call the factory uses
  (``embed_pixels`` for the v1.0 family: seeded sampling of 40 steps per stream;
  ``embed_pixels_binned`` for v1.1 and v2: every valid step, batched by observation bin), and
  the achieved GFLOP/s from the analytic FLOP count of the tokens actually run.

FLOP-per-pixel assumption (printed with the results). v1.0 family: T = 40 tokens per stream,
whatever the observations. v1.1 / v2: T = the bin of each stream (valid steps rounded up to a
multiple of 8), so the cost depends on the observations; the synthetic pixels here have
``n_s2`` uniform in [25, 40] valid S2 steps of 80 (bins 32 and 40) and ``n_s1`` uniform in
[41, 56] valid S1 steps of 90 (bins 48 and 56): a temperate year, four bin groups, so that a
few hundred pixels already fill every group as a 256 x 256 block of a real tile does. Counted per stream with width d, FFN f, C channels:
band embedding ``2T(Cd + d^2)``; per layer QKV ``6Td^2``, scores and weighted values
``4T^2 d``, output projection ``2Td^2``, FFN ``4Tdf``; pooling: v2 query ``2Td``, GRU
(v1.0/v1.1) ``12Td^2``; head: v1.0 ``4dL``, v1.1/v2 ``2(2d)(4d) + 2(4d)L``. Element-wise ops,
the rows added to reach ``BINNED_MIN_ROWS`` in small bin groups and those that fill the last
CPU inference chunk (``cpu_chunk_rows``) are not counted as useful work (the padding share is
reported; batch-size-limited sub-batches are approximated by whole groups on CPU).

Usage::

    python benchmarks/bench_presets.py [--device cpu|cuda] [--presets v1 v2-nano ...]
        [--seconds 4] [--batch 0] [--bf16] [--threads N] [--clock wall|cpu] [--int8]

``--clock cpu`` (one thread only) divides by the process CPU time instead of the wall time,
for both the pixels and the peak: on a shared CPU the wall clock also counts the time the
thread waited for a core, which no code change can remove.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embedding import matmul_peak  # noqa: E402

from tessera_model import ModelSpec, TesseraModel, embed_pixels, embed_pixels_binned  # noqa: E402
from tessera_model.infer import MIN_FORWARD_ROWS  # noqa: E402
from tessera_model.infer_binned import BINNED_MIN_ROWS, stream_bins  # noqa: E402
from tessera_model.inputs import resolve_device  # noqa: E402
from tessera_model.model import cpu_chunk_rows  # noqa: E402

PRESETS = ["small", "v1", "v1.1", "v2-nano", "v2-small", "v2-medium", "v2-large"]
T2, T1 = 80, 90
N_S2, N_S1 = (25, 40), (41, 56)


def stream_flops(spec: ModelSpec, t: np.ndarray, channels: int) -> np.ndarray:
    """Analytic FLOP of one stream for sequence lengths ``t`` (module docstring)."""
    d, f = spec.d_model, spec.ffn_dim
    t = t.astype(np.float64)
    emb = 2 * t * (channels * d + d * d)
    layer = 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * f
    pool = 2 * t * d if spec.family == "v2" else 12 * t * d * d
    return emb + spec.n_layers * layer + pool


def head_flops(spec: ModelSpec) -> float:
    d = spec.d_model
    if spec.family == "v1.0":
        return 4.0 * d * spec.latent_dim
    return 2.0 * (2 * d) * (4 * d) + 2.0 * (4 * d) * spec.latent_dim


def make_pixels(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic d-pixels with the observation counts of the module docstring."""
    rng = np.random.default_rng(seed)
    n2 = rng.integers(N_S2[0], N_S2[1] + 1, n)
    n1 = rng.integers(N_S1[0], N_S1[1] + 1, n)
    s2_valid = np.argsort(rng.random((n, T2)), axis=1) < n2[:, None]
    s1_valid = np.argsort(rng.random((n, T1)), axis=1) < n1[:, None]
    s1 = rng.integers(1, 12000, (n, T1, 2)).astype(np.int16)
    s1[~s1_valid] = 0
    return {
        "s2": rng.integers(0, 6000, (n, T2, 10)).astype(np.uint16), "s2_valid": s2_valid,
        "s2_doy": np.linspace(1, 365, T2).astype(np.uint16), "s1": s1, "s1_valid": s1_valid,
        "s1_doy": np.linspace(1, 365, T1).astype(np.uint16),
        "s1_keys": np.arange(T1, dtype=np.int64), "s1_desc": np.arange(T1) >= T1 // 2,
        "pixel_ids": np.arange(n, dtype=np.uint64),
    }  # fmt: skip


def run(model: TesseraModel, px: dict[str, np.ndarray], dev: torch.device, batch: int,
        bf16: bool, precision: str = "fp32") -> None:
    if model.spec.family == "v1.0":
        embed_pixels(model, px["s2"], px["s2_valid"], px["s2_doy"], px["s1"], px["s1_valid"],
                     px["s1_doy"], px["s1_keys"], px["pixel_ids"], seed=0, batch_size=batch,
                     device=dev, precision=precision)  # fmt: skip
    else:
        embed_pixels_binned(model, px["s2"], px["s2_valid"], px["s2_doy"], px["s1"],
                            px["s1_doy"], px["s1_desc"], batch_size=batch, device=dev,
                            bf16=bf16, precision=precision)  # fmt: skip


def work(spec: ModelSpec, px: dict[str, np.ndarray], batch: int,
         cpu: bool = False) -> tuple[float, float]:  # fmt: skip
    """(useful FLOP per pixel, share of forward rows that were padding) for these pixels."""
    n = px["s2"].shape[0]
    min_rows = MIN_FORWARD_ROWS if spec.family == "v1.0" else BINNED_MIN_ROWS
    if spec.family == "v1.0":
        t2 = t1 = np.full(n, spec.sample_steps)
        groups = [n]
    else:
        t2 = stream_bins(px["s2_valid"].sum(1), spec.family, spec.max_steps)
        t1 = stream_bins(px["s1_valid"].sum(1), spec.family, spec.max_steps)
        _, groups = np.unique(t2 * 4096 + t1, return_counts=True)
    flops = stream_flops(spec, t2, spec.s2_channels) + stream_flops(spec, t1, spec.s1_channels)
    rows = sum(max(min_rows, g) if batch == 0 or g <= batch else
               (g // batch) * batch + max(min_rows, g % batch) * bool(g % batch)
               for g in groups)  # fmt: skip
    if cpu:  # CPU inference chunks (tessera_model.model.cpu_chunk_rows): last one padded
        if spec.family == "v1.0":
            chunk = cpu_chunk_rows(spec, spec.sample_steps)
            rows = -(-max(rows, 1) // chunk) * chunk
        else:
            keys, groups = np.unique(t2 * 4096 + t1, return_counts=True)
            rows = sum(-(-max(min_rows, g) // (c := cpu_chunk_rows(spec, int(max(k // 4096, k % 4096)))))
                       * c for k, g in zip(keys, groups, strict=True))  # fmt: skip
    return float(flops.mean() + head_flops(spec)), 1.0 - n / rows


def bench(preset: str, dev: torch.device, seconds: float, batch: int, bf16: bool,
          clock: str = "wall", precision: str = "fp32") -> dict:
    spec = ModelSpec.preset(preset)
    torch.manual_seed(0)
    model = TesseraModel(spec, with_projector=False).eval()
    probe = make_pixels(256, seed=1)
    now = time.process_time if clock == "cpu" else time.perf_counter
    run(model, probe, dev, batch, bf16, precision)  # warm-up (and a first speed estimate)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = now()
    run(model, probe, dev, batch, bf16, precision)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    per_px = (now() - t0) / 256
    n = int(min(262_144, max(256, seconds / max(per_px, 1e-7))))
    px = make_pixels(n)
    t0 = now()
    run(model, px, dev, batch, bf16, precision)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = now() - t0
    flop, waste = work(spec, px, batch, cpu=dev.type == "cpu")
    return {"preset": preset, "pixels": n, "pps": n / dt, "flop": flop,
            "gflops": n * flop / dt / 1e9, "waste": waste}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=0, help="0: automatic")
    ap.add_argument("--bf16", action="store_true", help="v1.1/v2 under bf16 autocast (CUDA)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time pixels and peak by process CPU time (needs --threads 1; on "
                    "a shared CPU it counts the work, not the waits for a core)")  # fmt: skip
    ap.add_argument("--int8", action="store_true",
                    help="also time precision='int8-dynamic' (CPU) and report its speed-up")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu needs --threads 1 (CPU time of several threads includes spinning)")
    dev = resolve_device(args.device)
    peak, shape = matmul_peak(dev, clock=args.clock)  # fp32 on CPU, bf16 on CUDA
    fp32_peak = peak
    if dev.type == "cuda":
        a = torch.randn(8192, 8192, device=dev)
        a @ a
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        torch.cuda.synchronize(dev)
        fp32_peak = 5 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e9
    print(f"device {dev} ({platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, load "
          f"{os.getloadavg()[0]:.1f}); matmul peak "
          f"{peak:,.0f} GFLOP/s ({'bf16' if dev.type == 'cuda' else 'fp32'}, {shape})"
          + (f", fp32 {fp32_peak:,.0f} GFLOP/s" if dev.type == "cuda" else ""))
    print(f"observations: v1.0 family T=40 per stream; v1.1/v2 bins of n_s2~U{N_S2} of {T2}, "
          f"n_s1~U{N_S1} of {T1}\n")
    print("| preset | pixels | pixels/s | MFLOP/pixel | GFLOP/s | peak GFLOP/s | % of peak | "
          "padding rows |" + (" int8 pixels/s | int8 / fp32 |" if args.int8 else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.int8 else ""))
    for p in args.presets:
        if dev.type == "cpu":  # a shared CPU's peak drifts: measure it beside each preset
            peak = max(matmul_peak(dev, 3, args.clock)[0], matmul_peak(dev, 3, args.clock)[0])
        r = bench(p, dev, args.seconds, args.batch, args.bf16, args.clock)
        q = bench(p, dev, args.seconds, args.batch, args.bf16, args.clock, "int8-dynamic") \
            if args.int8 else None  # fmt: skip
        if dev.type == "cpu":
            peak = max(peak, matmul_peak(dev, 3, args.clock)[0])
        fam = ModelSpec.preset(p).family
        bf = dev.type == "cuda" and (fam == "v1.0" or args.bf16)
        ref = peak if (dev.type == "cpu" or bf) else fp32_peak
        print(f"| {p} | {r['pixels']:,} | {r['pps']:,.0f} | {r['flop'] / 1e6:,.1f} | "
              f"{r['gflops']:,.1f} | {ref:,.0f} {'bf16' if bf else 'fp32'} | "
              f"{100 * r['gflops'] / ref:.1f}% "
              f"| {100 * r['waste']:.1f}% |"
              + (f" {q['pps']:,.0f} | {q['pps'] / r['pps']:.2f}x |" if q else ""), flush=True)


if __name__ == "__main__":
    main()
