"""Benchmark: publish (quantise + sharded Zarr write) against raw writes of the same bytes.

Measures, on local disk, in one run:

- ``publish``: :func:`tasks.publish.publish_tile` on one tile (content hash pass, read,
  quantise, Blosc-zstd sharded write of embeddings and scales, record);
- ``quantise``: :func:`tessera_model.quantise.quantise` alone, in memory;
- ``raw_npy``: ``np.save`` of the same int8 embeddings and float32 scales (132 B/pixel);
- ``raw_file``: a plain ``write`` of those bytes;
- with ``--s3`` (default): ``publish_s3`` (the same publish to a loopback S3 endpoint, moto
  in server mode started here, through s3fs) next to ``raw_s3`` (one PUT per array of the
  same int8 + float32 bytes), then read latencies from that endpoint through
  :mod:`tasks.reader`: one pixel vector by lon/lat (``pixel_read_ms``) and a 1 km x 1 km
  window (100 x 100 px x 128, dequantised) (``window_1km_read_ms``), median of ``--reads``
  reads at random places, and the same two reads from local disk.

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
    p.add_argument("--no-s3", dest="s3", action="store_false", help="Skip the S3 rows.")
    p.add_argument("--reads", type=int, default=20, help="Reads per latency figure.")
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
    if args.s3:
        t.update(_s3_rows(args, root, tile, emb, cfg, q, s))
    lat = _read_latency(
        str(root / "out0"), StorageConfig(output_uri=str(root / "out0")), tile, args.reads
    )
    stored = sum(f.stat().st_size for f in (root / "out0" / "2024.zarr").rglob("*") if f.is_file())
    result = {
        "size_px": n,
        "product_MB": round(product_mb, 1),
        "float_input_MB": round(e.nbytes / 1e6, 1),
        "stored_MB": round(stored / 1e6, 1),
        "MB_per_s": {k: round(product_mb / v, 1) for k, v in t.items() if not k.endswith("_ms")},
        "seconds": {k: round(v, 3) for k, v in t.items() if not k.endswith("_ms")},
        "read_ms": {
            "local": lat,
            **(
                {"s3_loopback": {k: v for k, v in t.items() if k.endswith("_ms")}}
                if args.s3
                else {}
            ),
        },
        "ratio_publish_over_raw_npy": round(t["publish"] / t["raw_npy"], 1),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "zarr": zarr.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.dir is None:
        shutil.rmtree(root)


def _read_latency(output_uri: str, storage: StorageConfig, tile: Tile, reads: int) -> dict:
    """Median latency (ms) of one pixel vector and of a 1 km x 1 km window, random places."""
    from pyproj import Transformer

    from tasks.reader import open_region, pixel_vector

    to_ll = Transformer.from_crs(tile.epsg, 4326, always_xy=True)
    rng = np.random.default_rng(1)
    px, win = [], []
    for _ in range(reads):
        x = tile.x0 + rng.uniform(5, tile.width * 10 - 1005)
        y = tile.y0 - rng.uniform(5, tile.height * 10 - 1005)
        t0 = time.perf_counter()
        pixel_vector(output_uri, 2024, *to_ll.transform(x, y), storage)
        px.append(time.perf_counter() - t0)
        w, s_ = to_ll.transform(x, y - 1000)
        e, n_ = to_ll.transform(x + 1000, y)
        t0 = time.perf_counter()
        da = open_region(output_uri, 2024, (w, s_, e, n_), storage)
        win.append(time.perf_counter() - t0)
    return {
        "pixel_read_ms": round(1e3 * float(np.median(px)), 1),
        "window_1km_read_ms": round(1e3 * float(np.median(win)), 1),
        "window_shape": list(da.shape),
    }


def _s3_rows(args, root, tile, emb, cfg, q, s) -> dict:  # noqa: ANN001
    """Publish and raw PUTs to moto on loopback, and read latencies from there."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bench")
    try:

        def run_publish_s3(i: int) -> None:
            storage = StorageConfig(
                output_uri=f"s3://bench/out{i}",
                work_uri=str(root / "work"),
                s3_endpoint_url=endpoint,
            )
            prepare_zone_stores([tile], 2024, cfg, storage, "bench")
            publish_tile(emb, 2024, cfg, storage, "bench")

        def run_raw_s3(i: int) -> None:
            fs.pipe_file(f"bench/raw{i}/q.bin", q.tobytes())
            fs.pipe_file(f"bench/raw{i}/s.bin", s.tobytes())

        out = {
            "publish_s3": _best(run_publish_s3, args.repeats),
            "raw_s3": _best(run_raw_s3, args.repeats),
        }
        storage = StorageConfig(output_uri="s3://bench/out0", s3_endpoint_url=endpoint)
        lat = _read_latency(storage.output_uri, storage, tile, args.reads)
        out.update({k: v for k, v in lat.items() if k.endswith("_ms")})
        return out
    finally:
        server.stop()


if __name__ == "__main__":
    main()
