"""The command line makes OpenMP threads wait passively before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_cli_sets_passive_openmp_before_torch() -> None:
    code = ("import os, sys; from deployments.cli import main; main(['plan']); "
            "print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False PASSIVE"


def test_cli_keeps_the_users_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.cli import main

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["config", "--demo"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
