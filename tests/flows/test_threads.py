"""Torch threads per worker follow the cores; OpenMP threads wait passively (tasks/threads.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from prefect import flow, task
from pydantic import ValidationError

from tasks import threads
from tasks.config import RunnerConfig


def test_auto_is_cores_over_workers() -> None:
    assert threads.threads_per_worker("auto", 2, cores=2) == 1
    assert threads.threads_per_worker("auto", 2, cores=16) == 8
    assert threads.threads_per_worker("auto", 3, cores=16) == 5
    assert threads.threads_per_worker("auto", 8, cores=2) == 1  # never 0
    assert threads.threads_per_worker(3, 8, cores=2) == 3  # a number is taken as given


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 cores of quota -> 1
    ({"cpu.max": "max 100000\n"}, None),  # unlimited: the affinity set
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cores_follow_affinity_and_cgroup_quota(tmp_path: Path, files: dict[str, str],
                                                expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    got = threads.available_cores(tmp_path)
    assert got == (min(affinity, expected) if expected is not None else affinity)


def test_runner_config_torch_threads_bounds() -> None:
    assert RunnerConfig().torch_threads == "auto"
    assert RunnerConfig(torch_threads=4).torch_threads == 4
    for bad in (0, -1, "many", 100_000):
        with pytest.raises(ValidationError, match="torch_threads"):
            RunnerConfig(torch_threads=bad)


def test_build_resolves_threads_per_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.build import torch_threads

    monkeypatch.setattr("flows.build.available_cores", lambda: 8)
    monkeypatch.setattr("tasks.threads.available_cores", lambda cgroup_root=None: 8)
    assert torch_threads(RunnerConfig(max_workers=2)) == (4, 8)  # training runs alone
    assert torch_threads(RunnerConfig(kind="processes", max_workers=8)) == (1, 8)
    assert torch_threads(RunnerConfig(kind="dask", max_workers=4)) == (2, 8)
    assert torch_threads(RunnerConfig(max_workers=2, torch_threads=3)) == (3, 3)
    remote = RunnerConfig(kind="dask", dask_address="tcp://10.0.0.5:8786")
    assert torch_threads(remote) == (0, 0)  # each remote worker decides from its own cores
    assert torch_threads(remote.model_copy(update={"torch_threads": 2})) == (2, 2)


def test_worker_threads_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "available_cores", lambda cgroup_root=None: 6)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    assert threads.worker_threads(2) == 2
    assert threads.worker_threads(0) == 6
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.worker_threads(0) == 3
    assert threads.worker_threads(1) == 1


def test_thread_count_is_set_in_the_task_thread_only() -> None:
    """torch keeps OpenMP's thread count per thread: a worker thread's setting does not leak
    into another thread, so each task sets its own."""
    import torch

    before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def work() -> None:
        seen["set"] = threads.apply_torch_threads(1)
        seen["inside"] = torch.get_num_threads()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"set": 1, "inside": 1}
    assert threads.apply_torch_threads(before) == before == torch.get_num_threads()


def test_quiet_openmp_and_child_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env: dict[str, str] = {}
    threads.quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice wins
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.child_env(8, 4) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
    assert threads.child_env(2, 4)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.child_env(8, 4)["OMP_NUM_THREADS"] == "5"


def test_thread_count_is_not_in_the_cache_key() -> None:
    from types import SimpleNamespace

    from tasks.prefect_tasks import stage_cache_key

    ctx = SimpleNamespace(task=SimpleNamespace(name="embed"))
    params = {"dp": "d", "ckpt": "c", "cfg": "e", "seed": 0, "storage": "s"}
    key = stage_cache_key(ctx, params)
    assert stage_cache_key(ctx, {**params, "threads": 1}) == key
    assert stage_cache_key(ctx, {**params, "threads": 7}) == key
    assert stage_cache_key(ctx, {**params, "seed": 1}) != key


def test_embedding_has_no_global_lock() -> None:
    """Worker threads embed in parallel: no process-wide lock around the model."""
    import tasks.embed as embed

    assert not any(isinstance(v, type(threading.Lock())) for v in vars(embed).values())


@task
def _probe(threads: int) -> tuple[int, str]:
    """What a task of a build sees in its worker: its torch threads and the wait policy."""
    import torch

    from tasks.threads import apply_torch_threads

    apply_torch_threads(threads)
    return torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "")


@flow
def _probe_flow(runner: RunnerConfig) -> list[tuple[int, str]]:
    from flows.build import torch_threads

    threads.quiet_openmp()  # as build_region does, before the workers start
    n, _ = torch_threads(runner)
    return [f.result() for f in [_probe.submit(n) for _ in range(4)]]


@pytest.mark.integration
@pytest.mark.parametrize("kind", [
    "threads",
    pytest.param("processes", marks=pytest.mark.slow),
    pytest.param("dask", marks=pytest.mark.slow),
])
def test_every_worker_kind_runs_its_share(kind: str, prefect_harness: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """2 workers on this machine's cores: each task runs cores // 2 threads (at least 1), in
    worker threads, worker processes and Dask workers alike, with passive OpenMP waits."""
    from flows.build import task_runner_for

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    runner = RunnerConfig(kind=kind, max_workers=2)
    got = _probe_flow.with_options(task_runner=task_runner_for(runner))(runner=runner)
    want = max(1, threads.available_cores() // 2)
    assert got == [(want, "PASSIVE")] * 4
