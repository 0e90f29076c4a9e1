"""Flow runs that died do not stay RUNNING.

A process killed with ``kill -9`` (or a machine that vanished) cannot report its run's end,
so Prefect shows it RUNNING forever. Two mechanisms end such runs:

- **On every build start** (:func:`crash_dead_runs`): each factory run records, in its
  flow-run labels, the host, pid and process start time it runs in and its heartbeat
  interval (:func:`claim_current_run`). A starting build marks CRASHED every RUNNING run of
  the factory's flows whose process is gone from this host (pid not alive, or reused by
  another process), or, on another host, that has sent no heartbeat event for three
  heartbeat intervals. Runs not claimed this way are left alone.
- **On a long-lived server** (:func:`ensure_zombie_automation`, created by ``tessera
  server`` and ``deployments.server.ensure_limits``): Prefect's own zombie detection, an
  automation that crashes a flow run whose heartbeats stop for ``3 x HEARTBEAT_S``.

Heartbeats are Prefect's flow-run heartbeat events (``flows.heartbeat_frequency``; the
factory's CLI and ``serve`` set :data:`HEARTBEAT_S` unless the user chose a value).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from typing import Any
from uuid import UUID

from tasks.liveness import pid_alive, process_start

LOGGER = logging.getLogger(__name__)

FACTORY_FLOWS = ("build-region", "build-region-stages", "backfill", "annual-build", "train")
"""Flows whose dead runs a build start cleans up."""
HEARTBEAT_S = 30
"""Heartbeat interval the factory asks of Prefect (its minimum)."""
STALE_BEATS = 3
"""Missed heartbeats after which a run on another host is taken as dead."""
ZOMBIE_AUTOMATION = "tessera-crash-zombie-flow-runs"
L_HOST, L_PID, L_START, L_BEAT = ("tessera.host", "tessera.pid", "tessera.pid_start",
                                  "tessera.heartbeat_s")


def _heartbeat_s() -> int | None:
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


def claim_current_run() -> None:
    """Label the current flow run with this process's identity and heartbeat interval."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    labels: dict[str, Any] = {L_HOST: socket.gethostname(), L_PID: str(os.getpid())}
    if (start := process_start(os.getpid())) is not None:
        labels[L_START] = start
    if (beat := _heartbeat_s()) is not None:
        labels[L_BEAT] = str(max(30, beat))
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(ctx.flow_run.id, labels)


def _last_heartbeat(client: Any, run_id: UUID, since: dt.datetime,
                    until: dt.datetime) -> dt.datetime | None:
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]},
                       "occurred": {"since": since.isoformat(), "until": until.isoformat()},
                       "order": "DESC"},
            "limit": 1}
    events = client.request("POST", "/events/filter", json=body).json().get("events") or []
    if not events:
        return None
    return dt.datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00"))


def _dead_reason(client: Any, run: Any, now: dt.datetime, host: str) -> str | None:
    labels = dict(run.labels or {})
    if L_PID not in labels:
        return None
    if labels.get(L_HOST) == host:
        if not pid_alive(int(labels[L_PID]), labels.get(L_START)):
            return f"its process (pid {labels[L_PID]} on {host}) is gone"
        return None
    beat = labels.get(L_BEAT)
    if beat is None:
        return None
    window = dt.timedelta(seconds=int(beat) * STALE_BEATS)
    started = (run.state.timestamp if run.state is not None else None) or run.start_time or now
    if now - started < window:
        return None
    last = _last_heartbeat(client, run.id, now - window, now)
    if last is None:
        return f"no heartbeat from {labels.get(L_HOST)} for {window.total_seconds():.0f} s"
    return None


def crash_dead_runs(flow_names: tuple[str, ...] = FACTORY_FLOWS,
                    now: dt.datetime | None = None) -> list[UUID]:
    """Mark CRASHED every RUNNING run of ``flow_names`` whose process is dead (see module
    docstring); return their ids. ``now`` (tests) defaults to the current time. Errors
    talking to the API are logged, never raised: this is housekeeping and must not stop a
    build."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Crashed

    me = FlowRunContext.get()
    mine = me.flow_run.id if me is not None and me.flow_run is not None else None
    crashed: list[UUID] = []
    host = socket.gethostname()
    now = now or dt.datetime.now(dt.UTC)
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=list(flow_names))),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
            )
            for run in runs:
                if run.id == mine:
                    continue
                reason = _dead_reason(client, run, now, host)
                if reason is None:
                    continue
                client.set_flow_run_state(run.id, Crashed(message=f"Marked crashed by a later "
                                                          f"build: {reason}."), force=True)
                LOGGER.warning("flow run %s (%s) marked crashed: %s", run.name, run.id, reason)
                crashed.append(run.id)
    except Exception as exc:  # housekeeping only
        LOGGER.warning("could not check for dead flow runs (%s: %s)", type(exc).__name__, exc)
    return crashed


def ensure_zombie_automation(heartbeat_s: int = HEARTBEAT_S) -> None:
    """Create (once) the server automation that crashes flow runs whose heartbeats stop."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="Crash flow runs whose heartbeats stopped (a killed process or machine).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=dt.timedelta(seconds=heartbeat_s * STALE_BEATS),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {heartbeat_s * STALE_BEATS} s: "
                                    "the process running this flow is gone.")],
    ).create()
