"""Pipeline benchmarks: d-pixel extraction MB/s and the README demo's wall time.

Usage:
    python benchmarks/bench_pipeline.py              # stages + demo (first run and cached re-run)
    python benchmarks/bench_pipeline.py --no-demo    # stages only

Extraction throughput is reported in MB of d-pixel arrays produced (uncompressed) per second,
next to a baseline in the same run: reading the S2 scene bands and rewriting them with the
d-pixel chunks and codec (the I/O + compression floor of extraction on this machine).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zarr


def bench_stages(tmp: Path) -> None:
    from tasks.acquire import acquire
    from tasks.config import DPixelConfig, MaskConfig, SourceConfig, StorageConfig
    from tasks.dpixels import extract_dpixels
    from tasks.grid import Tile
    from tasks.mask import cloud_mask

    st = StorageConfig(output_uri=str(tmp / "out"), work_uri=str(tmp / "work"))
    tile = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
    t0 = time.perf_counter()
    sc = acquire(tile, 2024, SourceConfig(), st)
    t1 = time.perf_counter()
    mk = cloud_mask(sc, MaskConfig(), st)
    t2 = time.perf_counter()
    dp = extract_dpixels(sc, mk, DPixelConfig(), st)
    t3 = time.perf_counter()
    g = zarr.open_group(dp.uri, mode="r")
    nbytes = sum(g[k].nbytes for k in g.array_keys())
    # Baseline: copy the same S2 band bytes scene-zarr -> d-pixel-shaped zarr with the same
    # chunks and codec, i.e. the I/O + compression floor of extraction on this machine.
    t4 = time.perf_counter()
    s2 = zarr.open_group(sc.uri, mode="r")["s2_bands"][:]
    dst = zarr.open_group(str(tmp / "baseline.zarr"), mode="w")
    dst.create_array("bands", data=s2, chunks=g["bands"].chunks, compressors=g["bands"].compressors)
    t5 = time.perf_counter()
    print("| stage (one 256-px tile, one year) | seconds | MB/s |")
    print("|---|---|---|")
    print(f"| acquire (synthetic Earth: {sc.n_s2} S2 + {sc.n_s1_ascending + sc.n_s1_descending} S1 dates) | {t1 - t0:.2f} | |")
    print(f"| cloud mask | {t2 - t1:.2f} | |")
    print(f"| d-pixel extraction ({nbytes / 1e6:.0f} MB of arrays) | {t3 - t2:.2f} | {nbytes / 1e6 / (t3 - t2):.0f} |")
    print(f"| baseline: zarr read + rewrite of the S2 scene bands, same chunks/codec ({s2.nbytes / 1e6:.0f} MB) | {t5 - t4:.2f} | {s2.nbytes / 1e6 / (t5 - t4):.0f} |")
    print(f"| ratio extraction MB/s / baseline MB/s | | {(nbytes / (t3 - t2)) / (s2.nbytes / (t5 - t4)):.2f} |")


def bench_demo(tmp: Path) -> None:
    cmd = [sys.executable, "-m", "deployments.cli", "demo", "--output", str(tmp / "demo-out"),
           "--work", str(tmp / "demo-work")]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    print()
    print("| README demo (`tessera demo`) | wall seconds |")
    print("|---|---|")
    print(f"| first run (empty work dir, ephemeral Prefect server) | {times[0]:.1f} |")
    print(f"| cached re-run | {times[1]:.1f} |")
    print(f"| ratio first / cached | {times[0] / times[1]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-demo", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        bench_stages(Path(d))
        if not a.no_demo:
            bench_demo(Path(d))


if __name__ == "__main__":
    main()
