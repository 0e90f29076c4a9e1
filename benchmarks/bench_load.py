"""Benchmark: torch threads on a busy machine, and ``tessera demo`` quiet vs under load.

Usage::

    python benchmarks/bench_load.py [--busy 2] [--pixels 2048] [--no-demo] [--demo-set KEY=VALUE ...]

Part 1, threads: ``embed_pixels`` of the ``small`` model over ``--pixels`` pixels, in a fresh
process per case, with 1 and 2 intra-op threads, with GNU OpenMP's default wait policy
(threads spin about 3 ms at every barrier) and with ``OMP_WAIT_POLICY=PASSIVE`` (what the
factory sets, tasks/threads.py), on the machine as it is ("quiet") and with ``--busy``
busy-loop processes beside it ("loaded").

Part 2, the demo: ``tessera demo`` into fresh roots (the ephemeral Prefect server included),
first as the machine is, then with ``--busy`` busy-loop processes beside it; wall and CPU
seconds of the command's process tree, and the ratio loaded / quiet.

The busy processes are ``python -c "while True: pass"``, ended by pid at the end. The load
average before each case is printed (other work on the machine shows there).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

EMBED = r"""
import os, sys, time
import numpy as np
import torch
sys.path.insert(0, {root!r})
from tessera_model import ModelSpec, TesseraModel, embed_pixels
torch.set_num_threads({threads})
torch.manual_seed(0)
m = TesseraModel(ModelSpec.preset("small")).eval()
rng = np.random.default_rng(0)
P, T, T1 = {pixels}, 40, 30
s2 = rng.integers(1, 5000, (P, T, 10)).astype(np.uint16)
s1 = rng.integers(-2000, 0, (P, T1, 2)).astype(np.int16)
d2 = np.arange(T, dtype=np.uint16) * 9 + 1
d1 = np.arange(T1, dtype=np.uint16) * 12 + 1
args = (m, s2, np.ones((P, T), bool), d2, s1, np.ones((P, T1), bool), d1, d1.astype(np.int64),
        np.arange(P, dtype=np.uint64))
embed_pixels(*args, seed=0, batch_size=256, device="cpu")  # warm-up
t0, c0 = time.perf_counter(), time.process_time()
embed_pixels(*args, seed=0, batch_size=256, device="cpu")
print(time.perf_counter() - t0, time.process_time() - c0)
"""


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


@contextmanager
def busy(n: int) -> Iterator[None]:
    """``n`` busy-loop processes for the duration of the block (ended by pid)."""
    procs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def embed_case(threads: int, passive: bool, pixels: int) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([PY, "-c", EMBED.format(root=str(ROOT), threads=threads, pixels=pixels)],
                         env=env, capture_output=True, text=True, check=True, timeout=3600)
    wall, cpu = (float(x) for x in out.stdout.split()[-2:])
    return wall, cpu


def threads_part(n_busy: int, pixels: int) -> None:
    print(f"### embed_pixels, small model, {pixels} pixels (fresh process per case)\n")
    print("| machine | OpenMP wait | threads | wall s | CPU s | wall / (1 thread, same row group) |")
    print("|---|---|---|---|---|---|")
    for label, n in (("as is", 0), (f"+{n_busy} busy processes", n_busy)):
        with busy(n):
            for passive in (False, True):
                la = load_avg()
                one = embed_case(1, passive, pixels)
                two = embed_case(2, passive, pixels)
                wait = "PASSIVE" if passive else "default (spin)"
                for t, (w, c) in ((1, one), (2, two)):
                    print(f"| {label} (load {la}) | {wait} | {t} | {w:.2f} | {c:.2f} | "
                          f"{w / one[0]:.2f} |", flush=True)


def run_demo(root: Path, extra: list[str]) -> tuple[float, float, int]:
    """Wall s, CPU s (user+sys of the process tree) and exit status of one ``tessera demo``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [PY, "-m", "deployments.cli", "demo", "--output", str(root / "out"), "--work",
           str(root / "work"), *[x for s in extra for x in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    with open(root / "demo.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, rc


def demo_part(n_busy: int, extra: list[str]) -> None:
    print("\n### tessera demo, fresh roots\n")
    print("| machine | wall s | CPU s (process tree) | exit | wall / quiet |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as d:
        quiet = None
        for label, n in (("as is", 0), (f"+{n_busy} busy processes", n_busy)):
            root = Path(d) / f"busy{n}"
            root.mkdir()
            with busy(n):
                la = load_avg()
                wall, cpu, rc = run_demo(root, extra)
            quiet = quiet or wall
            print(f"| {label} (load {la}) | {wall:.1f} | {cpu:.1f} | {rc} | {wall / quiet:.2f} |",
                  flush=True)
            if rc != 0:
                print((root / "demo.log").read_text()[-3000:], file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=2, help="Busy-loop processes for the loaded runs.")
    ap.add_argument("--pixels", type=int, default=2048)
    ap.add_argument("--no-threads", action="store_true", help="Skip part 1.")
    ap.add_argument("--no-demo", action="store_true", help="Skip part 2.")
    ap.add_argument("--demo-set", action="append", default=[], metavar="KEY=VALUE",
                    help="--set options for the demo runs.")
    a = ap.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}, load before: {load_avg()}\n")
    if not a.no_threads:
        threads_part(a.busy, a.pixels)
    if not a.no_demo:
        demo_part(a.busy, a.demo_set)


if __name__ == "__main__":
    main()
