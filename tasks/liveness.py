"""Is the process that wrote a lease or claimed a run still alive?

A process is identified by (host, pid, start time): the start time (clock ticks since boot,
Linux ``/proc``) tells a live process apart from a later one that reused the pid. Only a
process on this host can be checked; elsewhere callers fall back to time (a lease's TTL, a
run's heartbeats).
"""

from __future__ import annotations

import os
import socket
from typing import Any


def process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()
        return stat[19].decode()
    except (OSError, IndexError):
        return None


def this_process() -> dict[str, Any]:
    """This process's identity: ``{"host", "pid", "start"}``."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, given ``start``, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or process_start(pid) in (None, start)


def known_dead(identity: dict[str, Any]) -> bool:
    """True only when ``identity`` names a process of this host that is gone."""
    try:
        pid = int(identity["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if identity.get("host") != socket.gethostname():
        return False
    return not pid_alive(pid, identity.get("start"))
