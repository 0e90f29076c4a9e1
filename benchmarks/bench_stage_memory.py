"""Benchmark: where a build's peak memory comes from, stage by stage, for 1 and 2 tiles in flight.

Usage::

    python benchmarks/bench_stage_memory.py [--tiles 1 2] [--preset tiny|small] [--tracemalloc]

Each case runs in a fresh process that imports what a build process imports (the CLI, the
build flow, Prefect, torch, Zarr) and loads the model, then runs the per-tile stage chain
(acquire -> cloud mask -> d-pixels -> embed -> publish; synthetic Earth, 256-px tiles of
zone 31N, 1 torch thread per tile as the threads runner gives 2 workers) for N tiles at once,
one thread per tile, without Prefect (so the stages' own memory shows). A sampler thread
reads the process's RSS every 5 ms and keeps, per stage, the highest RSS seen while that
stage ran in some thread; the report gives the fixed footprint (after imports, after the
model load), the peak and the stage(s) running at the peak, and each stage's peak above the
fixed footprint, with each stage's CPU seconds (1 tile: the process's CPU clock, so Zarr's
codec threads count; several tiles: the stage thread's own CPU clock only, summed).

``--tracemalloc`` (1 tile only, sequential) adds each stage's peak of traced Python/numpy
allocations (tracemalloc; torch's own allocations are not traced), which names a stage's
working set without the allocator's retention.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
start = rss()
from deployments import cli  # noqa: F401  (what a build process imports)
from flows import build  # noqa: F401
import torch, zarr, numpy as np
from tasks.acquire import acquire
from tasks.config import (DPixelConfig, EmbeddingConfig, MaskConfig, ModelConfig, PublishConfig,
                          SourceConfig, StorageConfig)
from tasks.dpixels import extract_dpixels
from tasks.embed import embed_tile, _MODELS
from tasks.grid import Tile
from tasks.mask import cloud_mask
from tasks.publish import prepare_zone_stores, publish_tile
from tasks.threads import apply_torch_threads
from tasks.train import given_checkpoint
imports = rss()
n, tracing = {n}, {tracing}
base = {base!r}
storage = StorageConfig(output_uri=base + "/out", work_uri=base + "/work")
ckpt = given_checkpoint({ckpt!r}, ModelConfig(), storage)
ecfg = EmbeddingConfig(device="cpu")
_MODELS.get(ckpt, "cpu", storage)
model = rss()
tiles = [Tile(zone=31, south=False, x0=302080 + 2560 * i, y0=5788160, size_px=256) for i in range(n)]
pcfg = PublishConfig()
prepare_zone_stores(tiles, 2023, pcfg, storage, ckpt.model_version)
STAGES = ("acquire", "mask", "dpixels", "embed", "publish")
running = {{}}
peak = {{s: 0.0 for s in STAGES}}
cpu = {{s: 0.0 for s in STAGES}}
traced = {{s: 0.0 for s in STAGES}}
top = [0.0, ()]
stop = threading.Event()
lock = threading.Lock()
if tracing:
    import tracemalloc
    tracemalloc.start()

def sampler():
    while not stop.is_set():
        r = rss()
        with lock:
            now = tuple(sorted(running.values()))
        for s in set(now):
            peak[s] = max(peak[s], r)
        if r > top[0]:
            top[0], top[1] = r, now
        time.sleep(0.005)

def stage(tid, name, fn):
    with lock:
        running[tid] = name
    if tracing:
        tracemalloc.reset_peak()
    clock = time.process_time if n == 1 else time.thread_time
    c0 = clock()
    out = fn()
    with lock:
        cpu[name] += clock() - c0
        del running[tid]
    if tracing:
        traced[name] = max(traced[name], tracemalloc.get_traced_memory()[1] / 2**20)
    return out

def chain(i, tile):
    apply_torch_threads(1)
    sc = stage(i, "acquire", lambda: acquire(tile, 2023, SourceConfig(), storage))
    mk = stage(i, "mask", lambda: cloud_mask(sc, MaskConfig(), storage))
    dp = stage(i, "dpixels", lambda: extract_dpixels(sc, mk, DPixelConfig(), storage))
    em = stage(i, "embed", lambda: embed_tile(dp, ckpt, ecfg, 0, storage))
    stage(i, "publish", lambda: publish_tile(em, 2023, pcfg, storage, ckpt.model_version))
    g = zarr.open_group(em.uri, mode="r")
    digests[i] = g.attrs.get("content_sha256")

digests = {{}}
th = threading.Thread(target=sampler, daemon=True)
th.start()
w0 = time.perf_counter()
workers = [threading.Thread(target=chain, args=(i, t)) for i, t in enumerate(tiles)]
for w in workers:
    w.start()
for w in workers:
    w.join()
wall = time.perf_counter() - w0
stop.set()
th.join()
import resource
print(json.dumps({{"start": start, "imports": imports, "model": model, "peak": top[0],
                  "at_peak": list(top[1]), "stage_peak": peak, "stage_cpu": cpu,
                  "traced": traced if tracing else None, "wall": wall, "digests": digests,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_checkpoint(path: Path, preset: str) -> str:
    spec = ("ModelSpec(version='tiny-bench', latent_dim=128, d_model=16, n_layers=1, n_heads=2, "
            "ffn_dim=32, dropout=0.0, projector_dim=32, projector_layers=1, sample_steps=8)"
            if preset == "tiny" else "ModelSpec.preset('small')")
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r})\n"
            "from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint\n"
            f"torch.manual_seed(0)\nsave_checkpoint(build_checkpoint(TesseraModel({spec})), "
            f"{str(path)!r})\n")
    subprocess.run([PY, "-c", code], check=True)
    return str(path)


def run_case(base: Path, n: int, ckpt: str, tracing: bool) -> dict:
    base.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE",
           "PREFECT_HOME": str(base / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    code = CHILD.format(root=str(ROOT), n=n, tracing=tracing, base=str(base), ckpt=ckpt)
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        sys.exit(f"case of {n} tile(s) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="also trace each stage's Python/numpy allocations (slow)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stage-mem-") as d:
        ckpt = make_checkpoint(Path(d) / "model.pt", a.preset)
        for n in a.tiles:
            la = "/".join(f"{x:.1f}" for x in os.getloadavg())
            r = run_case(Path(d) / f"n{n}", n, ckpt, a.tracemalloc and n == 1)
            print(f"\n{n} tile(s) in flight ({a.preset} model), load before {la}: "
                  f"RSS at start {r['start']:.0f} MB, after imports {r['imports']:.0f}, after the "
                  f"model load {r['model']:.0f}; peak {r['peak']:.0f} (ru_maxrss "
                  f"{r['maxrss']:.0f}) while {', '.join(r['at_peak']) or '-'} ran; wall "
                  f"{r['wall']:.1f} s")
            print("| stage | peak RSS MB | above the fixed footprint MB | "
                  + ("process CPU s |" if n == 1 else "thread CPU s (all tiles) |")
                  + (" traced peak MB |" if r["traced"] else ""))
            print("|---|---|---|---|" + ("---|" if r["traced"] else ""))
            for s, p in r["stage_peak"].items():
                extra = f" {r['traced'][s]:.0f} |" if r["traced"] else ""
                print(f"| {s} | {p:.0f} | {p - r['model']:.0f} | {r['stage_cpu'][s]:.2f} |{extra}")
            print("embedding digests:", json.dumps(r["digests"], sort_keys=True))


if __name__ == "__main__":
    main()
