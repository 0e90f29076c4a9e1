"""Start a local Prefect server, create the factory's concurrency limits, serve deployments.

``tessera server`` records the server it runs in ``$PREFECT_HOME/tessera-server.json`` (URL
and pid) while it is up; a build from the command line without ``PREFECT_API_URL`` uses that
server when its process is alive and its API answers (:func:`running_server`), instead of
starting a temporary one. This module imports no Prefect at import time: the command line
looks for a running server before Prefect is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVER_RECORD = "tessera-server.json"
"""File in ``PREFECT_HOME`` naming the running ``tessera server`` (url, pid)."""


def server_record_path() -> Path:
    """Where ``tessera server`` records itself: ``$PREFECT_HOME/tessera-server.json``."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / SERVER_RECORD


def record_server(api_url: str, pid: int) -> Path:
    """Record a running ``tessera server`` (atomically); return the file."""
    path = server_record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    from tasks.liveness import process_start

    tmp.write_text(json.dumps({"api_url": api_url, "pid": pid, "start": process_start(pid)}))
    os.replace(tmp, path)
    return path


def forget_server(pid: int) -> None:
    """Remove the record of the server run by ``pid`` (left alone if another wrote it)."""
    path = server_record_path()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def running_server(timeout: float = 2.0) -> str | None:
    """The API URL of a running ``tessera server`` on this machine (its record names a live
    process and ``/health`` answers within ``timeout``), else None."""
    from tasks.liveness import pid_alive

    try:
        rec = json.loads(server_record_path().read_text())
        url, pid, start = str(rec["api_url"]), int(rec["pid"]), rec.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not url.startswith("http://127.0.0.1:") or not pid_alive(pid, start):
        return None
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return url if r.status == 200 else None
    except OSError:
        return None


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
    from flows.ops import BUILD_LIMIT
    from flows.runs import ensure_zombie_automation
    from tasks.prefect_tasks import GPU_LIMIT, SH_LIMIT, STAC_LIMIT

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
