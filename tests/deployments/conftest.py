"""Keep the command line's Prefect defaults from leaking into the rest of the session."""

from __future__ import annotations

import os

import pytest

from deployments.cli import CLI_PREFECT_DEFAULTS


@pytest.fixture(autouse=True)
def _restore_cli_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLI_PREFECT_DEFAULTS:  # main() sets missing ones; monkeypatch restores them
        monkeypatch.setenv(name, os.environ.get(name, CLI_PREFECT_DEFAULTS[name]))
