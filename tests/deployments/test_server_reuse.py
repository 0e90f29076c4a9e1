"""A build from the command line uses a running 'tessera server' instead of starting one."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments import server


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fake Prefect API answering /api/health, and an empty PREFECT_HOME."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}/api"
    httpd.shutdown()


def test_no_record_no_server(api: str) -> None:
    assert server.running_server() is None


def test_recorded_live_server_is_used(api: str) -> None:
    path = server.record_server(api, os.getpid())
    assert path.parent == Path(os.environ["PREFECT_HOME"])
    assert server.running_server() == api
    server.forget_server(os.getpid() + 1)  # another process's record is not removed
    assert server.running_server() == api
    server.forget_server(os.getpid())
    assert server.running_server() is None and not path.exists()


def test_dead_or_silent_server_is_not_used(api: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    server.record_server(api, dead.pid)
    assert server.running_server() is None  # the process that recorded it is gone
    server.record_server(api.replace("/api", "/nothing"), os.getpid())
    assert server.running_server() is None  # alive, but no API answers there
    server.server_record_path().write_text("{not json")
    assert server.running_server() is None


def test_cli_uses_it_for_builds_only(api: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from deployments import cli

    server.record_server(api, os.getpid())
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli.main(["plan"]) == 0
    assert "PREFECT_API_URL" not in os.environ  # plan needs no server
    monkeypatch.setattr(cli, "_dispatch", lambda a, t0: 0)
    assert cli.main(["demo"]) == 0
    assert os.environ["PREFECT_API_URL"] == api
    assert f"Using the Prefect server of 'tessera server' at {api}" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")  # the user's choice wins
    assert cli.main(["build"]) == 0
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
