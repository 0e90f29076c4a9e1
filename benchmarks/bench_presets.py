"""Benchmark: pixels/s of every model preset as a fraction of this machine's matmul peak.

Measures in one run on one device:

- the dense matmul peak (fp32 on CPU; bf16 and fp32 on CUDA) with
  :func:`bench_embedding.matmul_peaks`; on CPU both of torch's fp32 GEMM libraries, MKL and
  oneDNN (MKL runs AVX2 kernels on AMD processors: on the AVX-512 dev box its best is under
  half of oneDNN's), measured again before and after each preset, the highest value used (a
  shared machine's peak drifts with its load). "% of peak" is against the best library,
  "% of MKL" against MKL's (the yardstick of the figures before 2026-11-30 14:00);
- for each preset, random weights, end-to-end pixels/s of the embedding call the factory uses
  (``embed_pixels`` for the v1.0 family: seeded sampling of 40 steps per stream;
  ``embed_pixels_binned`` for v1.1 and v2: every valid step, batched by observation bin), in a
  fresh process per preset (and per code tree with ``--baseline``), and the achieved GFLOP/s
  from the analytic FLOP count of the tokens actually run.

FLOP per pixel (printed with the results): GEMM work of the tokens run, the same method for
every preset. v1.0 family: T = 40 tokens per stream, whatever the observations. v1.1 / v2:
T = the bin of each stream (valid steps rounded up to the family's bin), so the cost depends
on the observations; the synthetic pixels here have ``n_s2`` uniform in [25, 40] valid S2 steps
of 80 (bins 32 and 40) and ``n_s1`` uniform in [41, 56] valid S1 steps of 90 (bins 48 and 56):
a temperate year, four bin groups. Per stream with width d, FFN f, C channels: band embedding
``2T(Cd + d^2)``; per layer QKV ``6Td^2``, scores and weighted values ``4T^2 d``, output
projection ``2Td^2``, FFN ``4Tdf``; pooling query ``2Td``, plus for the GRU (v1.0/v1.1) input
maps ``6Td^2`` and recurrent maps ``6(T-1)d^2`` (step 0 has none); head: v1.0 ``4dL``,
v1.1/v2 ``2(2d)(4d) + 2(4d)L``. Element-wise ops (softmax, LayerNorm, activations) count
nothing.

Padding. Rows run only to fill a bin group to ``BINNED_MIN_ROWS`` or the last CPU inference
chunk (``cpu_chunk_rows``) are not useful work. A few hundred pixels in four bin groups would
make that share large (27 % for v1.1 at 256 pixels) where a real 256 x 256 block has almost
none, so the timed sample is trimmed to whole chunks: each bin group (v1.1/v2) or the whole
sample (v1.0 family) to a multiple of 64 rows (256 for ``small``), at least the chunk of every
code tree measured. "block padding" is the share of padding rows of a 256 x 256 block of the
same observation distribution (analytic), and "% of peak, block" the sample's fraction times
the useful share of such a block.

Timing: after a warm-up, each preset runs ``--repeats`` times (default 3) on the same pixels,
each run about ``--seconds`` long, and the fastest run is kept, as the peak keeps the fastest of
its GEMM timings (both sides are best-of samples on a machine whose speed drifts).

Usage::

    python benchmarks/bench_presets.py [--device cpu|cuda] [--presets v1 v2-nano ...]
        [--seconds 4] [--batch 0] [--bf16] [--threads N] [--clock wall|cpu] [--int8]
        [--repeats 3] [--baseline DIR]

``--clock cpu`` (one thread only) divides by the process CPU time instead of the wall time,
for both the pixels and the peak: on a shared CPU the wall clock also counts the time the
thread waited for a core, which no code change can remove. ``--baseline DIR`` also times the
``tessera_model`` under DIR (for instance ``git archive <commit> tessera_model | tar -x -C DIR``)
on the same pixels, preset by preset beside the current code, and prints the speed ratio.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

_CODE = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--code"), None)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, _CODE or str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tessera_model import ModelSpec, TesseraModel, embed_pixels, embed_pixels_binned  # noqa: E402
from tessera_model.infer import MIN_FORWARD_ROWS  # noqa: E402
from tessera_model.infer_binned import BINNED_MIN_ROWS, stream_bins  # noqa: E402
from tessera_model.inputs import resolve_device  # noqa: E402
from tessera_model.model import cpu_chunk_rows  # noqa: E402

PRESETS = ["small", "v1", "v1.1", "v2-nano", "v2-small", "v2-medium", "v2-large"]
T2, T1 = 80, 90
N_S2, N_S1 = (25, 40), (41, 56)
UNIT = 64
"""Rows per bin group (or per v1.0 sample) of the timed sample: a multiple of every code
tree's CPU chunk (``small``: 256, its chunk)."""
BLOCK = 256 * 256


def stream_flops(spec: ModelSpec, t: np.ndarray, channels: int) -> np.ndarray:
    """Analytic GEMM FLOP of one stream for sequence lengths ``t`` (module docstring)."""
    d, f = spec.d_model, spec.ffn_dim
    t = t.astype(np.float64)
    emb = 2 * t * (channels * d + d * d)
    layer = 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * f
    pool = 2 * t * d
    if spec.family != "v2":
        pool = pool + 6 * t * d * d + 6 * np.maximum(t - 1, 0) * d * d
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


def group_keys(spec: ModelSpec, px: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel ``(T2, T1)`` token counts (the bins of v1.1/v2; 40 and 40 for v1.0)."""
    n = px["s2"].shape[0]
    if spec.family == "v1.0":
        return np.full(n, spec.sample_steps), np.full(n, spec.sample_steps)
    return (stream_bins(px["s2_valid"].sum(1), spec.family, spec.max_steps),
            stream_bins(px["s1_valid"].sum(1), spec.family, spec.max_steps))  # fmt: skip


def whole_chunks(spec: ModelSpec, px: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sample trimmed to whole chunks (module docstring, "Padding")."""
    n = px["s2"].shape[0]
    unit = max(UNIT, cpu_chunk_rows(spec, spec.sample_steps)) if spec.family == "v1.0" else UNIT
    if spec.family == "v1.0":
        keep = np.arange(max(unit, n // unit * unit))
    else:
        t2, t1 = group_keys(spec, px)
        key = t2 * 4096 + t1
        keep = np.sort(np.concatenate([np.flatnonzero(key == k)[: (key == k).sum() // unit * unit]
                                       for k in np.unique(key)]))  # fmt: skip
    out = {k: (v[keep] if v.shape[:1] == (n,) and k not in ("s2_doy", "s1_doy") else v)
           for k, v in px.items()}  # fmt: skip
    out["pixel_ids"] = np.arange(keep.size, dtype=np.uint64)
    return out


def run(
    model: TesseraModel,
    px: dict[str, np.ndarray],
    dev: torch.device,
    batch: int,
    bf16: bool,
    precision: str = "fp32",
) -> None:
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
    t2, t1 = group_keys(spec, px)
    flops = stream_flops(spec, t2, spec.s2_channels) + stream_flops(spec, t1, spec.s1_channels)
    keys, groups = np.unique(t2 * 4096 + t1, return_counts=True)
    if spec.family == "v1.0":
        b = batch or n
        groups = np.array([b] * (n // b) + ([n % b] if n % b else []))
        keys = np.full(groups.size, spec.sample_steps * 4097)
    rows = 0
    for k, g in zip(keys, groups, strict=True):
        steps = int(max(k // 4096, k % 4096))
        if batch and g > batch and spec.family != "v1.0":
            parts = [batch] * int(g // batch) + ([int(g % batch)] if g % batch else [])
        else:
            parts = [int(g)]
        c = cpu_chunk_rows(spec, steps) if cpu else 1
        rows += sum(-(-max(min_rows, p) // c) * c for p in parts)
    return float(flops.mean() + head_flops(spec)), 1.0 - n / rows


def bench(preset: str, dev: torch.device, seconds: float, batch: int, bf16: bool,
          clock: str = "wall", precision: str = "fp32", repeats: int = 1) -> dict:  # fmt: skip
    spec = ModelSpec.preset(preset)
    torch.manual_seed(0)
    model = TesseraModel(spec, with_projector=False).eval()
    probe = whole_chunks(spec, make_pixels(max(512, 2 * cpu_chunk_rows(spec, 64)), seed=1))
    now = time.process_time if clock == "cpu" else time.perf_counter
    run(model, probe, dev, batch, bf16, precision)  # warm-up (and a first speed estimate)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = now()
    run(model, probe, dev, batch, bf16, precision)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    per_px = (now() - t0) / probe["s2"].shape[0]
    n = int(min(262_144, max(512, 1.15 * seconds / max(per_px, 1e-7))))
    px = whole_chunks(spec, make_pixels(n))
    dt = float("inf")
    for _ in range(max(1, repeats)):  # the best of the timed runs, as the peak is the best GEMM
        t0 = now()
        run(model, px, dev, batch, bf16, precision)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = min(dt, now() - t0)
    flop, waste = work(spec, px, batch, cpu=dev.type == "cpu")
    _, block_waste = work(spec, make_pixels(BLOCK, seed=2), batch, cpu=dev.type == "cpu")
    n = px["s2"].shape[0]
    return {"preset": preset, "pixels": n, "pps": n / dt, "flop": flop,
            "gflops": n * flop / dt / 1e9, "waste": waste, "block_waste": block_waste}  # fmt: skip


def _worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    out = {"fp32": bench(args.presets[0], dev, args.seconds, args.batch, args.bf16, args.clock,
                         repeats=args.repeats)}  # fmt: skip
    if args.int8:
        out["int8"] = bench(args.presets[0], dev, args.seconds, args.batch, args.bf16,
                            args.clock, "int8-dynamic", args.repeats)  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(args: argparse.Namespace, preset: str, code: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--presets", preset,
           "--device", args.device, "--seconds", str(args.seconds), "--batch", str(args.batch),
           "--threads", str(args.threads), "--clock", args.clock,
           "--repeats", str(args.repeats)]  # fmt: skip
    cmd += (["--int8"] if args.int8 else []) + (["--bf16"] if args.bf16 else [])
    cmd += ["--code", code] if code else []
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"bench worker failed ({preset}, {code or 'current'}):\n{res.stderr}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=0, help="0: automatic")
    ap.add_argument("--bf16", action="store_true", help="v1.1/v2 under bf16 autocast (CUDA)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per preset (after a warm-up), the fastest kept: the peak is "
                    "likewise the fastest of its GEMM timings")  # fmt: skip
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time pixels and peak by process CPU time (needs --threads 1; on "
                    "a shared CPU it counts the work, not the waits for a core)")  # fmt: skip
    ap.add_argument(
        "--int8",
        action="store_true",
        help="also time precision='int8-dynamic' (CPU) and report its speed-up",
    )
    ap.add_argument(
        "--baseline",
        default=None,
        help="directory holding another tessera_model to time beside this one",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu needs --threads 1 (CPU time of several threads includes spinning)")
    dev = resolve_device(args.device)
    from bench_embedding import matmul_peaks  # after tessera_model: it puts this tree first

    peaks = matmul_peaks(dev, clock=args.clock)
    fp32_peak = 0.0
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
          + ", ".join(f"{lib} {g:,.0f} GFLOP/s ({s})" for lib, (g, s) in peaks.items())
          + (f", fp32 {fp32_peak:,.0f} GFLOP/s" if dev.type == "cuda" else ""))  # fmt: skip
    print(
        f"observations: v1.0 family T=40 per stream; v1.1/v2 bins of n_s2~U{N_S2} of {T2}, "
        f"n_s1~U{N_S1} of {T1}; baseline: {args.baseline or 'none'}\n"
    )
    base = args.baseline is not None
    print("| preset | pixels | MFLOP/pixel | pixels/s | GFLOP/s | % of peak | % of MKL peak | "
          "padding (sample / 256x256 block) | % of peak, block |"
          + (" baseline pixels/s | baseline % of peak | speed-up |" if base else "")
          + (" int8 pixels/s | int8 / fp32 |" if args.int8 else ""))  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if base else "")
          + ("---|---|" if args.int8 else ""))  # fmt: skip
    for p in args.presets:
        if dev.type == "cpu":  # a shared CPU's peak drifts: measure it beside each preset
            peaks = _best(peaks, matmul_peaks(dev, 3, args.clock))
        res = _spawn(args, p, None)
        old = _spawn(args, p, args.baseline) if base else None
        if dev.type == "cpu":
            peaks = _best(peaks, matmul_peaks(dev, 3, args.clock))
        r, q = res["fp32"], res.get("int8")
        fam = ModelSpec.preset(p).family
        bf = dev.type == "cuda" and (fam == "v1.0" or args.bf16)
        best = max(g for g, _ in peaks.values())
        ref = best if (dev.type == "cpu" or bf) else fp32_peak
        mkl = peaks.get("mkl", (ref, ""))[0]
        frac = r["gflops"] / ref
        row = (f"| {p} | {r['pixels']:,} | {r['flop'] / 1e6:,.1f} | {r['pps']:,.1f} | "
               f"{r['gflops']:,.1f} | **{100 * frac:.1f} %** | {100 * r['gflops'] / mkl:.1f} % | "
               f"{100 * r['waste']:.1f} % / {100 * r['block_waste']:.2f} % | "
               f"{100 * frac * (1 - r['block_waste']):.1f} % |")  # fmt: skip
        if old is not None:
            o = old["fp32"]
            row += (f" {o['pps']:,.1f} | {100 * o['gflops'] / ref:.1f} % | "
                    f"{r['pps'] / o['pps']:.2f}x |")  # fmt: skip
        if q is not None:
            row += f" {q['pps']:,.1f} | {q['pps'] / r['pps']:.2f}x |"
        print(row, flush=True)
    print("\npeaks at the end: " + ", ".join(f"{lib} {g:,.0f}" for lib, (g, _) in peaks.items())
          + f"; load {os.getloadavg()[0]:.1f}")  # fmt: skip


def _best(a: dict[str, tuple[float, str]], b: dict[str, tuple[float, str]]) -> dict:
    return {k: max(a.get(k, (0.0, "")), b.get(k, (0.0, ""))) for k in set(a) | set(b)}


if __name__ == "__main__":
    main()
