"""Benchmark: how a build scales with its number of tiles (time per tile, peak memory).

Usage::

    python benchmarks/bench_scale.py [--tiles 1 4 16] [--workers 2] [--preset tiny|small]
                                     [--profile]

Each build runs the ``build-region`` flow from a fresh process (``tessera build`` through
``deployments.cli.main``, the ephemeral Prefect server included) into fresh roots: a square
region of exactly N tiles of 256 px (the smallest tile size; zone 31N, synthetic Earth),
training off with a fixed checkpoint (``--preset tiny``: a tiny fixed model, so the stages
around the model show; ``small``: a random-init ``small`` model checkpoint), threads runner
with ``--workers`` workers. Reported per build: the stages flow's seconds (BuildResult) and
the command's wall seconds, each per tile, and the build process's peak RSS
(``ru_maxrss``; the temporary server is a separate process and not counted). Ratios: time
per tile of N tiles / of 4 tiles, and peak RSS of N tiles / of 1 tile. ``--profile`` also
samples the build process's RSS every 5 ms and reports the stages running at its peak and each
stage's highest RSS (the stage functions wrapped in the build process; a little CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TILE_M = 2560  # 256 px of 10 m

RUN = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
from deployments import cli
from tasks.config import build_config
cfg = build_config(None, json.loads({cfg!r}))
cli.ensure_prefect_api()
from flows.build import build_region, plan
n = len(plan(cfg))
prof = None
if {profile!r}:  # RSS every 5 ms; each stage's highest RSS seen while it ran; who ran at the peak
    from tasks import acquire, catalog, dpixels, embed, mask, preview, publish
    running, lock, stop = {{}}, threading.Lock(), threading.Event()
    prof = {{"stage_peak_mb": {{}}, "peak_mb": 0.0, "at_peak": [], "imports_mb": rss()}}
    def wrap(mod, name, label):
        fn = getattr(mod, name)
        def run(*a, **k):
            me = object()
            with lock:
                running[me] = label
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    del running[me]
        setattr(mod, name, run)
    for mod, name, label in ((acquire, "acquire", "acquire"), (mask, "cloud_mask", "mask"),
                             (dpixels, "extract_dpixels", "dpixels"), (embed, "embed_tile", "embed"),
                             (publish, "publish_tile", "publish"), (preview, "make_preview", "preview"),
                             (catalog, "update_catalog", "catalogue")):
        wrap(mod, name, label)
    def sample():
        while not stop.is_set():
            r = rss()
            with lock:
                now = sorted(running.values())
            for s in set(now):
                prof["stage_peak_mb"][s] = max(prof["stage_peak_mb"].get(s, 0.0), r)
            if r > prof["peak_mb"]:
                prof["peak_mb"], prof["at_peak"] = r, now
            time.sleep(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
r = build_region(config=cfg)
if prof is not None:
    stop.set()
    sampler.join()
print(json.dumps({{"tiles": n, "stages_s": r.seconds, "wall_s": time.perf_counter() - t0,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "profile": prof}}))
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


def region(n: int) -> dict:
    """A quadrilateral just inside k x k tiles of zone 31N (n = k * k)."""
    from pyproj import Transformer

    k = int(round(math.sqrt(n)))
    assert k * k == n, f"expected a square number of tiles, got {n}"
    x0, y0, m = 302080, 5788160, 50.0
    x1, y1 = x0 + k * TILE_M, y0 - k * TILE_M
    inv = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)
    ring = [list(inv.transform(x, y)) for x, y in
            [(x0 + m, y0 - m), (x1 - m, y0 - m), (x1 - m, y1 + m), (x0 + m, y1 + m), (x0 + m, y0 - m)]]
    return {"geojson": {"type": "Polygon", "coordinates": [ring]}, "name": f"scale{n}"}


def run_build(root: Path, n: int, ckpt: str, workers: int, profile: bool = False) -> dict:
    cfg = {"region": region(n), "year": 2023,
           "storage": {"output_uri": str(root / "out"), "work_uri": str(root / "work")},
           "training": {"enabled": False, "checkpoint_uri": ckpt},
           "runner": {"kind": "threads", "max_workers": workers}}
    (root / "home").mkdir(parents=True)
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # as the CLI sets them
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ, "PYTHONPATH": str(ROOT),
           "PREFECT_HOME": str(root / "home"), "PREFECT_LOGGING_LEVEL": "WARNING",
           "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([PY, "-c", RUN.format(root=str(ROOT), cfg=json.dumps(cfg), profile=profile)], env=env,
                         capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        sys.exit(f"build of {n} tiles failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--profile", action="store_true",
                    help="sample RSS every 5 ms and name the stages running at the peak")
    a = ap.parse_args()
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        base = Path(d)
        ckpt = make_checkpoint(base / "model.pt", a.preset)
        print(f"checkpoint: {a.preset}, workers: {a.workers}, 256-px tiles")
        print("| tiles | load before | stages s | stages s / tile | wall s | wall s / tile | "
              "peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for n in a.tiles:
            la = "/".join(f"{x:.1f}" for x in os.getloadavg())
            r = run_build(base / f"n{n}", n, ckpt, a.workers, a.profile)
            assert r["tiles"] == n, r
            res[n] = r
            print(f"| {n} | {la} | {r['stages_s']:.1f} | {r['stages_s'] / n:.2f} | "
                  f"{r['wall_s']:.1f} | {r['wall_s'] / n:.2f} | {r['maxrss_mb']:.0f} |", flush=True)
            if (pf := r["profile"]) is not None:
                print(f"  profile: RSS {pf['imports_mb']:.0f} MB after imports; peak "
                      f"{pf['peak_mb']:.0f} while {', '.join(pf['at_peak']) or 'no stage'} ran; "
                      "stage peaks " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                 sorted(pf["stage_peak_mb"].items())), flush=True)
    print()
    ref_t = 4 if 4 in res else min(res)
    ref_m = min(res)
    for n, r in res.items():
        print(f"- {n} tiles: stages time per tile / {ref_t}-tile = "
              f"{(r['stages_s'] / n) / (res[ref_t]['stages_s'] / ref_t):.2f}; wall per tile / "
              f"{ref_t}-tile = {(r['wall_s'] / n) / (res[ref_t]['wall_s'] / ref_t):.2f}; peak RSS / "
              f"{ref_m}-tile = {r['maxrss_mb'] / res[ref_m]['maxrss_mb']:.2f}")


if __name__ == "__main__":
    main()
