"""Orchestration overhead: a Prefect build of N tiles against the same stages in a plain loop.

Usage:
    python benchmarks/bench_orchestration.py --n 4 16 64

Both variants run the same stage functions on the same tiles (synthetic Earth, training off,
a fixed tiny checkpoint so the stages are cheap and the overhead shows), each into its own
fresh work/output roots; the flow runs with one worker thread so both are sequential. Also
reported: a fully cached re-run of the flow. Ratios matter, not seconds (noisy machine).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch


def tiny_checkpoint(path: Path) -> str:
    from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec(version="tiny-bench", latent_dim=128, d_model=16, n_layers=1, n_heads=2,
                     ffn_dim=32, dropout=0.0, projector_dim=32, projector_layers=1, sample_steps=8)
    save_checkpoint(build_checkpoint(TesseraModel(spec)), path)
    return str(path)


def config(root: Path, n: int, ckpt: str, workers: int):
    """A region of exactly n = k*k tiles of zone 31N (a quadrilateral just inside them)."""
    from pyproj import Transformer

    from tasks.config import build_config

    k = int(round(math.sqrt(n)))
    x0, y0, m = 302080, 5788160, 50.0
    x1, y1 = x0 + k * 2560, y0 - k * 2560
    inv = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)
    ring = [inv.transform(x, y) for x, y in
            [(x0 + m, y0 - m), (x1 - m, y0 - m), (x1 - m, y1 + m), (x0 + m, y1 + m), (x0 + m, y0 - m)]]
    return build_config(None, {
        "region": {"geojson": {"type": "Polygon", "coordinates": [ring]}, "name": f"bench{n}"},
        "year": 2023,
        "storage": {"output_uri": str(root / "out"), "work_uri": str(root / "work")},
        "training": {"enabled": False, "checkpoint_uri": ckpt},
        "runner": {"kind": "threads", "max_workers": workers},
    })


def plain_loop(cfg) -> float:
    from flows.build import plan
    from tasks import acquire, dpixels, embed, mask, publish, train

    t0 = time.perf_counter()
    tiles = plan(cfg)
    st = cfg.storage
    ck = train.given_checkpoint(cfg.training.checkpoint_uri, cfg.model, st)
    publish.prepare_zone_stores(tiles, cfg.year, cfg.publish, st, ck.model_version)
    for t in tiles:
        sc = acquire.acquire(t, cfg.year, cfg.source, st)
        mk = mask.cloud_mask(sc, cfg.mask, st)
        dp = dpixels.extract_dpixels(sc, mk, cfg.dpixels, st)
        e = embed.embed_tile(dp, ck, cfg.embedding, cfg.seed, st)
        publish.publish_tile(e, cfg.year, cfg.publish, st, ck.model_version)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16])
    a = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    from flows.build import build_region, plan

    print("| tiles | plain loop s | Prefect flow s (1 worker) | ratio | cached re-run s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d, prefect_test_harness(server_startup_timeout=120):
        root = Path(d)
        ckpt = tiny_checkpoint(root / "tiny.pt")
        for n in a.n:
            cfg_plain = config(root / f"plain{n}", n, ckpt, 1)
            cfg_flow = config(root / f"flow{n}", n, ckpt, 1)
            assert len(plan(cfg_flow)) == n, len(plan(cfg_flow))
            t_plain = plain_loop(cfg_plain)
            t0 = time.perf_counter()
            build_region(config=cfg_flow)
            t_flow = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_region(config=cfg_flow)
            t_cached = time.perf_counter() - t0
            print(f"| {n} | {t_plain:.1f} | {t_flow:.1f} | {t_flow / t_plain:.2f} | {t_cached:.1f} |")


if __name__ == "__main__":
    main()
