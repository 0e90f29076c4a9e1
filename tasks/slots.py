"""A slot of a global concurrency limit that a dead holder cannot keep (the ``gpu`` limit).

Prefect's own ``concurrency()`` holds a slot under a lease the holder renews; a holder killed
with ``kill -9`` keeps the slot until the lease expires, and the server accepts no lease
shorter than 60 s (300 s by default): every other build's training waits that long doing
nothing. :func:`held_slot` adds liveness on top of the same lease API:

- the holder takes the slot with a 60 s lease, renews it every 20 s, and beats a counter in
  a Prefect Variable ``tessera-slot-<lease id>`` every ``beat_s`` seconds;
- a waiter, while the limit is full, reads the holders' variables; a holder whose counter has
  not moved for ``stale_s`` seconds (measured on the waiter's own clock, so clocks of
  different machines need not agree) is dead: the waiter releases its lease and takes over.

So a killed holder blocks others for about ``stale_s`` + one poll (about 25 s), not minutes.
A limit that does not exist on the server is no limit: the slot is skipped quietly (a local
build with a temporary server has none), with one DEBUG line instead of Prefect's warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

LOGGER = logging.getLogger(__name__)

PREFIX = "tessera-slot-"
"""Name prefix of the liveness variables."""
LEASE_S = 60.0
"""Lease duration asked of the server (its minimum)."""
RENEW_S = 20.0
"""How often the holder renews its lease."""


def _variable(lease_id: UUID) -> str:
    return f"{PREFIX}{lease_id}"


def _try_acquire(client: Any, name: str) -> tuple[str, UUID | None, float]:
    """``("acquired", lease, 0)``, ``("missing", None, 0)`` or ``("locked", None, retry_s)``."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        resp = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S)
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 423:
            retry = float(exc.response.headers.get("Retry-After", 2) or 2)
            return "locked", None, min(max(retry, 0.5), 5.0)
        raise
    body = resp.json()
    if not body.get("limits"):
        client.release_concurrency_slots_with_lease(UUID(body["lease_id"]))
        return "missing", None, 0.0
    return "acquired", UUID(body["lease_id"]), 0.0


class _StaleWatch:
    """A waiter's view of the holders' beats: counter value and when it last moved."""

    def __init__(self, limit: str, stale_s: float) -> None:
        self.limit = limit
        self.stale_s = stale_s
        self.seen: dict[str, tuple[Any, float]] = {}

    def reap(self, client: Any) -> list[str]:
        """Release the leases of holders whose beat stopped; return their variable names."""
        now = time.monotonic()
        reaped = []
        for v in client.read_variables():
            if not v.name.startswith(PREFIX) or not isinstance(v.value, dict):
                continue
            if v.value.get("limit") != self.limit:
                continue
            beat = v.value.get("beat")
            last = self.seen.get(v.name)
            if last is None or last[0] != beat:
                self.seen[v.name] = (beat, now)
                continue
            if now - last[1] < self.stale_s:
                continue
            lease = UUID(v.name.removeprefix(PREFIX))
            with contextlib.suppress(Exception):
                client.release_concurrency_slots_with_lease(lease)
            with contextlib.suppress(Exception):
                client.delete_variable_by_name(v.name)
            self.seen.pop(v.name, None)
            LOGGER.warning("released slot of %r held by a dead holder (%s pid %s, silent %.0f s)",
                           self.limit, v.value.get("host"), v.value.get("pid"), now - last[1])
            reaped.append(v.name)
        return reaped


def _beat(lease: UUID, limit: str, beat_s: float, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableUpdate

    n = 0
    last_renew = time.monotonic()
    with get_client(sync_client=True) as client:
        while not stop.wait(beat_s):
            n += 1
            try:
                client.update_variable(VariableUpdate(name=_variable(lease), value={
                    "limit": limit, "beat": n, "host": socket.gethostname(), "pid": os.getpid()}))
                if time.monotonic() - last_renew >= RENEW_S:
                    client.renew_concurrency_lease(lease, LEASE_S)
                    last_renew = time.monotonic()
            except Exception as exc:  # keep beating; a lost lease is logged once per beat
                LOGGER.warning("slot %r: beat or lease renewal failed (%s)", limit, type(exc).__name__)


@contextlib.contextmanager
def held_slot(limit: str, *, beat_s: float = 5.0, stale_s: float = 20.0,
              timeout_s: float | None = None) -> Iterator[bool]:
    """Hold one slot of the global concurrency limit ``limit`` (see module docstring).

    Yields True while a slot is held, False when the limit does not exist (no limit).

    Raises:
        TimeoutError: no slot within ``timeout_s`` seconds.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    watch = _StaleWatch(limit, stale_s)
    with get_client(sync_client=True) as client:
        while True:
            state, lease, wait_s = _try_acquire(client, limit)
            if state != "locked":
                break
            watch.reap(client)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Expected a slot of limit {limit!r} within {timeout_s:.0f} s. "
                                   "Got none.")
            time.sleep(wait_s)
        if lease is None:
            LOGGER.debug("concurrency limit %r does not exist: no slot taken", limit)
            yield False
            return
        client.create_variable(VariableCreate(name=_variable(lease), value={
            "limit": limit, "beat": 0, "host": socket.gethostname(), "pid": os.getpid()}))
    stop = threading.Event()
    beater = threading.Thread(target=_beat, args=(lease, limit, beat_s, stop), daemon=True,
                              name=f"slot-{limit}")
    beater.start()
    try:
        yield True
    finally:
        stop.set()
        beater.join(timeout=beat_s + 5)
        with get_client(sync_client=True) as client:
            with contextlib.suppress(Exception):
                client.release_concurrency_slots_with_lease(lease)
            with contextlib.suppress(Exception):
                client.delete_variable_by_name(_variable(lease))
