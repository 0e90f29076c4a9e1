"""Zone-group writer leases: a killed writer's lease does not block a resume on its host."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from tasks.config import StorageConfig
from tasks.errors import StorageError
from tasks.liveness import process_start, this_process
from tasks.publish import LOCKS_DIR, ZoneLease


def _plant(store, group: str, holder: dict) -> None:  # noqa: ANN001
    d = store / LOCKS_DIR / group
    d.mkdir(parents=True, exist_ok=True)
    (d / f"x-{time.time_ns()}-deadbeef").write_text(json.dumps(holder))


def test_dead_writer_lease_is_reaped_at_once(tmp_path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _plant(tmp_path, "utm31", {"host": socket.gethostname(), "pid": gone.pid, "start": None})
    t0 = time.monotonic()
    with ZoneLease(str(tmp_path), "utm31", StorageConfig(), exclusive=True, ttl_s=300,
                   timeout_s=5):
        assert time.monotonic() - t0 < 2
    assert list((tmp_path / LOCKS_DIR / "utm31").iterdir()) == []


def test_live_or_foreign_writer_lease_still_excludes(tmp_path) -> None:
    me = this_process()
    assert me["start"] == process_start(me["pid"])
    _plant(tmp_path, "utm31", me)  # alive: this very process
    _plant(tmp_path, "utm32", {"host": "another-host", "pid": 1, "start": None})
    for group in ("utm31", "utm32"):
        with pytest.raises(StorageError, match="conflicting leases"):
            with ZoneLease(str(tmp_path), group, StorageConfig(), exclusive=True, ttl_s=300,
                           timeout_s=0.5):
                pass


def test_lease_names_its_writer(tmp_path) -> None:
    with ZoneLease(str(tmp_path), "utm31", StorageConfig(), exclusive=False):
        (lease,) = (tmp_path / LOCKS_DIR / "utm31").iterdir()
        assert json.loads(lease.read_text())["pid"] == this_process()["pid"]
