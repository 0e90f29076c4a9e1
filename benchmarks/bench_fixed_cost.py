"""Benchmark: CPU spent outside the stages by a command-line build (the fixed cost).

Usage::

    python benchmarks/bench_fixed_cost.py [--demo-root DIR] [--no-demo] [--no-running-server]

CPU-s = user + sys of the ``tessera`` process tree (``RUSAGE_CHILDREN``; the temporary
Prefect server is a child of the command and is counted). Cases, in one run, each with its
own empty ``PREFECT_HOME``:

- **1-tile build**: ``tessera build`` of one 256-px tile (synthetic Earth, training off, a
  fixed tiny checkpoint) into fresh roots. Its stages' own CPU is measured by running the
  same stage functions in a plain loop in a fresh process (CPU of the loop only, imports
  excluded); fixed cost = command CPU - stage CPU.
- **cached demo re-run**: ``tessera demo`` again over a finished demo's roots
  (``--demo-root``, made first if missing: one full demo). Every stage is served from cache,
  so the command's whole CPU is fixed cost.
- each of those again with a **running server** (``tessera server``, started once before,
  found through its record in ``PREFECT_HOME``; no ``PREFECT_API_URL`` set): the command's
  CPU, and the server's CPU during the command shown beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
THREADS = 1 if (ROOT / "tasks" / "threads.py").exists() else len(os.sched_getaffinity(0))
"""Torch threads of the stage loop: as a build's worker runs them (the code before
tasks/threads.py ran every worker with all cores)."""
BBOX = ("0.105", "52.192", "0.125", "52.200")  # inside one 256-px tile of zone 31N

STAGES = r"""
import sys, time
sys.path.insert(0, {root!r})
from flows.build import plan
from tasks import acquire, catalog, dpixels, embed, mask, preview, publish, train
from tasks.config import build_config
cfg = build_config(None, {{"region": {{"bbox": {bbox}, "name": "fixed"}}, "year": 2023,
    "storage": {{"output_uri": {out!r}, "work_uri": {work!r}}},
    "training": {{"enabled": False, "checkpoint_uri": {ckpt!r}}}}})
import torch
torch.set_num_threads({threads})  # what a worker uses: 1 with 2 workers on 2 cores (before: all)
c0, t0 = time.process_time(), time.perf_counter()
st = cfg.storage
tiles = plan(cfg)
ck = train.given_checkpoint(cfg.training.checkpoint_uri, cfg.model, st)
publish.prepare_zone_stores(tiles, cfg.year, cfg.publish, st, ck.model_version)
pubs, per = [], {{}}
def timed(name, f, *args):
    c = time.process_time()
    out = f(*args)
    per[name] = per.get(name, 0.0) + time.process_time() - c
    return out
for t in tiles:
    sc = timed("acquire", acquire.acquire, t, cfg.year, cfg.source, st)
    mk = timed("mask", mask.cloud_mask, sc, cfg.mask, st)
    dp = timed("dpixels", dpixels.extract_dpixels, sc, mk, cfg.dpixels, st)
    e = timed("embed", embed.embed_tile, dp, ck, cfg.embedding, cfg.seed, st)
    pubs.append(timed("publish", publish.publish_tile, e, cfg.year, cfg.publish, st, ck.model_version))
for g in sorted({{p.group for p in pubs}}):
    publish.refresh_n_tiles(st.output_uri, cfg.year, g, st)
    timed("preview", lambda: preview.make_preview(st.output_uri, cfg.year, g, st, cfg.publish,
                                                  max_side=512))
timed("catalog", catalog.update_catalog, st.output_uri, cfg.year, st, cfg.publish)
print(" ".join(f"{{k}}={{v:.2f}}" for k, v in per.items()), file=sys.stderr)
print(len(tiles), time.process_time() - c0, time.perf_counter() - t0)
"""


def tiny_checkpoint(path: Path) -> str:
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r})\n"
            "from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint\n"
            "torch.manual_seed(0)\n"
            "spec = ModelSpec(version='tiny-bench', latent_dim=128, d_model=16, n_layers=1, "
            "n_heads=2, ffn_dim=32, dropout=0.0, projector_dim=32, projector_layers=1, "
            "sample_steps=8)\n"
            f"save_checkpoint(build_checkpoint(TesseraModel(spec)), {str(path)!r})\n")
    subprocess.run([PY, "-c", code], check=True)
    return str(path)


def env_for(home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home),
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    return env


def cli(args: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall s and CPU s (process tree) of one ``tessera`` command; fails on a non-zero exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([PY, "-m", "deployments.cli", *args], env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"tessera {' '.join(args)} exited {rc}:\n{log.read_text()[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_cpu(root: Path, ckpt: str) -> tuple[float, float]:
    code = STAGES.format(root=str(ROOT), bbox=list(map(float, BBOX)), out=str(root / "out"),
                         work=str(root / "work"), ckpt=ckpt, threads=THREADS)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True,
                         env=env_for(root / "home"))
    n, cpu, wall = out.stdout.split()[-3:]
    assert int(n) == 1, n
    print(f"stage CPU-s of the tile (tiny model): {out.stderr.strip().splitlines()[-1]}")
    return float(cpu), float(wall)


def tree_cpu(pid: int) -> float:
    """CPU s so far of a process and its descendants."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def start_tessera_server(home: Path, port: int) -> subprocess.Popen:
    env = env_for(home)
    proc = subprocess.Popen([PY, "-m", "deployments.cli", "server", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = home / "tessera-server.json"
    deadline = time.monotonic() + 300
    while not record.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tessera server did not start")
        time.sleep(0.5)
    time.sleep(3)  # let the deployments register
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-root", help="Roots of a finished demo (out/, work/); made if missing.")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--no-running-server", action="store_true")
    ap.add_argument("--port", type=int, default=4290)
    ap.add_argument("--demo-set", action="append", default=[], metavar="KEY=VALUE",
                    help="--set options of the demo (first run and re-runs alike).")
    a = ap.parse_args()
    rows = []
    demo_sets = [x for s in a.demo_set for x in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as d:
        base = Path(d)
        ckpt = tiny_checkpoint(base / "tiny.pt")
        print(f"load before: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        cpu_st, wall_st = stage_cpu(base / "stages", ckpt)
        print(f"stages of the 1-tile build, plain loop: {cpu_st:.1f} CPU-s, {wall_st:.1f} s",
              flush=True)
        demo = Path(a.demo_root) if a.demo_root else base / "demo"
        if not a.no_demo and not (demo / "out").exists():
            demo.mkdir(parents=True, exist_ok=True)
            w, c = cli(["demo", "--output", str(demo / "out"), "--work", str(demo / "work"),
                        *demo_sets],
                       env_for(base / "home-demo0"), base / "demo0.log")
            print(f"first demo run (to cache it): {w:.0f} s, {c:.0f} CPU-s", flush=True)

        def cases(tag: str, home: Path, server_pid: int | None) -> None:
            n = len(rows)
            tile = ["build", "--bbox", *BBOX, "--year", "2023", "--set", "training.enabled=false",
                    "--set", f"training.checkpoint_uri={ckpt}", "--output",
                    str(base / f"tile-{tag}" / "out"), "--work", str(base / f"tile-{tag}" / "work")]
            todo = [("1-tile build", tile, cpu_st)]
            if not a.no_demo:
                todo.append(("cached demo re-run", ["demo", "--output", str(demo / "out"),
                                                    "--work", str(demo / "work"), *demo_sets],
                             0.0))
            for what, args, st in todo:
                s0 = tree_cpu(server_pid) if server_pid else 0.0
                w, c = cli(args, env_for(home), base / f"{tag}-{len(rows)}.log")
                srv = tree_cpu(server_pid) - s0 if server_pid else None
                rows.append((what, tag, w, c, st, c - st, srv))
                r = rows[-1]
                print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | **{r[5]:.1f}** | "
                      f"{'-' if r[6] is None else f'{r[6]:.1f}'} |", flush=True)
            assert len(rows) > n

        print("\n| case | Prefect API | wall s | CPU-s (command tree) | stage CPU-s | CPU-s outside "
              "stages | server CPU-s during |")
        print("|---|---|---|---|---|---|---|")
        cases("temporary server", base / "home-tmp", None)
        if not a.no_running_server:
            home = base / "home-srv"
            proc = start_tessera_server(home, a.port)
            try:
                cases("running tessera server", home, proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
