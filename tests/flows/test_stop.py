"""A build stops when asked: Ctrl-C, SIGTERM and a cancellation from the Prefect UI.

Unit tests of :mod:`tasks.stop` run in small subprocesses (signal handlers are process
state). The integration tests run ``tessera build`` as an operator would, against one real
Prefect server for the module (no temporary server per build), signal it during training
and during embedding, check it ends within seconds leaving its committed stages committed,
and that the same command then resumes and completes; and cancel a ``build-region``
deployment run through the API as the UI does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.errors import FactoryError, StopRequested
from tasks.stop import check_stop, clear_stop, request_stop, stop_reason, stop_requested

REPO = Path(__file__).resolve().parents[2]
BBOX = ["0.105", "52.192", "0.112", "52.196"]  # one 256-px tile
STOP_WITHIN_S = 15.0
"""Generous for a busy 2-core machine; measured times are printed (typically 2-5 s)."""


# ---------------------------------------------------------------------------- unit tests


def test_check_stop_raises_after_a_request() -> None:
    clear_stop()
    try:
        check_stop("nothing")
        assert not stop_requested()
        request_stop("test")
        request_stop("another")  # the first reason is kept
        assert stop_requested() and stop_reason() == "test"
        with pytest.raises(StopRequested, match=r"Expected .*Got a stop request \(test\) during "
                                                r"embedding") as err:
            check_stop("embedding")
        assert isinstance(err.value, FactoryError) and isinstance(err.value, InterruptedError)
    finally:
        clear_stop()
    check_stop()


def _terminal_signals() -> None:  # runs in the child before exec
    # As under a terminal: a test run started in the background of a non-interactive shell
    # (nohup, `cmd &` in a CI script) has SIGINT ignored, and children inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_terminal_signals)


_LOOP = """
    import sys, threading, time
    from tasks.stop import install_stop_handlers, check_stop
    from tasks.errors import StopRequested
    assert install_stop_handlers() and install_stop_handlers()   # idempotent
    def work():  # a task-runner thread: only the stop flag reaches it
        try:
            while True:
                check_stop("work"); time.sleep(0.01)
        except StopRequested as exc:
            print("worker stopped:", exc, flush=True)
    t = threading.Thread(target=work); t.start()
    try:
        {main}
    finally:
        t.join(); print("joined", flush=True)
"""


@pytest.mark.parametrize(("sig", "code", "exc"), [
    (signal.SIGINT, -2, "KeyboardInterrupt"),  # chained to Python's default SIGINT handler
    (signal.SIGTERM, 143, ""),                 # default SIGTERM: a clean SystemExit(143)
])
def test_first_signal_stops_every_thread(sig: int, code: int, exc: str) -> None:
    p = _child(_LOOP.format(main='print("ready", flush=True); time.sleep(60)'))
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == code, out
    assert "worker stopped" in out and "joined" in out and exc in out


def test_second_signal_exits_at_once() -> None:
    """A main thread that ignores the first request (a stuck wait) is ended by a second."""
    main = ("while True:\n            try: print('ready', flush=True); time.sleep(60)\n"
            "            except BaseException: pass")
    p = _child(_LOOP.replace("t.join()", "pass").format(main=main))
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=10)
    assert p.returncode == 143


def test_signal_seen_under_another_handler() -> None:
    """Prefect's flow engine puts its own SIGTERM bridge on top of ours for a subflow; the
    wakeup-fd watcher still turns the signal into a stop request for the task threads."""
    main = """import signal
        class Bridge(BaseException): pass
        def bridge(s, f): raise Bridge()
        signal.signal(signal.SIGTERM, bridge)
        try:
            print("ready", flush=True)
            time.sleep(60)
        except Bridge:
            print("bridge raised", flush=True)"""
    p = _child(_LOOP.format(main=main))
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0, out
    assert "bridge raised" in out and "worker stopped" in out


def test_child_stops_when_its_parent_dies(tmp_path: Path) -> None:
    """A worker process (here a grandchild) stops when the process it watches is killed."""
    marker = tmp_path / "stopped"
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import time
        from tasks.stop import watch_parent, stop_requested
        watch_parent(poll_s=0.1)
        print("watching", flush=True)
        while not stop_requested():
            time.sleep(0.05)
        open({str(marker)!r}, "w").write("stopped")
    """))
    p = _child(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, {str(worker)!r}], stdout=sys.stdout)
        time.sleep(60)
    """)
    assert p.stdout is not None and p.stdout.readline().strip() == "watching"
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "stopped"


# ----------------------------------------------------------------- integration: builds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real Prefect server and a ``tessera serve`` process; yields (API URL, child env)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.server import ensure_limits, start_server

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env_before = dict(os.environ)
    os.environ["PREFECT_HOME"] = str(home)
    try:
        proc = start_server(port=port, timeout=180)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home),
           "PREFECT_LOGGING_LEVEL": "INFO"}
    serve = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve"], env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            ensure_limits(gpu=1, builds=2)
            yield api, env
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        proc.terminate()
        proc.wait(timeout=30)


def _wait(cond: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the build ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _build(env: dict[str, str], root: Path, log: Path, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deployments.cli", "build", "--bbox", *BBOX, "--year", "2023",
           "--work", str(root / "work"), "--output", str(root / "out")]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            preexec_fn=_terminal_signals)


def _stop(p: subprocess.Popen, sig: int) -> float:
    t0 = time.monotonic()
    p.send_signal(sig)
    try:
        p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return time.monotonic() - t0


def _markers(work: Path) -> dict[str, float]:
    """Commit markers under the work root and their modification times."""
    return {str(p.relative_to(work)): p.stat().st_mtime for p in work.rglob("*.done.json")}


TRAIN = ["training.steps=30", "training.checkpoint_every=5", "training.batch_size=16",
         "training.pixels_per_tile=512", "training.device=cpu"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_during_training_then_resume(server, tmp_path: Path, sig: int) -> None:
    import torch

    _, env = server
    log = tmp_path / "build.log"
    work = tmp_path / "work"
    p = _build(env, tmp_path, log, *TRAIN)
    running = lambda: next(work.glob("checkpoints/*/running.pt"), None)  # noqa: E731
    _wait(running, 600, "the first training checkpoint", p)
    seconds = _stop(p, sig)
    print(f"{signal.Signals(sig).name} during training: stopped in {seconds:.1f} s")
    assert seconds < STOP_WITHIN_S, log.read_text()[-3000:]
    assert p.returncode != 0
    ck = running()
    assert ck is not None
    stopped = torch.load(ck, weights_only=False)
    assert 5 <= stopped["step"] < 30  # the stop saved the steps done
    before = _markers(work)
    assert any(k.startswith("training/") for k in before)
    assert not any(k.startswith(("checkpoints/", "embeddings/")) for k in before)

    p = _build(env, tmp_path, log, *TRAIN)
    assert p.wait(timeout=900) == 0, log.read_text()[-3000:]
    after = _markers(work)
    assert {k: after[k] for k in before} == before  # committed stages were not redone
    final = torch.load(next(work.glob("checkpoints/*/model.pt")), weights_only=False)
    assert final["step"] == 30
    assert final["losses"][: stopped["step"]] == stopped["losses"]  # resumed, not restarted
    assert (tmp_path / "out" / "2023.zarr").exists()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained model about an eighth of ``small``: embedding a tile on CPU takes long
    enough to be interrupted (tens of seconds at batch 64), and not much longer."""
    import torch

    from tessera_model import ModelSpec, TesseraModel, build_checkpoint, save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec(version="stop-test", latent_dim=128, d_model=32, n_layers=2, n_heads=2,
                     ffn_dim=128, dropout=0.0, projector_dim=32, projector_layers=1,
                     sample_steps=24)
    path = tmp_path_factory.mktemp("small") / "small.pt"
    save_checkpoint(build_checkpoint(TesseraModel(spec)), path)
    return str(path)


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_during_embedding_then_resume(server, tmp_path: Path, small_checkpoint: str) -> None:
    _, env = server
    log = tmp_path / "build.log"
    work = tmp_path / "work"
    sets = ["training.enabled=false", f"training.checkpoint_uri={small_checkpoint}",
            "embedding.batch_size=64", "embedding.device=cpu"]
    p = _build(env, tmp_path, log, *sets)
    _wait(lambda: next(work.glob("embeddings/*/*.zarr/embedding"), None), 600,
          "the embedding to start", p)
    time.sleep(0.5)
    seconds = _stop(p, signal.SIGTERM)
    print(f"SIGTERM during embedding: stopped in {seconds:.1f} s")
    assert seconds < STOP_WITHIN_S, log.read_text()[-3000:]
    before = _markers(work)
    assert not any(k.startswith("embeddings/") for k in before)  # nothing half-written looks done
    assert any(k.startswith("dpixels/") for k in before)

    p = _build(env, tmp_path, log, *sets)
    assert p.wait(timeout=900) == 0, log.read_text()[-3000:]
    after = _markers(work)
    assert {k: after[k] for k in before} == before
    assert any(k.startswith("embeddings/") for k in after)


def _flow_run_pids(run_id: str) -> list[int]:
    """Processes whose environment names the flow run (the runner's child and its workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.integration
@pytest.mark.slow
def test_ui_cancellation_stops_the_run(server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    config = {
        "region": {"bbox": [float(x) for x in BBOX], "name": "cancel-me"}, "year": 2023,
        "storage": {"output_uri": str(tmp_path / "out"), "work_uri": str(tmp_path / "work")},
        "training": {"steps": 100000, "batch_size": 16, "pixels_per_tile": 512,
                     "checkpoint_every": 5, "device": "cpu"},
    }
    run = run_deployment("build-region/build-region", parameters={"config": config}, timeout=0)
    work = tmp_path / "work"
    _wait(lambda: next(work.glob("checkpoints/*/running.pt"), None), 600, "training")
    pids = _flow_run_pids(str(run.id))
    assert pids
    with get_client(sync_client=True) as client:
        t0 = time.monotonic()
        client.set_flow_run_state(run.id, Cancelling(), force=True)  # what the UI's Cancel does
        _wait(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 120,
              "the flow-run process to end")
        seconds = time.monotonic() - t0
        _wait(lambda: client.read_flow_run(run.id).state.is_final(), 60, "a final state")
        state = client.read_flow_run(run.id).state
    print(f"UI cancellation: process ended {seconds:.1f} s after Cancelling; state {state.name}")
    assert state.is_cancelled(), state
    assert seconds < STOP_WITHIN_S + 5  # the runner polls for cancellations every few seconds
    assert json.loads(next(work.glob("training/*.done.json")).read_text())["n_pixels"] > 0
