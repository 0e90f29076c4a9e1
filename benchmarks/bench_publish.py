"""Benchmark: publish (quantise + sharded Zarr write) against raw writes of the same bytes.

Measures, on local disk, in one run:

- ``publish``: :func:`tasks.publish.publish_tile` on one tile (content hash pass, read,
  quantise, Blosc-zstd sharded write of embeddings and scales, record);
- ``quantise``: :func:`tessera_model.quantise.quantise` alone, in memory;
- ``raw_npy``: ``np.save`` of the same int8 embeddings and float32 scales (132 B/pixel);
- ``raw_file``: a plain ``write`` of those bytes.

Throughput is in MB/s (10^6 bytes) of the published product, 132 bytes per pixel, so the
figures compare directly; ``ratio`` = publish time / raw_npy time.

Usage::

    PYTHONPATH=. python benchmarks/bench_publish.py --size-px 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from tasks.config import PublishConfig, StorageConfig
from tasks.grid import Tile
from tasks.publish import prepare_zone_stores, publish_tile
from tasks.refs import EmbeddingRef
from tessera_model.quantise import quantise

BYTES_PER_PIXEL = 128 + 4


def _best(fn: Callable[[int], None], repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-px", type=int, default=512, help="Tile side (multiple of 256).")
    p.add_argument("--repeats", type=int, default=3, help="Runs per measurement (best kept).")
    p.add_argument("--nodata", type=float, default=0.05, help="Fraction of no-data pixels.")
    p.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    args = p.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-publish-"))
    root.mkdir(parents=True, exist_ok=True)
    n = args.size_px
    step = n * 10  # tiles align to multiples of their own size (metres)
    tile = Tile(
        zone=31, south=False, x0=302080 // step * step, y0=5785600 // step * step, size_px=n
    )
    rng = np.random.default_rng(0)
    e = rng.normal(size=(n, n, 128)).astype(np.float32)
    e[rng.random((n, n)) < args.nodata] = np.nan
    emb_uri = str(root / "emb.zarr")
    zarr.open_group(emb_uri, mode="w").create_array("embedding", data=e, chunks=(256, 256, 128))
    emb = EmbeddingRef(uri=emb_uri, key="bench", tile=tile, n_valid=0, n_nodata=0)
    cfg = PublishConfig()
    product_mb = n * n * BYTES_PER_PIXEL / 1e6

    def run_publish(i: int) -> None:
        storage = StorageConfig(output_uri=str(root / f"out{i}"), work_uri=str(root / "work"))
        prepare_zone_stores([tile], 2024, cfg, storage, "bench")
        publish_tile(emb, 2024, cfg, storage, "bench")

    q, s = quantise(e)

    def run_quantise(_: int) -> None:
        quantise(e)

    def run_raw_npy(i: int) -> None:
        np.save(root / f"q{i}.npy", q)
        np.save(root / f"s{i}.npy", s)

    def run_raw_file(i: int) -> None:
        with open(root / f"raw{i}.bin", "wb") as f:
            f.write(q.tobytes())
            f.write(s.tobytes())

    t = {
        "publish": _best(run_publish, args.repeats),
        "quantise": _best(run_quantise, args.repeats),
        "raw_npy": _best(run_raw_npy, args.repeats),
        "raw_file": _best(run_raw_file, args.repeats),
    }
    stored = sum(f.stat().st_size for f in (root / "out0" / "2024.zarr").rglob("*") if f.is_file())
    result = {
        "size_px": n,
        "product_MB": round(product_mb, 1),
        "float_input_MB": round(e.nbytes / 1e6, 1),
        "stored_MB": round(stored / 1e6, 1),
        "MB_per_s": {k: round(product_mb / v, 1) for k, v in t.items()},
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "ratio_publish_over_raw_npy": round(t["publish"] / t["raw_npy"], 1),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "zarr": zarr.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
