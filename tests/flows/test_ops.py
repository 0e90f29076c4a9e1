"""Operations: kill-and-resume, backfills, and the Dask task runner (session Prefect harness)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tasks.config import build_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TILE_A = [0.105, 52.192, 0.112, 52.196]      # inside tile 31N-E0302080-N5788160-256
TILE_A2 = [0.113, 52.190, 0.118, 52.194]     # another region in the same tile
TWO_TILES = [0.115, 52.190, 0.135, 52.196]   # spans two tiles


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


def _cfg(root: Path, checkpoint: str, bbox, year=2023, name="r", **extra):
    data = {
        "region": {"bbox": bbox, "name": name},
        "year": year,
        "storage": {"output_uri": str(root / "out"), "work_uri": str(root / "work")},
        "training": {"enabled": False, "checkpoint_uri": checkpoint},
        **extra,
    }
    return build_config(None, data)


def _store_arrays(out: Path, year: int, group: str = "utm31") -> dict[str, np.ndarray]:
    g = zarr.open_group(str(out / f"{year}.zarr"), mode="r")[group]
    return {"embeddings": g["embeddings"][:], "scales": g["scales"][:]}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return np.array_equal(a["embeddings"], b["embeddings"]) and np.array_equal(
        a["scales"], b["scales"], equal_nan=True)


def _task_states(flow_run_id) -> dict[str, str]:
    """Task-run name -> state name, over a build-region run and its stage subflow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        kids = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *[k.id for k in kids]]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {r.name: r.state.name for r in runs}


def test_kill_and_resume(tmp_path, checkpoint, prefect_harness):
    from flows.build import build_region

    ref = _cfg(tmp_path / "ref", checkpoint, TWO_TILES)
    assert build_region(config=ref).n_valid_pixels > 0

    cfg = _cfg(tmp_path / "run", checkpoint, TWO_TILES)
    cfg_file = tmp_path / "build.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "build", "-c", str(cfg_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "run" / "work"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((work / "dpixels").rglob("*.done.json")):
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name for p in (work / "dpixels").rglob("*.done.json")}
    assert done_before and not (tmp_path / "run" / "out" / "2023.zarr" / "utm31" / "zarr.json").exists() \
        or len(done_before) < 2

    state = build_region(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    assert _same(_store_arrays(tmp_path / "run" / "out", 2023), _store_arrays(tmp_path / "ref" / "out", 2023))
    states = _task_states(state.state_details.flow_run_id)
    for tile in done_before:  # stages completed before the kill were not recomputed
        assert states[f"acquire-{tile}"] == "Cached"
        assert states[f"dpixels-{tile}"] == "Cached"


def test_backfill_two_regions_two_years_then_cached(tmp_path, checkpoint, prefect_harness):
    from flows.ops import backfill
    from tasks.config import RegionConfig

    base = _cfg(tmp_path, checkpoint, TILE_A).model_dump(mode="json", exclude={"region", "year"})
    regions = [RegionConfig(bbox=TILE_A, name="a"), RegionConfig(bbox=TILE_A2, name="b")]
    state = backfill(regions=regions, years=[2022, 2023], base=base, max_parallel=2, return_state=True)
    assert state.is_completed(), state.message
    items = state.result()
    assert sorted((i.region, i.year) for i in items) == [("a", 2022), ("a", 2023), ("b", 2022), ("b", 2023)]
    for year in (2022, 2023):
        assert (tmp_path / "out" / f"{year}.zarr" / "utm31").exists()
    first = {y: _store_arrays(tmp_path / "out", y) for y in (2022, 2023)}

    again = backfill(regions=regions, years=[2022, 2023], base=base, max_parallel=2, return_state=True)
    assert again.is_completed()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        builds = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(
            any_=[f"stages-{r}-{y}" for r in "ab" for y in (2022, 2023)])))
    latest = {}
    for b in sorted(builds, key=lambda b: b.start_time or b.created):
        latest[b.name] = b.id
    assert len(latest) == 4
    for run_id in latest.values():
        states = _task_states(run_id)
        assert states and all(s == "Cached" for s in states.values()), states
    for y in (2022, 2023):
        assert _same(first[y], _store_arrays(tmp_path / "out", y))


def test_dask_runner_publishes_identical_bytes(tmp_path, checkpoint, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from flows.build import build_region

    threads = _cfg(tmp_path / "threads", checkpoint, TWO_TILES)
    dask = _cfg(tmp_path / "dask", checkpoint, TWO_TILES, runner={"kind": "dask", "max_workers": 2})
    build_region(config=threads)
    # Dask worker processes report to the same API as this test's harness.
    os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
    try:
        state = build_region(config=dask, return_state=True)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
    assert state.is_completed(), state.message
    assert _same(_store_arrays(tmp_path / "dask" / "out", 2023), _store_arrays(tmp_path / "threads" / "out", 2023))
