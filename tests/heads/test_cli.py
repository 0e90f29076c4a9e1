"""The head commands fail on bad input with one line and exit status 2, before any server."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.cli import main


@pytest.mark.parametrize(("args", "match"), [
    (["train-head", "--labels", "l.txt", "--column", "c", "--year", "2024"], "labels_uri"),
    (["train-head", "--labels", "EMPTY", "--column", "c", "--year", "2024"], "empty file"),
    (["train-head", "--labels", "l.csv", "--column", "c", "--year", "2024",
      "--set", "split.by=parcel"], "split.by"),
    (["predict-map", "NOHEAD", "--year", "2024"], "Expected a committed head"),
])
def test_bad_input_exits_2_before_a_server(tmp_path: Path, capsys, monkeypatch, args: list[str],
                                          match: str) -> None:
    (tmp_path / "empty.geojson").write_text("")
    (tmp_path / "l.csv").write_text("lon,lat,c\n0.1,52.2,a\n")
    args = [a.replace("EMPTY", str(tmp_path / "empty.geojson")).replace("NOHEAD", str(tmp_path / "h"))
            for a in args]
    monkeypatch.chdir(tmp_path)

    def no_server(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a Prefect server was started")

    monkeypatch.setattr("deployments.cli.ensure_prefect_api", no_server)
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
