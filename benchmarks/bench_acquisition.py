"""Benchmark: Sentinel Hub acquisition throughput against the local endpoint.

Runs :func:`tasks.acquire.acquire` for one tile through the real sentinelhub-py client, with
1 thread and with the default concurrency (``SentinelHubConfig.max_threads``), each into a
fresh work root (no response cache), twice per setting:

- ``cold``: the endpoint renders every response from the synthetic Earth (its CPU cost is
  part of the time, as a real service's latency would be);
- ``warm``: the endpoint answers from memory (``EndpointConfig.memo_responses``), so the
  time is the client's: HTTP, TIFF decoding, stitching, response cache and Zarr writes.

Scenes are (date, modality) observations of the tile: S2 dates + S1 ascending + descending.
MB are response bytes on the wire.

Usage::

    python benchmarks/bench_acquisition.py [--size 256] [--months 4 5 6] [--threads 1 4]
        [--fault-rate 0]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.acquire import acquire  # noqa: E402
from tasks.config import SourceConfig, StorageConfig  # noqa: E402
from tasks.grid import Tile  # noqa: E402
from tasks.sources._sh_config import SentinelHubConfig  # noqa: E402
from tasks.sources.shub_endpoint import EndpointConfig, FaultConfig, LocalEndpoint  # noqa: E402

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"


def run(ep: LocalEndpoint, tile: Tile, threads: int, root: Path) -> dict[str, float]:
    cfg = SourceConfig.model_validate({"kind": "sentinelhub", "sentinelhub": {
        "preset": "custom", "base_url": ep.url, "max_threads": threads, "download_sleep_s": 0.05}})
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    b0, p0 = ep.stats.bytes_out, ep.stats.process
    t0 = time.perf_counter()
    ref = acquire(tile, 2024, cfg, storage)
    dt = time.perf_counter() - t0
    scenes = ref.n_s2 + ref.n_s1_ascending + ref.n_s1_descending
    mb = (ep.stats.bytes_out - b0) / 1e6
    return {"s": dt, "scenes": scenes, "requests": ep.stats.process - p0, "mb": mb,
            "scenes_s": scenes / dt, "mb_s": mb / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="Tile side, px (multiple of 256).")
    ap.add_argument("--months", type=int, nargs="*", default=[4, 5, 6])
    ap.add_argument("--threads", type=int, nargs="*",
                    default=[1, SentinelHubConfig().max_threads])
    ap.add_argument("--fault-rate", type=float, default=0.0)
    a = ap.parse_args()
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp()
    os.environ["SH_CLIENT_ID"], os.environ["SH_CLIENT_SECRET"] = CLIENT_ID, CLIENT_SECRET
    tile = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=a.size)
    cfg = EndpointConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, months=tuple(a.months),
                         memo_responses=100_000, faults=FaultConfig(rate=a.fault_rate, seed=1))
    print(f"# acquisition, {a.size} px tile, months {a.months}, fault rate {a.fault_rate}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| endpoint | threads | scenes | requests | MB | s | scenes/s | MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with LocalEndpoint(cfg) as ep, tempfile.TemporaryDirectory() as tmp:
        for mode in ("cold", "warm"):
            for threads in a.threads:
                if mode == "cold":  # each cold run renders everything (and refills the memo)
                    ep.state.memo.clear()
                r = run(ep, tile, threads, Path(tmp) / f"{mode}-{threads}")
                print(f"| {mode} | {threads} | {r['scenes']:.0f} | {r['requests']:.0f} | "
                      f"{r['mb']:.1f} | {r['s']:.2f} | {r['scenes_s']:.1f} | {r['mb_s']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
