"""Benchmark: training throughput (samples/s) of :func:`tessera_model.fit`.

One sample is one pixel of the global batch (each step encodes it in three views: two
samplings and the mix). Synthetic d-pixels (60 S2 and 50 S1 steps, 75 % / 90 % valid) are
streamed from in-memory shards; the first steps (allocation, autotuning) are not timed.
FLOP per sample is analytic: 3 views x 3 (forward + backward) x (encoder + projector).

Usage::

    python benchmarks/bench_training.py [--device cpu|cuda|auto] [--presets small]
        [--batch 256] [--steps 6] [--warmup 2] [--threads N]

Prints a markdown table; on CUDA it adds the peak memory.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_embedding import flops_per_pixel, matmul_peak  # noqa: E402
from tessera_model import ArrayShards, ModelSpec, TrainingArrays, TrainSettings, fit  # noqa: E402
from tessera_model.inputs import resolve_device  # noqa: E402


def _arrays(n: int, t2: int = 60, t1: int = 50, seed: int = 0) -> TrainingArrays:
    rng = np.random.default_rng(seed)
    return TrainingArrays(
        s2=rng.integers(0, 6000, (n, t2, 10)).astype(np.uint16),
        s2_doy=np.sort(rng.integers(1, 366, (n, t2)), axis=1).astype(np.uint16),
        s2_valid=rng.random((n, t2)) < 0.75,
        s1=rng.integers(1, 12000, (n, t1, 2)).astype(np.int16),
        s1_doy=np.sort(rng.integers(1, 366, (n, t1)), axis=1).astype(np.uint16),
        s1_valid=rng.random((n, t1)) < 0.9,
    )


def projector_flops(spec: ModelSpec) -> float:
    """Forward FLOP per sample of the projector (Linear layers only)."""
    h = spec.projector_dim
    return 2 * (spec.latent_dim * h + spec.projector_layers * h * h)


def bench(preset: str, dev: torch.device, batch: int, steps: int, warmup: int) -> dict[str, float]:
    spec = ModelSpec.preset(preset)
    data = ArrayShards(_arrays(batch * 4), shard_size=batch * 2)
    settings = TrainSettings(steps=steps + warmup, batch_size=batch, lr=1e-3,
                             checkpoint_every=10**6, device=dev.type)  # fmt: skip
    stamps: list[float] = []

    def log(step: int, loss: float, lr: float) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp:
        fit(spec, data, settings, str(Path(tmp) / "ck.pt"), resume=False, log_fn=log)
    timed = np.diff(stamps[warmup - 1 :]) if warmup else np.diff(stamps)
    per_step = float(np.median(timed))
    flop = 3 * 3 * (flops_per_pixel(spec) + projector_flops(spec))
    return {
        "samples_s": batch / per_step,
        "step_s": per_step,
        "gflop_s": batch * flop / per_step / 1e9,
        "peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--presets", nargs="+", default=["small"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
          f"{', bf16 autocast' if dev.type == 'cuda' else ', fp32'}\n")  # fmt: skip
    print("| preset | batch | step s | samples/s | GFLOP/s (analytic) | matmul peak GFLOP/s "
          "| % of peak | peak MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        peak, _ = matmul_peak(dev)
        r = bench(preset, dev, args.batch, args.steps, args.warmup)
        print(f"| {preset} | {args.batch} | {r['step_s']:.3f} | {r['samples_s']:,.0f} "
              f"| {r['gflop_s']:,.1f} | {peak:,.1f} | {100 * r['gflop_s'] / peak:.0f}% "
              f"| {r['peak_mib']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
