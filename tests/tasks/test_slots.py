"""A killed holder of a global concurrency slot cannot block others for long."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOLDER = """
import sys, time
from tasks.slots import held_slot
with held_slot(sys.argv[1], beat_s=2):
    print("held", flush=True)
    time.sleep(600)
"""


def _limit(name: str, limit: int = 1) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def _active(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_missing_limit_is_no_limit(prefect_harness, caplog) -> None:
    from tasks.slots import held_slot

    with held_slot("no-such-limit") as held:
        assert held is False
    assert "do not exist" not in caplog.text


def test_slot_is_exclusive_and_released(prefect_harness) -> None:
    from tasks.slots import held_slot

    _limit("excl-test")
    with held_slot("excl-test") as held:
        assert held and _active("excl-test") == 1
        with pytest.raises(TimeoutError):
            with held_slot("excl-test", timeout_s=3):
                pass
    assert _active("excl-test") == 0


def test_killed_holder_is_reaped_within_about_30_s(prefect_harness) -> None:
    from prefect.settings import PREFECT_API_URL

    from tasks.slots import held_slot

    _limit("gpu-kill-test")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "gpu-kill-test"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(3)  # a few beats
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        t0 = time.monotonic()
        with held_slot("gpu-kill-test", beat_s=2, stale_s=20, timeout_s=120) as held:
            waited = time.monotonic() - t0
            assert held
        assert 15 <= waited <= 35, waited
    finally:
        if holder.poll() is None:
            holder.kill()
