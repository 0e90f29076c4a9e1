"""Deployments and the command line (no server needed)."""

from __future__ import annotations

import pytest

from deployments.cli import main
from tasks.config import BuildConfig


def test_build_region_deployment_is_declared():
    from deployments.serve import deployments

    deps = {d.name: d for d in deployments()}
    assert "build-region" in deps
    d = deps["build-region"]
    BuildConfig.model_validate(d.parameters["config"])  # default parameters are valid
    assert d.enforce_parameter_schema  # the server validates runs against the typed form
    from prefect.utilities.callables import parameter_schema

    from flows.build import build_region

    schema = parameter_schema(build_region).model_dump()
    assert schema["required"] == ["config"]
    assert "Calendar year to build" in str(schema)  # field descriptions reach the UI form


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "build", "plan", "config", "serve", "server", "export-dpixels", "import-dpixels"):
        assert cmd in out


def test_cli_plan_and_bad_input(capsys):
    assert main(["plan", "--bbox", "5.97", "45.0", "6.03", "45.02", "--year", "2023"]) == 0
    out = capsys.readouterr().out
    assert "31N-" in out and "32N-" in out
    assert main(["plan", "--bbox", "0.2", "52", "0.1", "52.1", "--year", "2023"]) == 2
    err = capsys.readouterr().err
    assert "region.bbox" in err and "min_lon < max_lon" in err
    assert main(["plan", "--bbox", "0.1", "52", "0.2", "52.1", "--year", "2016"]) == 2
    assert "year" in capsys.readouterr().err


def test_cli_config_roundtrip(tmp_path, capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "b.yaml").write_text(text)
    assert main(["plan", "-c", str(tmp_path / "b.yaml")]) == 0
    assert "tile(s)" in capsys.readouterr().out


def test_every_task_names_its_code():
    """Each task's cache key includes the hash of the code it depends on."""
    from prefect import Task

    from tasks import prefect_tasks as pt

    names = {obj.name for obj in vars(pt).values() if isinstance(obj, Task)}
    assert names == set(pt.TASK_CODE)
    from tasks.storage import code_version

    for mods in pt.TASK_CODE.values():
        assert len(code_version(*mods)) == 12


def test_progress_counts_committed_stages(tmp_path):
    from deployments.progress import BuildProgress

    p = BuildProgress(str(tmp_path), ["t1", "t2"])
    assert p.count() == 0
    (tmp_path / "scenes" / "t1").mkdir(parents=True)
    (tmp_path / "scenes" / "t1" / "k.zarr.done.json").write_text("{}")
    (tmp_path / "masks" / "t2").mkdir(parents=True)  # a partial result: no marker yet
    assert p.count() == 1


def test_code_version_counts_the_kernel_sources(tmp_path, monkeypatch) -> None:
    """A change to a compiled kernel's C source changes the model's code version (embeddings
    cached by the old kernels are not served)."""
    import tasks.storage as storage

    pkg = tmp_path / "pkg"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "k.c").write_text("int f(void) { return 1; }\n")
    (pkg / "kernels" / "k.h").write_text("#define X 1\n")
    (pkg / "notes.txt").write_text("a")
    monkeypatch.setattr(storage, "__file__", str(tmp_path / "tasks" / "storage.py"))
    version = storage.code_version.__wrapped__  # uncached: the files change under it
    v0 = version("pkg")
    (pkg / "notes.txt").write_text("b")  # not code
    assert version("pkg") == v0
    (pkg / "kernels" / "k.c").write_text("int f(void) { return 2; }\n")
    v1 = version("pkg")
    (pkg / "kernels" / "k.h").write_text("#define X 2\n")
    assert len({v0, v1, version("pkg")}) == 3
