"""Torch threads per worker: follow the cores a worker is given, never spin on a busy machine.

Two rules, applied in every kind of worker (the CLI process, threads and processes task
runners, Dask workers, torchrun ranks):

- **Threads follow the cores.** A worker runs ``RunnerConfig.torch_threads`` intra-op
  threads; ``"auto"`` is ``cores // workers`` (at least 1), where ``cores`` is the CPUs this
  process may run on (``os.sched_getaffinity``) or the cgroup CPU quota if smaller, and
  ``workers`` the tasks that run at once on this machine. So ``workers x threads <= cores``:
  two worker threads on two cores each embed on their own core, in parallel. The count is
  set inside each task (:func:`apply_torch_threads`), in the thread that runs it: OpenMP's
  thread count is a per-thread setting that torch copies into each new thread.
- **OpenMP threads sleep when they wait** (``OMP_WAIT_POLICY=PASSIVE``). By default GNU
  OpenMP (libgomp, torch's CPU thread pool) spins at every barrier; when another process
  holds one of the cores, a spinning thread burns the time slice its partner needs, and two
  threads ran up to 20x slower than one (BENCHMARKS.md, "Busy machine"). The policy is read
  once, when torch loads libgomp, so :func:`quiet_openmp` must run before torch is imported:
  the CLI calls it first thing, and the build flow calls it before starting worker
  processes (which inherit the environment). A value the user set wins.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

LOGGER = logging.getLogger(__name__)

OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""OpenMP settings for every process that runs torch (see the module docstring)."""
THREADS_ENV = "TESSERA_TORCH_THREADS"
"""Environment variable a worker machine may set to fix its torch threads per worker."""


def quiet_openmp(environ: dict[str, str] | None = None) -> bool:
    """Set :data:`OPENMP_ENV` in ``environ`` (default ``os.environ``) where not set; return
    whether it can still take effect in this process (torch not imported yet)."""
    env = os.environ if environ is None else environ
    for k, v in OPENMP_ENV.items():
        env.setdefault(k, v)
    return "torch" not in sys.modules


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup CPU quota in cores (v2 ``cpu.max`` or v1 CFS quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity set, or the cgroup quota if smaller (>= 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def threads_per_worker(setting: int | str, workers: int, cores: int | None = None) -> int:
    """Torch intra-op threads of one worker: ``setting`` if a number, else
    ``cores // workers`` (at least 1)."""
    if setting != "auto":
        return int(setting)
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))


def _dask_worker_threads() -> int | None:
    """Threads of the Dask worker this runs in (None outside one)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def worker_threads(threads: int = 0) -> int:
    """The torch threads a task should run with here: ``threads`` when > 0 (the build
    resolved them), else :data:`THREADS_ENV` if set, else this worker's share of its
    machine's cores (a Dask worker: cores // its threads; elsewhere all cores)."""
    if threads > 0:
        return threads
    if (v := os.environ.get(THREADS_ENV, "").strip()).isdigit() and int(v) > 0:
        return int(v)
    return max(1, available_cores() // (_dask_worker_threads() or 1))


def apply_torch_threads(threads: int = 0) -> int:
    """Set this thread's torch intra-op threads (see :func:`worker_threads`); return them."""
    n = worker_threads(threads)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def child_env(threads: int, processes: int = 1) -> dict[str, str]:
    """Environment for ``processes`` child processes sharing ``threads`` threads (torchrun
    ranks): OpenMP waits passively, ``threads // processes`` threads each (at least 1). A
    value already in the environment wins."""
    out = {k: os.environ.get(k, v) for k, v in OPENMP_ENV.items()}
    out["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS",
                                            str(max(1, threads // max(1, processes))))
    return out
