"""Start a local Prefect server, create the factory's concurrency limits, serve deployments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from flows.ops import BUILD_LIMIT
from flows.runs import ensure_zombie_automation
from tasks.prefect_tasks import GPU_LIMIT, SH_LIMIT, STAC_LIMIT


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: deliver SIGTERM to this process when its parent dies (even by ``kill -9``)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def temporary_server_class() -> type:
    """Prefect's temporary (ephemeral) API server, made to end with the process that started
    it: a build killed with ``kill -9`` leaves no server process behind (Linux; elsewhere it
    behaves like Prefect's own)."""
    import types

    import prefect.server.api.server as prefect_server
    from prefect.server.api.server import SubprocessASGIServer

    def popen(*args: object, **kwargs: object) -> subprocess.Popen:
        if sys.platform.startswith("linux"):
            kwargs.setdefault("preexec_fn", _die_with_parent)
        return subprocess.Popen(*args, **kwargs)  # type: ignore[call-overload]

    class OrphanSafeServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect's method with one change: its Popen gets the parent-death signal. Only
            # the name ``subprocess`` inside Prefect's server module is swapped, for this call.
            real = prefect_server.subprocess
            names = {k: getattr(real, k) for k in dir(real) if not k.startswith("__")}
            prefect_server.subprocess = types.SimpleNamespace(**{**names, "Popen": popen})  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = real

    return OrphanSafeServer


def start_server(host: str = "127.0.0.1", port: int = 4200, timeout: float = 90.0) -> subprocess.Popen:
    """Start ``prefect server start`` and wait until its API answers; return the process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
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


def ensure_limits(gpu: int = 1, builds: int = 2, sentinelhub: int = 2, stac: int = 4) -> None:
    """Create (or update) the ``gpu``, ``tessera-builds``, ``sentinelhub`` and ``stac`` limits, and the
    automation that crashes flow runs whose heartbeats stopped (:mod:`flows.runs`)."""
    ensure_zombie_automation()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name, limit in ((GPU_LIMIT, gpu), (BUILD_LIMIT, builds), (SH_LIMIT, sentinelhub),
                            (STAC_LIMIT, stac)):
            try:
                client.read_global_concurrency_limit_by_name(name)
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
