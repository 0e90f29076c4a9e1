"""Task results persist as JSON through a guarded store; cache keys follow checkpoint bytes."""

from __future__ import annotations

import base64
import json
import pickle

import pytest

from tasks.config import ModelConfig, StorageConfig
from tasks.grid import plan_tiles
from tasks.prefect_results import (
    RefSerializer,
    ResultIntegrityError,
    ResultStorage,
    check_record,
    result_storage_for,
)
from tasks.refs import CheckpointRef, SceneRef

TILE = plan_tiles(__import__("shapely.geometry", fromlist=["box"]).box(0.105, 52.192, 0.11, 52.195), 256)[0]


def _scene() -> SceneRef:
    return SceneRef(uri="s3://b/w/scenes/x.zarr", key="k", tile=TILE, year=2023, n_s2=3,
                    n_s1_ascending=1, n_s1_descending=2)


def test_serializer_round_trip_is_plain_json() -> None:
    ser = RefSerializer()
    value = {"a": [_scene(), None, 3, "x"], "b": 1.5}
    blob = ser.dumps(value)
    assert b"pickle" not in blob and json.loads(blob)["a"][0]["__ref__"] == "SceneRef"
    assert ser.loads(blob) == value
    with pytest.raises(TypeError, match="registered"):
        ser.dumps(StorageConfig())
    with pytest.raises(ResultIntegrityError, match="unknown result type"):
        ser.loads(b'{"__ref__": "os.system", "data": "echo hi"}')


def test_record_check_refuses_other_serializers() -> None:
    good = json.dumps({"metadata": {"serializer": {"type": "tessera-json"}}, "result": "1"}).encode()
    check_record(good, "k")
    for ser in ({"type": "pickle"}, {"type": "json", "object_decoder": "os.system"},
                {"type": "tessera-json", "extra": 1}):
        bad = json.dumps({"metadata": {"serializer": ser}, "result": "x"}).encode()
        with pytest.raises(ResultIntegrityError, match="refusing"):
            check_record(bad, "k")
    with pytest.raises(ResultIntegrityError):
        check_record(b"\x80\x04not json", "k")


@pytest.mark.integration
def test_saved_storage_block_holds_no_credentials(prefect_harness) -> None:
    st = StorageConfig(work_uri="s3://bucket/work", s3_credentials_block="aws-credentials/prod")
    rs = result_storage_for(st)
    assert isinstance(rs, ResultStorage) and rs.basepath == "s3://bucket/work/prefect-results"
    assert rs._block_document_id is not None  # Prefect needs it saved
    loaded = ResultStorage.load(rs._block_document_name)
    assert loaded.storage == st
    dumped = rs.model_dump_json()
    assert "aws-credentials/prod" in dumped and "secret" not in dumped.replace("secret/", "")


class _Marker:
    """Pickles to a call that would create a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


@pytest.mark.integration
def test_cached_results_are_json_and_tampering_fails_loudly(prefect_harness, tmp_path,
                                                            tiny_checkpoint) -> None:
    import shutil

    import torch
    from prefect import flow

    from tasks import prefect_tasks as pt
    from tessera_model import (
        ModelSpec,
        TesseraModel,
        build_checkpoint,
        read_checkpoint,
        save_checkpoint,
    )

    storage = StorageConfig(work_uri=str(tmp_path / "work"), output_uri=str(tmp_path / "out"))
    ckpt = tmp_path / "model.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    results = pt.result_storage_for(storage)

    @flow
    def run() -> CheckpointRef:
        return pt.given_checkpoint_task.with_options(result_storage=results)(
            str(ckpt), ModelConfig(), storage)

    first = run()
    records = list((tmp_path / "work" / "prefect-results").iterdir())
    assert len(records) == 1
    rec = json.loads(records[0].read_bytes())
    assert rec["metadata"]["serializer"] == {"type": "tessera-json"}
    assert run() == first  # served from cache

    # replaced at the same URI: the key follows the file, the new bytes are read
    spec = read_checkpoint(str(tiny_checkpoint))["model_spec"]
    torch.manual_seed(2)  # same architecture, other weights, same path
    save_checkpoint(build_checkpoint(TesseraModel(ModelSpec(**spec))), ckpt)
    second = run()
    assert second.key != first.key and second.uri == first.uri

    # a record rewritten to run code when loaded: refused loudly, nothing executed
    marker = tmp_path / "executed"
    for path in (tmp_path / "work" / "prefect-results").iterdir():
        rec = json.loads(path.read_bytes())
        rec["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
        rec["result"] = base64.b64encode(pickle.dumps(_Marker(str(marker)))).decode()
        path.write_text(json.dumps(rec))
    with pytest.raises(ResultIntegrityError, match="refusing"):
        run()
    assert not marker.exists()
