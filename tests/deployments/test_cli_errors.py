"""The command line fails fast and clean on every bad input a new user might type.

Each case runs ``deployments.cli.main`` in-process, in an empty working directory, and must
end with exit status 2, one line on stderr naming the field, no traceback, nothing created
in the working directory and no Prefect server started.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deployments import cli

BBOX = "--bbox 0.11 52.19 0.15 52.205"
"""A small valid region (the demo's box)."""

# (command line, text the one-line error must contain: the field or option it names)
CASES: list[tuple[str, str]] = [
    # region
    ("plan --bbox 0.2 52 0.1 52.1 --year 2023", "region.bbox"),  # reversed longitudes
    ("build --bbox 0.1 52.2 0.2 52.1", "region.bbox"),  # reversed latitudes
    ("build --bbox 0 91 0.1 92", "region.bbox"),  # latitude beyond 90
    ("build --bbox -181 52 -179.9 52.1", "region.bbox"),  # longitude beyond -180
    ("build --bbox nan 52 0.1 52.1", "not a number"),  # NaN coordinate
    ("plan --bbox 0 52 inf 52.1", "region.bbox"),  # infinite coordinate
    ("build --bbox 0.1 52 0.1 52.1", "region.bbox"),  # zero width
    ("build --bbox a b c d", "--bbox"),  # not numbers
    ("build --bbox 0 1 2", "--bbox"),  # three numbers
    ("build --bbox 0 50 5 55", "max_area_km2"),  # region far too large
    ("build --set 'region.geojson={type: Polygon, coordinates: [[[0,0],[1,1],[1,0],[0,1],[0,0]]]}'",
     "region.geojson"),  # self-intersecting polygon
    ("build " + BBOX + " --set 'region.geojson={type: Point, coordinates: [0, 52]}'", "region"),
    ("build " + BBOX + " --set region.name='my region'", "region.name"),
    # year
    ("build " + BBOX + " --year 2016", "year"),  # before Sentinel-1/2 coverage
    ("build " + BBOX + " --year 2030", "year"),  # not complete
    ("build " + BBOX + " --year twenty", "--year"),
    ("build " + BBOX + " --set year=abc", "year"),
    ("build " + BBOX + " --set year.x=1", "year.x"),  # subkey of a scalar
    # --set syntax and unknown fields
    ("build " + BBOX + " --set colour=blue", "colour"),
    ("build " + BBOX + " --set training.stepz=5", "training.stepz"),
    ("build " + BBOX + " --set notkeyvalue", "--set"),
    ("build " + BBOX + " --set =5", "--set"),
    ("build " + BBOX + " --set training..steps=5", "--set"),
    ("build " + BBOX + " --set region.bbox=[1,2", "region.bbox"),  # broken YAML value
    ("build " + BBOX + " --steps 5", "--steps"),  # unknown option
    ("bulid " + BBOX, "bulid"),  # unknown command
    ("", "COMMAND"),  # no command
    # wrong values
    ("build " + BBOX + " --set training.steps=-5", "training.steps"),
    ("build " + BBOX + " --set training.steps=0", "training.steps"),
    ("build " + BBOX + " --set training.learning_rate=.nan", "not a number"),
    ("build " + BBOX + " --set training.processes=3", "training"),  # batch not divisible
    ("build " + BBOX + " --set runner.kind=gpu", "runner.kind"),
    ("build " + BBOX + " --set runner.max_workers=0", "runner.max_workers"),
    ("build " + BBOX + " --set runner.dask_address=localhost:8786", "runner.dask_address"),
    ("build " + BBOX + " --set source.kind=landsat", "source.kind"),
    ("build " + BBOX + " --set embedding.batch_size=-1", "embedding.batch_size"),
    ("build " + BBOX + " --set tile_size_px=300", "tile_size_px"),
    ("build " + BBOX + " --seed -1", "seed"),
    # storage
    ("build " + BBOX + " --output s3:/bucket/out", "storage.output_uri"),  # one slash
    ("build " + BBOX + " --output s3:bucket/out", "storage.output_uri"),
    ("build " + BBOX + " --output s3://", "storage.output_uri"),  # no bucket
    ("build " + BBOX + " --output s3://Bad_Bucket/x", "storage.output_uri"),
    ("build " + BBOX + " --output gs://bucket/out", "storage.output_uri"),  # unknown scheme
    ("build " + BBOX + " --work s3:/bucket/work", "storage.work_uri"),
    ("build " + BBOX + " --output ''", "storage.output_uri"),  # empty
    ("build " + BBOX + " --set storage.s3_endpoint_url=localhost:9000", "storage.s3_endpoint_url"),
    ("build " + BBOX + " --set storage.s3_credentials_block='bad name!'", "storage.s3_credentials_block"),
    ("build " + BBOX + " --output {files}/blocker/out", "storage.output_uri"),  # under a file
    ("demo --output {files}/blocker", "storage.output_uri"),  # a file
    ("demo --work {files}/blocker/deep/work", "storage.work_uri"),  # under a file
    # checkpoint and credentials
    ("demo --set training.enabled=false --set training.checkpoint_uri=nope.pt", "training.checkpoint_uri"),
    ("demo --set training.enabled=false --set training.checkpoint_uri={files}", "training.checkpoint_uri"),
    ("demo --set training.enabled=false --set training.checkpoint_uri=s3:/b/m.pt", "training.checkpoint_uri"),
    ("build " + BBOX + " --set training.enabled=false", "training"),  # no checkpoint given
    ("demo --set source.kind=sentinelhub", "source.sentinelhub"),  # no SH_CLIENT_ID/SECRET
    ("demo --set source.kind=stac", "evaluation.labels"),  # synthetic labels, real scenes
    # config files
    ("build -c {files}/missing.yaml", "config"),
    ("build -c {files}/adir.yaml", "config"),  # a directory
    ("build -c {files}/loop.yaml", "config"),  # unreadable (symlink loop)
    ("build -c {files}/binary.yaml", "config"),  # not text
    ("build -c {files}/broken.yaml", "config"),
    ("build -c {files}/broken.toml", "config"),
    ("build -c {files}/broken.json", "config"),
    ("build -c {files}/empty.yaml", "config"),
    ("build -c {files}/list.yaml", "config"),
    ("build -c {files}/build.txt", "config"),  # unknown format
    ("build -c {files}/wrongtype.yaml", "region.bbox"),
    ("build -c {files}/unknown.yaml", "colour"),
    ("build -c {files}/noregion.yaml", "region"),
]

FILES = {
    "broken.yaml": "region: {bbox: [0.1, 52.19\nyear: 2023\n",
    "broken.toml": "year = \n[region]\n",
    "broken.json": '{"year": 2023,',
    "empty.yaml": "\n",
    "list.yaml": "- 1\n- 2\n",
    "build.txt": "year: 2023\n",
    "wrongtype.yaml": "year: 2023\nregion: {bbox: abc}\n",
    "unknown.yaml": "year: 2023\ncolour: blue\nregion: {bbox: [0.11, 52.19, 0.15, 52.205]}\n",
    "noregion.yaml": "year: 2023\n",
    "blocker": "a file, not a folder\n",
}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Input files, outside the working directory."""
    d = tmp_path / "files"
    d.mkdir()
    for name, text in FILES.items():
        (d / name).write_text(text)
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00year")
    (d / "adir.yaml").mkdir()
    (d / "loop.yaml").symlink_to(d / "loop.yaml")
    return d


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail any attempt to start a Prefect server; returns the calls seen."""
    calls: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append("ensure_prefect_api")
        raise AssertionError("a Prefect server was started for a bad input")

    monkeypatch.setattr(cli, "ensure_prefect_api", refuse)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    for name in ("SH_CLIENT_ID", "SH_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_enough_cases() -> None:
    assert len(CASES) >= 39
    assert len({c for c, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("command", "names"), CASES, ids=[c or "(none)" for c, _ in CASES])
def test_bad_input_fails_fast_and_clean(command: str, names: str, files: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, no_server: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(p.name for p in files.iterdir())
    argv = shlex.split(command.replace("{files}", str(files)))

    rc = cli.main(argv)

    out, err = capsys.readouterr()
    assert rc == cli.EXIT_BAD_INPUT, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert names in err, err
    assert "Traceback" not in err + out
    assert list(cwd.iterdir()) == [], "a failed start left files behind"
    assert sorted(p.name for p in files.iterdir()) == before
    assert not (files / "blocker").is_dir()
    assert no_server == []


def test_help_examples_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], no_server: list[str]) -> None:
    """Every cheap example of ``tessera --help`` (plan, config) runs as written, in order."""
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in cli.EPILOG.splitlines():
        if not line.startswith("  tessera "):
            continue
        command = line.strip().split("  ")[0]  # the example, without its description
        argv = shlex.split(command)[1:]
        if argv[0] not in ("plan", "config"):
            continue
        target = None
        if ">" in argv:
            target = argv[argv.index(">") + 1]
            argv = argv[: argv.index(">")]
        assert cli.main(argv) == 0, (command, capsys.readouterr().err)
        out = capsys.readouterr().out
        if target:
            Path(target).write_text(out)
        ran.append(command)
    assert len(ran) >= 3, ran


def test_config_prints_default_and_demo(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from tasks.config import demo_config, last_complete_year

    assert cli.main(["config"]) == 0
    plain = yaml.safe_load(capsys.readouterr().out)
    assert cli.main(["config", "--demo"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo == demo_config().model_dump(mode="json")
    assert plain != demo and plain["year"] == last_complete_year()
    assert plain["training"]["steps"] != demo["training"]["steps"]


def test_plan_without_year_uses_last_complete_year(capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.config import last_complete_year

    assert cli.main(["plan", "--bbox", "5.9", "45", "6.1", "45.05"]) == 0
    assert f" {last_complete_year()}:" in capsys.readouterr().out.splitlines()[0]


def test_server_that_does_not_start_ends_in_one_line(tmp_path: Path) -> None:
    """A temporary Prefect server that cannot start in time (allowance 0 s): one line saying
    what to do, exit status 3, no traceback, nothing left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
               PREFECT_HOME=str(tmp_path / "home"), PREFECT_LOGGING_LEVEL="WARNING",
               PYTHONPATH=str(Path(cli.__file__).resolve().parents[1]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "deployments.cli", "demo"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == cli.EXIT_NO_SERVER, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tessera server" in lines[0] and "PREFECT_API_URL" in lines[0], lines
    assert list(cwd.iterdir()) == []


def test_cli_defaults_do_not_override_the_user(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert cli.main(["config", "--demo"]) == 0
    capsys.readouterr()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"


def test_cli_defaults_are_real_prefect_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names in CLI_PREFECT_DEFAULTS are Prefect settings (a typo would silently do nothing)."""
    from prefect.settings import Settings

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "123")
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "31")
    s = Settings()
    assert s.server.analytics_enabled is False
    assert s.server.ephemeral.startup_timeout_seconds == 123
    assert s.flows.heartbeat_frequency == 31
    assert set(cli.CLI_PREFECT_DEFAULTS) == {"PREFECT_SERVER_ANALYTICS_ENABLED",
                                             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                                             "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}


def test_published_seconds_are_the_command_wall_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A cached run reports the command's own wall time, not the flow's (which skips work)."""
    import time

    import flows.build
    from flows.build import BuildResult

    def cached_build(config: object) -> BuildResult:
        time.sleep(2.2)  # the server start, flow set-up and cache look-ups a real run spends
        return BuildResult(store_uri="x/2024.zarr", groups=["utm31"], tiles=["t"],
                           model_version="m", n_valid_pixels=1, seconds=0.01)

    monkeypatch.setattr(cli, "ensure_prefect_api", lambda: None)
    monkeypatch.setattr(flows.build, "build_region", cached_build)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo"]) == 0
    import re

    m = re.search(r"Published 1 pixels of 1 tile\(s\) in (\d+) s\.", capsys.readouterr().out)
    assert m is not None and 2 <= int(m.group(1)) <= 30  # not the flow's 0.01 s


def test_unreachable_api_ends_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """PREFECT_API_URL naming a server that is not there: one line, exit 3, nothing written."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(tmp_path)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert cli.main(["demo"]) == cli.EXIT_NO_SERVER
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PREFECT_API_URL" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
