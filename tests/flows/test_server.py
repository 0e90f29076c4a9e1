"""On a real Prefect server started by the test: deployments, a UI-style run, guards.

The server and the ``tessera serve`` process run as subprocesses on loopback, with their own
PREFECT_HOME, as an operator would run them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import zarr

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.server import ensure_limits, start_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env_before = dict(os.environ)
    os.environ["PREFECT_HOME"] = str(home)
    try:
        proc = start_server(port=port, timeout=120)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home)}
    serve = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            ensure_limits(gpu=1, builds=2)
            _wait_for_deployments(4)
            yield api
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for_deployments(n: int, timeout: float = 90) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if len(client.read_deployments()) >= n:
                return
            time.sleep(1)
    raise TimeoutError("deployments did not appear")


def _tiny(tmp_path, year=2023):
    return {
        "region": {"bbox": [0.105, 52.192, 0.112, 52.196], "name": "ui-run"},
        "year": year,
        "storage": {"output_uri": str(tmp_path / "out"), "work_uri": str(tmp_path / "work")},
        "training": {"steps": 3, "batch_size": 32, "pixels_per_tile": 256},
    }


def test_deployments_and_cron(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.serve import ANNUAL_CRON

    with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
        assert {"build-region", "annual-build", "backfill", "train"} <= set(deps)
        crons = [s.schedule.cron for s in deps["annual-build"].schedules]
        assert crons == [ANNUAL_CRON]
        assert deps["build-region"].enforce_parameter_schema
        limits = {g.name: g.limit for g in client.read_global_concurrency_limits()}
        assert limits["gpu"] == 1 and limits["tessera-builds"] == 2 and limits["sentinelhub"] == 2


def test_ui_triggered_run_publishes(server, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server}):
        run = run_deployment("build-region/build-region", parameters={"config": _tiny(tmp_path)},
                             timeout=400)
    assert run.state.is_completed(), run.state
    g = zarr.open_group(str(tmp_path / "out" / "2023.zarr"), mode="r")
    assert "utm31" in g and g["utm31"].attrs["tessera:n_tiles"] == 1


@pytest.mark.parametrize("bad", [
    {"year": 2016},
    {"region": {"bbox": [0.1, 52.0, 0.2, 95.0]}},
    {"source": {"kind": "landsat"}},
    {"tile_size_px": 300},
])
def test_invalid_parameters_rejected_before_the_run(server, tmp_path, bad):
    """What the JSON schema (the UI form) can express is refused by the server itself."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {**_tiny(tmp_path), **bad}
    with temporary_settings(updates={PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            before = len(client.read_flow_runs())
        with pytest.raises(Exception, match="(?i)validation|parameter"):
            run_deployment("build-region/build-region", parameters={"config": params}, timeout=0)
        with get_client(sync_client=True) as client:
            assert len(client.read_flow_runs()) == before


def test_cross_field_errors_fail_before_any_task(server, tmp_path):
    """Rules a JSON schema cannot state (min < max) fail at the run's start, before any task."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = {**_tiny(tmp_path), "region": {"bbox": [0.2, 52.0, 0.1, 52.1]}}
    with temporary_settings(updates={PREFECT_API_URL: server}):
        run = run_deployment("build-region/build-region", parameters={"config": params}, timeout=300)
        assert run.state.is_failed()
        assert "min_lon < max_lon" in (run.state.message or "") or "region" in (run.state.message or "")
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        assert tasks == []
    assert not (tmp_path / "work").exists()
