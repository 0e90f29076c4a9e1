"""Runs of killed processes are marked crashed when a later build starts."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess

import pytest

pytestmark = pytest.mark.integration


def _running_run(labels: dict[str, str], started_ago_s: float = 0.0):  # noqa: ANN202
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="build-region")
    def fake() -> None:  # never run: only its flow name matters
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(fake, name="zombie-test")
        t = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=started_ago_s)
        client.set_flow_run_state(run.id, Running(timestamp=t), force=True)
        client.update_flow_run_labels(run.id, labels)
        return run.id


def _heartbeat(run_id, when: dt.datetime) -> None:  # noqa: ANN001
    """A flow-run heartbeat event, as Prefect's engine sends, visible once this returns."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.clients import get_events_client  # noqa: F401  (worker flush below)
    from prefect.events.worker import EventsWorker

    emit_event("prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"},
               occurred=when)
    EventsWorker.drain_all()
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]},
                       "occurred": {"since": (when - dt.timedelta(seconds=5)).isoformat(),
                                    "until": (when + dt.timedelta(seconds=5)).isoformat()}}}
    with get_client(sync_client=True) as client:
        for _ in range(60):
            if client.request("POST", "/events/filter", json=body).json()["events"]:
                return
            time.sleep(0.5)
    raise AssertionError("heartbeat event never became visible")


def _state(run_id):  # noqa: ANN001, ANN202
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


def test_dead_runs_are_crashed_and_live_ones_kept(prefect_harness) -> None:
    from flows.runs import L_BEAT, L_HOST, L_PID, L_START, crash_dead_runs
    from tasks.liveness import process_start

    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_here = _running_run({L_HOST: host, L_PID: str(gone.pid)})
    alive_here = _running_run({L_HOST: host, L_PID: str(os.getpid()),
                               L_START: process_start(os.getpid()) or ""})
    reused_pid = _running_run({L_HOST: host, L_PID: str(os.getpid()), L_START: "1"})
    silent_elsewhere = _running_run({L_HOST: "other-host", L_PID: "1", L_BEAT: "30"})
    beating_elsewhere = _running_run({L_HOST: "other-host", L_PID: "2", L_BEAT: "30"})
    unclaimed = _running_run({})

    crashed = set(crash_dead_runs())
    assert crashed == {dead_here, reused_pid}  # other hosts: too young to judge
    # ten minutes later: one run on the other host beat 10 s ago, the other never did
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=600)
    _heartbeat(beating_elsewhere, later - dt.timedelta(seconds=10))
    assert set(crash_dead_runs(now=later)) == {silent_elsewhere}
    for r in (dead_here, reused_pid, silent_elsewhere):
        st = _state(r)
        assert st.is_crashed() and "Marked crashed" in st.message
    for r in (alive_here, beating_elsewhere, unclaimed):
        assert _state(r).is_running()


def test_zombie_automation_is_created_once(prefect_harness) -> None:
    from prefect.automations import Automation

    from flows.runs import ZOMBIE_AUTOMATION, ensure_zombie_automation

    ensure_zombie_automation()
    ensure_zombie_automation()
    a = Automation.read(name=ZOMBIE_AUTOMATION)
    assert a.trigger.within == dt.timedelta(seconds=90)
    assert a.actions[0].state.value == "CRASHED"
