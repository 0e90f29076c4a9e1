"""Training stage: sharded, globally shuffled training set; streamed fit; torchrun launch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tasks.acquire import acquire
from tasks.config import (
    DPixelConfig,
    MaskConfig,
    ModelConfig,
    SourceConfig,
    StorageConfig,
    TrainingConfig,
)
from tasks.dpixels import extract_dpixels
from tasks.grid import Tile
from tasks.mask import cloud_mask
from tasks.refs import DPixelRef
from tasks.train import (
    TRAINSET_FORMAT,
    ZarrShards,
    build_training_set,
    load_training_set,
    train_model,
    validation_tiles,
)
from tessera_model import load_model

from .fakes import FakeSource

TILES = [
    Tile(zone=31, south=False, x0=296960 + i * 2560, y0=5788160, size_px=256) for i in range(3)
]
CFG = TrainingConfig(steps=3, batch_size=16, pixels_per_tile=100, min_valid_s2=1,
                     shard_pixels=64, checkpoint_every=2, device="cpu",
                     validation_tiles=0)  # fmt: skip


@pytest.fixture(autouse=True)
def _single_thread() -> object:
    """Tiny models run fastest on one thread (and do not stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dpixels(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[DPixelRef], StorageConfig]:
    """Three tiles whose S2 values are offset by 2000 x tile index (so a pixel names its tile)."""
    root = tmp_path_factory.mktemp("train")
    storage = StorageConfig(output_uri=str(root / "out"), work_uri=str(root / "work"))
    refs = []
    for i, tile in enumerate(TILES):
        scenes = acquire(tile, 2022, SourceConfig(), storage, scene_source=FakeSource())
        mask = cloud_mask(scenes, MaskConfig(dilation_px=0), storage)
        dp = extract_dpixels(scenes, mask, DPixelConfig(chunk_px=128), storage)
        g = zarr.open_group(dp.uri, mode="r+")
        g["bands"][:] = g["bands"][:] + np.uint16(2000 * i)
        refs.append(dp)
    return refs, storage


def _tile_of(s2: np.ndarray) -> np.ndarray:
    return s2[:, 0, 0] // 2000  # band 0 of the first step: 100*0 + t + 1 + 2000*tile


def test_sharded_globally_shuffled(dpixels: tuple[list[DPixelRef], StorageConfig]) -> None:
    refs, storage = dpixels
    ts = build_training_set(refs, CFG, seed=4, storage=storage)
    assert (ts.n_pixels, ts.n_tiles) == (300, 3)
    root = zarr.open_group(ts.uri, mode="r")
    assert root.attrs["format"] == TRAINSET_FORMAT and "staging" not in root
    shards = ZarrShards(ts, storage)
    sizes = shards.shard_sizes
    assert len(sizes) == 5 and sum(sizes) == 300  # ceil(3 * 100 / 64) buckets
    tiles = [_tile_of(shards.read_shard(i).s2) for i in range(len(sizes))]
    for t in tiles:
        assert set(t.tolist()) == {0, 1, 2}  # every shard mixes every tile
        assert (np.diff(t) != 0).sum() > len(t) // 3  # ... in shuffled order, not tile blocks
    assert np.bincount(np.concatenate(tiles)).tolist() == [100, 100, 100]
    data = load_training_set(ts, storage)
    assert data.n_pixels == 300 and data.usable().all()
    assert build_training_set(refs, CFG, seed=4, storage=storage) == ts  # done: skipped
    other = build_training_set(refs, CFG, seed=5, storage=storage)
    assert other.key != ts.key
    assert not np.array_equal(load_training_set(other, storage).s2, data.s2)


def test_train_model_streams_and_resumes(
    dpixels: tuple[list[DPixelRef], StorageConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    refs, storage = dpixels
    ts = build_training_set(refs, CFG, seed=4, storage=storage)
    reads: list[int] = []
    original = ZarrShards.read_shard
    monkeypatch.setattr(
        ZarrShards, "read_shard", lambda self, i: reads.append(i) or original(self, i)
    )
    ck = train_model(ts, ModelConfig(preset="small"), CFG, seed=1, storage=storage)
    assert ck.final_loss is not None and np.isfinite(ck.final_loss)
    assert 1 <= len(reads) <= 3  # 3 steps x 16 pixels touch only the first shards of the epoch
    model, spec = load_model(ck.uri, inference_only=False)
    assert spec.version == "small-0.1" and model.projector is not None
    assert Path(ck.uri).exists() and not (Path(ck.uri).parent / "running.pt").exists()
    assert train_model(ts, ModelConfig(preset="small"), CFG, seed=1, storage=storage) == ck


def test_held_out_tiles_validate_and_stop_the_training(
    dpixels: tuple[list[DPixelRef], StorageConfig],
) -> None:
    refs, storage = dpixels
    cfg = CFG.model_copy(update={"validation_tiles": 1, "validation_pixels": 40,
                                 "validate_every": 2, "steps": 50, "patience": 1,
                                 "min_delta": 1.0, "checkpoint_every": 100})
    ts = build_training_set(refs, cfg, seed=4, storage=storage)
    [held] = validation_tiles(refs, cfg, 4)
    assert validation_tiles(list(reversed(refs)), cfg, 4) == [held]  # order-free choice
    assert validation_tiles(refs[:1], cfg, 4) == []  # one tile: nothing to hold out
    h = refs.index(held)
    root = zarr.open_group(ts.uri, mode="r")
    assert root.attrs["validation_tiles"] == [held.tile.id] and root.attrs["validation_size"] == 40
    shards = ZarrShards(ts, storage)
    seen = np.concatenate([_tile_of(shards.read_shard(i).s2) for i in range(len(shards.shard_sizes))])
    assert sorted(set(seen.tolist())) == sorted({0, 1, 2} - {h}) and ts.n_pixels == 200
    val = shards.validation()
    assert val is not None and val.n_pixels == 40 and set(_tile_of(val.s2).tolist()) == {h}
    reports = []
    ck = train_model(ts, ModelConfig(preset="small"), cfg, seed=1, storage=storage,
                     progress=reports.append)
    obj = torch.load(ck.uri, weights_only=False, map_location="cpu")
    # min_delta 1: no validation can improve enough, so the second one ends the run
    assert obj["step"] == 4 and obj["converged"] is True
    assert [s for s, _ in obj["validation"]] == [2, 4]
    assert reports[-1].converged and reports[-1].validation_step == 4
    assert reports[-1].validation_loss == pytest.approx(obj["validation"][-1][1])
    none = ZarrShards(build_training_set(refs, CFG, seed=4, storage=storage), storage)
    assert none.validation() is None


def test_old_unsharded_layout_is_refused(tmp_path: Path) -> None:
    from tasks.refs import TrainingSetRef

    storage = StorageConfig(output_uri=str(tmp_path / "o"), work_uri=str(tmp_path / "w"))
    uri = str(tmp_path / "w" / "old.zarr")
    zarr.open_group(uri, mode="w").create_array("s2", data=np.zeros((2, 1, 10), np.uint16))
    with pytest.raises(ValueError, match=TRAINSET_FORMAT):
        ZarrShards(TrainingSetRef(uri=uri, key="k", n_pixels=2, n_tiles=1), storage)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(
    dpixels: tuple[list[DPixelRef], StorageConfig], tmp_path: Path
) -> None:
    refs, storage = dpixels
    ts = build_training_set(refs, CFG, seed=4, storage=storage)
    cfg = CFG.model_copy(update={"steps": 2})
    one = train_model(ts, ModelConfig(preset="small"), cfg, 2, storage)
    # another work root (the key ignores the process count: either run is the same product)
    other = storage.model_copy(update={"work_uri": str(tmp_path / "work2")})
    two = train_model(ts, ModelConfig(preset="small"), cfg.model_copy(update={"processes": 2}),
                      2, other)  # fmt: skip
    assert two.key == one.key and two.uri != one.uri
    a = torch.load(one.uri, weights_only=True)
    b = torch.load(two.uri, weights_only=True)
    assert b["world_size"] == 2 and a["world_size"] == 1 and b["step"] == 2
    # the small preset has dropout 0.1 and rank 1 draws other masks: close, not equal
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=0.1)


def test_torchrun_needs_shared_work_store(dpixels: tuple[list[DPixelRef], StorageConfig]) -> None:
    from tasks.refs import TrainingSetRef
    from tasks.train import run_torchrun

    mem = StorageConfig(output_uri="memory://o", work_uri="memory://w")
    ts = TrainingSetRef(uri="memory://w/t.zarr", key="k", n_pixels=1, n_tiles=1)
    with pytest.raises(ValueError, match="shared between processes"):
        run_torchrun(ts, ModelConfig(), CFG.model_copy(update={"processes": 2}), 0, mem, "x.pt")
    with pytest.raises(ValueError, match="divisible by training.processes=3"):
        TrainingConfig(batch_size=16, processes=3)


def test_stop_then_resume_and_progress(
    dpixels: tuple[list[DPixelRef], StorageConfig], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop request during training raises StopRequested, keeps a checkpoint of the steps
    done and commits nothing; the next call resumes from it. Progress is reported."""
    from tasks.errors import StopRequested
    from tasks.stop import clear_stop, request_stop
    from tasks.train import TrainProgress

    refs, storage = dpixels
    storage = storage.model_copy(update={"work_uri": str(tmp_path / "work")})
    ts = build_training_set(refs, CFG, seed=4, storage=storage)
    cfg = CFG.model_copy(update={"steps": 6, "checkpoint_every": 100})
    seen: list[TrainProgress] = []

    def progress(p: TrainProgress) -> None:
        seen.append(p)
        if p.step == 2:
            request_stop("test")

    try:
        with pytest.raises(StopRequested, match="training"):
            train_model(ts, ModelConfig(preset="small"), cfg, 1, storage, progress=progress)
    finally:
        clear_stop()
    running = next((tmp_path / "work" / "checkpoints").glob("*/running.pt"))
    assert torch.load(running, weights_only=False)["step"] == 2
    assert not list((tmp_path / "work" / "checkpoints").glob("*.done.json"))
    assert [p.step for p in seen] == [1, 2] and seen[0].steps == 6 and seen[1].seconds_left is not None
    caplog.set_level("INFO", logger="tasks.train")
    ck = train_model(ts, ModelConfig(preset="small"), cfg, 1, storage)  # default: log lines
    final = torch.load(ck.uri, weights_only=False)
    assert final["step"] == 6 and len(final["losses"]) == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.train"]
    assert lines and lines[0].startswith("training step 3/6") and "6/6" in lines[-1]


def test_torchrun_job_holds_no_secret_and_no_file(
    dpixels: tuple[list[DPixelRef], StorageConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job reaches torchrun in an environment variable, configs and references only."""
    import subprocess

    import tasks.train as train_mod

    refs, storage = dpixels
    seen: dict[str, object] = {}

    class FakePopen:
        stdout = iter([f"{train_mod.PROGRESS_MARK}" + train_mod.TrainProgress(
            step=1, steps=2, loss=1.0, seconds=0.1, seconds_left=0.1).model_dump_json() + "\n"])

        def __init__(self, cmd: list[str], env: dict[str, str], **kw: object) -> None:
            seen["cmd"], seen["env"] = cmd, env

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-job-9f2")
    ts = build_training_set(refs, CFG, seed=4, storage=storage)
    got: list[object] = []
    train_mod.run_torchrun(ts, ModelConfig(), CFG.model_copy(update={"processes": 2}), 0, storage,
                           "/x/running.pt", progress=got.append)
    job = seen["env"][train_mod.JOB_ENV]  # type: ignore[index]
    assert "never-in-a-job" not in job and json.loads(job)["checkpoint"] == "/x/running.pt"
    assert not any(a.endswith(".json") for a in seen["cmd"])  # type: ignore[union-attr]
    assert [p.step for p in got] == [1]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_torchrun_ranks_stop_and_resume(
    dpixels: tuple[list[DPixelRef], StorageConfig], tmp_path: Path
) -> None:
    """A stop request reaches the torchrun ranks (torchrun gets SIGTERM and forwards it):
    they checkpoint the steps done and exit, and the call raises StopRequested."""
    from tasks.errors import StopRequested
    from tasks.stop import clear_stop, request_stop
    from tasks.train import TrainProgress

    refs, storage = dpixels
    storage = storage.model_copy(update={"work_uri": str(tmp_path / "work")})
    ts = build_training_set(refs, CFG, seed=4, storage=storage)
    cfg = CFG.model_copy(update={"steps": 400, "checkpoint_every": 1000, "processes": 2})
    seen: list[TrainProgress] = []

    def progress(p: TrainProgress) -> None:
        seen.append(p)
        request_stop("test")

    try:
        with pytest.raises(StopRequested):
            train_model(ts, ModelConfig(preset="small"), cfg, 1, storage, progress=progress)
    finally:
        clear_stop()
    running = next((tmp_path / "work" / "checkpoints").glob("*/running.pt"))
    step = torch.load(running, weights_only=False)["step"]
    assert seen and 1 <= step < 400  # the ranks saved the steps done (resumable)


@pytest.mark.integration
def test_resume_on_object_store_from_another_machine(
    dpixels: tuple[list[DPixelRef], StorageConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an s3:// work root the running checkpoint is copied to
    ``{work}/checkpoints/{key}/running.pt`` at each save (and on a stop), so a run on another
    machine (no local scratch) resumes it; after the commit only model.pt is left."""
    import shutil

    from tasks.errors import StopRequested
    from tasks.stop import clear_stop, request_stop
    from tasks.train import TrainProgress, _scratch_dir
    from tests.s3support import MotoServer, s3fs_for

    pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-TRAINTEST-0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "train-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    refs, local = dpixels
    ts = build_training_set(refs, CFG, seed=4, storage=local)
    cfg = CFG.model_copy(update={"steps": 5, "checkpoint_every": 100})
    server = MotoServer().start()
    try:
        fs = s3fs_for(server.url)
        fs.mkdir("work")
        storage = local.model_copy(update={"work_uri": "s3://work/w", "s3_endpoint_url": server.url})

        def stop_at_two(p: TrainProgress) -> None:
            if p.step == 2:
                request_stop("test")

        try:
            with pytest.raises(StopRequested):
                train_model(ts, ModelConfig(preset="small"), cfg, 3, storage, progress=stop_at_two)
        finally:
            clear_stop()
        [remote] = fs.glob("work/w/checkpoints/*/running.pt")
        key = remote.split("/")[-2]
        with fs.open(remote, "rb") as f:
            assert torch.load(f, weights_only=False)["step"] == 2
        shutil.rmtree(_scratch_dir(f"s3://{remote}", key))  # "another machine"
        ck = train_model(ts, ModelConfig(preset="small"), cfg, 3, storage)
        fs.invalidate_cache()
        with fs.open(ck.uri.removeprefix("s3://"), "rb") as f:
            final = torch.load(f, weights_only=False)
        assert final["step"] == 5 and not fs.glob("work/w/checkpoints/*/running.pt")
        whole = train_model(ts, ModelConfig(preset="small"), cfg, 3, local)  # uninterrupted
        np.testing.assert_allclose(final["losses"],
                                   torch.load(whole.uri, weights_only=False)["losses"], rtol=1e-5)
    finally:
        server.stop()
