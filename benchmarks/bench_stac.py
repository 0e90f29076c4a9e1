"""Benchmark: STAC acquisition rate against the local STAC endpoint, and where the time goes.

Runs :func:`tasks.acquire.acquire` for one tile through the STAC source (pystac-client
search, planetary-computer signing, rasterio windowed COG reads over our range client), each
run into a fresh work root (no response cache), and the synthetic source on the same tile
and dates as the baseline of the same run:

- ``cold``: the endpoint renders each granule's COGs from the synthetic Earth on first
  request (its CPU is part of the time, as a real service's latency would be);
- ``warm``: the COGs are already rendered, so the time is the client's: search, HTTP,
  GeoTIFF decoding, reprojection, mosaicking and the Zarr writes;
- ``warm 20 m``: B05-B07, B8A, B11, B12 and SCL at 20 m as in the real product, so 7 of 11
  S2 assets go through the warp (reproject) path.

Scenes are (date, modality) observations of the tile. The breakdown columns are seconds
summed over the reader threads (so they can exceed the wall time): ``http`` in requests,
``decode`` in rasterio reads of grid-aligned windows (minus their HTTP), ``reproject`` in
warped reads (minus their HTTP); ``search`` and ``mosaic`` are wall seconds.

Usage::

    python benchmarks/bench_stac.py [--months 5 6] [--connections 1 8]

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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.acquire import acquire, make_source  # noqa: E402
from tasks.config import SourceConfig, StorageConfig  # noqa: E402
from tasks.grid import Tile  # noqa: E402
from tasks.sources.stac_endpoint import EndpointConfig, LocalEndpoint  # noqa: E402
from tasks.sources.synthetic import SyntheticSource  # noqa: E402

TILE = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
YEAR = 2022
LAYOUT = {"granule_px": 384, "granule_step_px": 320, "granule_origin_m": (300160, 5782400)}
"""The tile straddles two 384-px granules (a same-day mosaic on every date)."""


class MonthsSynthetic:
    """The synthetic source on the endpoint's months (the baseline)."""

    name = "synthetic"

    def __init__(self, months: tuple[int, ...]) -> None:
        self.inner, self.months = SyntheticSource(), months

    def _keep(self, d: np.ndarray) -> np.ndarray:
        return d[np.isin(d.astype("datetime64[M]").astype(int) % 12 + 1, self.months)]

    def s2_dates(self, tile, year):  # noqa: ANN001, ANN201
        return self._keep(self.inner.s2_dates(tile, year))

    def s1_dates(self, tile, year, orbit):  # noqa: ANN001, ANN201
        return self._keep(self.inner.s1_dates(tile, year, orbit))

    def read_s2(self, tile, dates):  # noqa: ANN001, ANN201
        return self.inner.read_s2(tile, dates)

    def read_s1(self, tile, dates, orbit):  # noqa: ANN001, ANN201
        return self.inner.read_s1(tile, dates, orbit)


def run(ep: LocalEndpoint | None, months: tuple[int, ...], connections: int, root: Path
        ) -> dict[str, float]:
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    if ep is None:
        src, cfg = MonthsSynthetic(months), SourceConfig()
    else:
        cfg = SourceConfig.model_validate({"kind": "stac", "stac": {
            **ep.stac_config(), "max_connections": connections, "backoff_s": 0.05,
            "cache_responses": False}})
        src = make_source(cfg, storage)
    b0 = ep.stats.bytes_out if ep else 0
    t0 = time.perf_counter()
    ref = acquire(TILE, YEAR, cfg, storage, scene_source=src)
    dt = time.perf_counter() - t0
    scenes = ref.n_s2 + ref.n_s1_ascending + ref.n_s1_descending
    out = {"s": dt, "scenes": scenes, "scenes_s": scenes / dt,
           "mb": ((ep.stats.bytes_out - b0) / 1e6) if ep else 0.0}
    tm = getattr(src, "timings", None)
    if tm is not None:
        out |= {k: getattr(tm, k) for k in ("search", "http", "decode", "reproject", "mosaic")}
        out["windows"] = tm.windows
        out["requests"] = src.client.stats.requests
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--months", type=int, nargs="+", default=[5, 6],
                    help="Months of 2022 served (fewer = shorter run).")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8],
                    help="source.stac.max_connections settings to time.")
    a = ap.parse_args()
    months = tuple(a.months)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = run(None, months, 0, root / "syn")
        rows.append(("synthetic source (baseline)", "-", base))
        for native_20m in (False, True):
            cfg = EndpointConfig(**LAYOUT, months=months, native_20m=native_20m)
            with LocalEndpoint(cfg) as ep:
                label = "20 m" if native_20m else "10 m"
                cold = run(ep, months, max(a.connections), root / f"cold{label}")
                if not native_20m:
                    rows.append((f"stac, cold ({label})", str(max(a.connections)), cold))
                for n in a.connections:
                    rows.append((f"stac, warm ({label})", str(n),
                                 run(ep, months, n, root / f"warm{label}{n}")))
    print(f"Tile {TILE.id} ({TILE.size_px} px), {YEAR} months {list(months)}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print()
    print("| run | connections | s | scenes | scenes/s | x baseline time | MB | windows | "
          "requests | search s | http s | decode s | reproject s | mosaic s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, conn, r in rows:
        ratio = r["s"] / base["s"]
        extra = (f"{r['mb']:.1f} | {r['windows']:.0f} | {r['requests']:.0f} | {r['search']:.2f} | "
                 f"{r['http']:.2f} | {r['decode']:.2f} | {r['reproject']:.2f} | {r['mosaic']:.2f}"
                 if "http" in r else "- | - | - | - | - | - | - | -")
        print(f"| {name} | {conn} | {r['s']:.2f} | {r['scenes']:.0f} | {r['scenes_s']:.1f} | "
              f"{ratio:.2f} | {extra} |")


if __name__ == "__main__":
    main()
