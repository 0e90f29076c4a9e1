"""Benchmark: a tile's publish against its floor, the write of the same final arrays.

Measured in one run, on local disk and (``--s3``, default) on a loopback S3 endpoint (moto in
server mode, started here, through s3fs):

- ``publish``: :func:`tasks.publish.publish_tile` on one tile into a freshly prepared zone
  group (:func:`tasks.publish.prepare_zone_stores` runs before the clock starts): read the
  float embeddings, content hash, quantise, Blosc-zstd sharded write of ``embeddings`` and
  ``scales``, tile record, lease and ``tessera:n_tiles``;
- ``floor``: writing the same final int8 ``embeddings`` and float32 ``scales`` into a
  freshly prepared zone group of the same codecs and shard layout, in one assignment each
  (zarr encodes and writes the shards concurrently): what publishing cannot beat, since it
  must produce exactly those arrays. ``ratio_publish_over_floor`` is the target figure
  (<= 2: publishing at >= 50 % of its floor);
- ``republish_same``: publishing the same tile again (read and hash, then skipped);
- components, one thread, in memory: ``quantise`` (:func:`tessera_model.quantise.quantise`
  on one 256 x 1,024 write block) next to ``quantise_full_array`` (the plain full-array
  formula, the implementation before streaming), ``sha256`` of the same block, and
  ``read_float`` (reading the whole float tile back from its Zarr store).

The input mimics the embed stage's output: float32 (H, W, 128), 64 x 64 chunks, no codec,
its ``content_sha256`` attribute computed as the embed stage computes it
(:mod:`tasks.publish.digest`), seeded N(0, 1) values with ``--nodata`` NaN pixels.
``--input-codec zstd --hash-in-publish`` gives the embed stage's output before (zarr's default
zstd, ~92 % of raw for these values, no hash): publishing then decodes and hashes it. Publish and floor throughputs are MB/s (10^6 B) of the
published product, 132 B/pixel; quantise, sha256 and read are MB/s of float input. Best of
``--repeats``. Then read latencies through :mod:`tasks.reader` (one pixel vector by lon/lat,
a 1 km x 1 km dequantised window), median of ``--reads`` reads at random places.

Usage::

    PYTHONPATH=. python benchmarks/bench_publish.py --size-px 512 --repeats 3
    PYTHONPATH=. python benchmarks/bench_publish.py --size-px 1024 --repeats 2 --no-s3
    PYTHONPATH=. python benchmarks/bench_publish.py --size-px 512 --no-s3 --input-codec zstd \
        --hash-in-publish
"""

from __future__ import annotations

import argparse
import hashlib
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
from tasks.publish.digest import ATTR as DIGEST_ATTR
from tasks.publish.digest import content_sha256
from tasks.refs import EmbeddingRef
from tessera_model.quantise import quantise

BYTES_PER_PIXEL = 128 + 4
YEAR = 2024
MODEL = "bench"


def _best(
    fn: Callable[[int], None], repeats: int, setup: Callable[[int], None] | None = None
) -> float:
    times = []
    for i in range(repeats):
        if setup is not None:
            setup(i)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def quantise_full_array(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The v1 rule as whole-array numpy expressions (the implementation before streaming)."""
    e = np.asarray(e, dtype=np.float32)
    nodata = np.isnan(e).any(axis=-1)
    e = np.where(nodata[..., None], np.float32(0), e)
    absmax = np.abs(e).max(axis=-1)
    s = np.maximum(absmax / np.float32(127), np.float32(1e-8))
    q = np.clip(np.round(e / s[..., None]), -127, 127).astype(np.int8)
    q[nodata] = 0
    return q, np.where(nodata, np.float32(np.nan), s).astype(np.float32)


def _zone(storage: StorageConfig) -> zarr.Group:
    from tasks.storage import zarr_store

    return zarr.open_group(
        zarr_store(f"{storage.output_uri}/{YEAR}.zarr/utm31", storage), mode="r+"
    )


def _pair(
    tile: Tile,
    emb: EmbeddingRef,
    cfg: PublishConfig,
    q: np.ndarray,
    s: np.ndarray,
    storage_of: Callable[[str], StorageConfig],
    repeats: int,
) -> dict[str, float]:
    """publish, floor and republish_same times (s), each into freshly prepared zone groups."""

    def prepare(name: str) -> Callable[[int], None]:
        return lambda i: prepare_zone_stores([tile], YEAR, cfg, storage_of(f"{name}{i}"), MODEL)

    def run_publish(i: int) -> None:
        publish_tile(emb, YEAR, cfg, storage_of(f"pub{i}"), MODEL)

    def run_floor(i: int) -> None:
        g = _zone(storage_of(f"floor{i}"))
        g["embeddings"][: tile.height, : tile.width] = q
        g["scales"][: tile.height, : tile.width] = s

    def run_again(i: int) -> None:
        assert publish_tile(emb, YEAR, cfg, storage_of("pub0"), MODEL).skipped

    # interleaved, so load changes hit both sides alike; CPU time of the whole process
    # (every thread) beside the wall time, less sensitive to the machine's load
    wall: dict[str, list[float]] = {"floor": [], "publish": []}
    cpu: dict[str, list[float]] = {"floor": [], "publish": []}
    for i in range(repeats):
        for name, run in (("floor", run_floor), ("publish", run_publish)):
            prepare("pub" if name == "publish" else name)(i)
            t0, c0 = time.perf_counter(), _cpu()
            run(i)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu() - c0)
    return {
        "publish": min(wall["publish"]),
        "floor": min(wall["floor"]),
        "republish_same": _best(run_again, repeats),
        "publish_cpu": min(cpu["publish"]),
        "floor_cpu": min(cpu["floor"]),
    }


def _cpu() -> float:
    return time.process_time()  # every thread of the process, ns clock (os.times ticks 10 ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-px", type=int, default=512, help="Tile side (multiple of 256).")
    p.add_argument("--repeats", type=int, default=3, help="Runs per measurement (best kept).")
    p.add_argument("--nodata", type=float, default=0.05, help="Fraction of no-data pixels.")
    p.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    p.add_argument("--no-s3", dest="s3", action="store_false", help="Skip the S3 rows.")
    p.add_argument("--reads", type=int, default=20, help="Reads per latency figure.")
    p.add_argument(
        "--input-codec",
        choices=("zstd", "none"),
        default="none",
        help="Codec of the float input: none (what the embed stage writes) or zarr's "
        "default zstd (what it wrote before).",
    )
    p.add_argument(
        "--hash-in-publish",
        action="store_true",
        help="Leave out the embedding's content_sha256 attribute, so publishing hashes the "
        "float input as it reads it (embeddings from other code; the code before).",
    )
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
    codec = {} if args.input_codec == "zstd" else {"compressors": None}
    g = zarr.open_group(emb_uri, mode="w")
    g.create_array(
        "embedding", data=e, chunks=(64, 64, 128), fill_value=np.nan, **codec
    )  # the embed stage's layout
    if not args.hash_in_publish:  # as the embed stage does, hashed as it is made
        g.attrs[DIGEST_ATTR] = content_sha256(e)
    emb = EmbeddingRef(uri=emb_uri, key="bench", tile=tile, n_valid=0, n_nodata=0)
    cfg = PublishConfig()
    product_mb = n * n * BYTES_PER_PIXEL / 1e6
    q, s = quantise(e)

    def local(name: str) -> StorageConfig:
        return StorageConfig(output_uri=str(root / name), work_uri=str(root / "work"))

    t = _pair(tile, emb, cfg, q, s, local, args.repeats)
    block = np.ascontiguousarray(e[:256, :1024])
    comp = {
        "quantise": _best(lambda _: quantise(block), args.repeats),
        "quantise_full_array": _best(lambda _: quantise_full_array(block), args.repeats),
        "sha256": _best(lambda _: hashlib.sha256(block).digest(), args.repeats),
        "read_float": _best(
            lambda _: zarr.open_group(emb_uri, mode="r")["embedding"][:], args.repeats
        ),
    }
    comp_mb = {k: block.nbytes / 1e6 for k in comp} | {"read_float": e.nbytes / 1e6}
    s3: dict[str, float] = {}
    if args.s3:
        s3 = _s3_rows(args, root, tile, emb, cfg, q, s)
    lat = _read_latency(str(root / "pub0"), local("pub0"), tile, args.reads)
    stored = sum(
        f.stat().st_size for f in (root / "pub0" / f"{YEAR}.zarr").rglob("*") if f.is_file()
    )
    times = {**t, **{f"{k}_s3": v for k, v in s3.items() if not k.endswith("_ms")}}
    cpu_s = {k: times.pop(k) for k in list(times) if "_cpu" in k}
    result = {
        "size_px": n,
        "input_codec": args.input_codec,
        "hash_in_publish": args.hash_in_publish,
        "product_MB": round(product_mb, 1),
        "float_input_MB": round(e.nbytes / 1e6, 1),
        "stored_MB": round(stored / 1e6, 1),
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "cpu_seconds": {k: round(v, 3) for k, v in cpu_s.items()},
        "product_MB_per_s": {k: round(product_mb / v, 1) for k, v in times.items()},
        "ratio_publish_over_floor": round(t["publish"] / t["floor"], 2),
        "cpu_ratio_publish_over_floor": round(t["publish_cpu"] / t["floor_cpu"], 2),
        **(
            {
                "ratio_publish_over_floor_s3": round(s3["publish"] / s3["floor"], 2),
                "cpu_ratio_publish_over_floor_s3": round(s3["publish_cpu"] / s3["floor_cpu"], 2),
            }
            if args.s3
            else {}
        ),
        "one_thread_float_MB_per_s": {k: round(comp_mb[k] / v) for k, v in comp.items()},
        "read_ms": {
            "local": lat,
            **(
                {"s3_loopback": {k: v for k, v in s3.items() if k.endswith("_ms")}}
                if args.s3
                else {}
            ),
        },
        "load_avg_1min": round(os.getloadavg()[0], 2),
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
        pixel_vector(output_uri, YEAR, *to_ll.transform(x, y), storage)
        px.append(time.perf_counter() - t0)
        w, s_ = to_ll.transform(x, y - 1000)
        e, n_ = to_ll.transform(x + 1000, y)
        t0 = time.perf_counter()
        da = open_region(output_uri, YEAR, (w, s_, e, n_), storage)
        win.append(time.perf_counter() - t0)
    return {
        "pixel_read_ms": round(1e3 * float(np.median(px)), 1),
        "window_1km_read_ms": round(1e3 * float(np.median(win)), 1),
        "window_shape": list(da.shape),
    }


def _s3_rows(args, root, tile, emb, cfg, q, s) -> dict:  # noqa: ANN001
    """publish, floor and republish_same to moto on loopback, and read latencies from there."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
    try:

        def on_s3(name: str) -> StorageConfig:
            return StorageConfig(
                output_uri=f"s3://bench/{name}",
                work_uri=str(root / "work"),
                s3_endpoint_url=endpoint,
            )

        out: dict = _pair(tile, emb, cfg, q, s, on_s3, args.repeats)
        lat = _read_latency(on_s3("pub0").output_uri, on_s3("pub0"), tile, args.reads)
        out.update({k: v for k, v in lat.items() if k.endswith("_ms")})
        return out
    finally:
        server.stop()


if __name__ == "__main__":
    main()
