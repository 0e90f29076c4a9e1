"""Start a local Prefect server, create the factory's concurrency limits, serve deployments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from flows.ops import BUILD_LIMIT
from flows.runs import ensure_zombie_automation
from tasks.prefect_tasks import GPU_LIMIT, SH_LIMIT


def start_server(host: str = "127.0.0.1", port: int = 4200, timeout: float = 90.0) -> subprocess.Popen:
    """Start ``prefect server start`` and wait until its API answers; return the process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    url = f"http://{host}:{port}/api/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"Expected the Prefect API at {url} within {timeout:.0f} s. Got no answer.")


def ensure_limits(gpu: int = 1, builds: int = 2, sentinelhub: int = 2) -> None:
    """Create (or update) the ``gpu``, ``tessera-builds`` and ``sentinelhub`` limits, and the
    automation that crashes flow runs whose heartbeats stopped (:mod:`flows.runs`)."""
    ensure_zombie_automation()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name, limit in ((GPU_LIMIT, gpu), (BUILD_LIMIT, builds), (SH_LIMIT, sentinelhub)):
            try:
                client.read_global_concurrency_limit_by_name(name)
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
