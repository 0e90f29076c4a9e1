"""Same input, same published bytes: every file under two output roots compared byte for byte.

Two publishes of the same embeddings into output roots at different absolute paths, at
different wall-clock times (the clock is moved a day on), in a different tile order: the
Zarr stores, tile records, manifest, STAC catalogue and previews must be identical, no lease
may remain, and the publication time must be found in the work root's provenance instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tasks.catalog import update_catalog
from tasks.config import StorageConfig
from tasks.grid import Tile
from tasks.preview import make_preview
from tasks.publish import LOCKS_DIR, prepare_zone_stores, provenance_uri, publish_tile
from tests.tasks.test_publish import CFG, MODEL, T_A, T_B, T_C, YEAR, _embedding, _write_emb

SEEDS = {T_A.id: 1, T_B.id: 2, T_C.id: 3}


def _build(tmp_path: Path, name: str, order: list[Tile]) -> StorageConfig:
    """Publish, catalogue and preview the three test tiles into ``{tmp}/{name}/out``."""
    base = tmp_path / name
    storage = StorageConfig(output_uri=str(base / "out"), work_uri=str(base / "work"))
    prepare_zone_stores(order, YEAR, CFG, storage, MODEL)
    for t in order:
        emb = _write_emb(base, t, _embedding(t, SEEDS[t.id]), key=str(SEEDS[t.id]))
        publish_tile(emb, YEAR, CFG, storage, MODEL)
    update_catalog(storage.output_uri, YEAR, storage, CFG)
    make_preview(storage.output_uri, YEAR, "utm31", storage, CFG, max_side=256)
    return storage


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_two_builds_publish_identical_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s1 = _build(tmp_path, "first-build-somewhere", [T_A, T_B, T_C])
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86_400.0)  # a day later
    s2 = _build(tmp_path, "second", [T_C, T_A, T_B])

    f1, f2 = _files(Path(s1.output_uri)), _files(Path(s2.output_uri))
    kinds = {k.split("/")[0] for k in f1}
    assert {"2024.zarr", "catalog", "previews"} <= kinds
    assert any(k.endswith("manifest.parquet") for k in f1)
    assert any("/.tessera/tiles/" in k for k in f1)
    assert any(k.startswith("catalog/2024/items/") for k in f1)
    assert len(f1) > 30 and f1.keys() == f2.keys()
    assert [k for k in f1 if f1[k] != f2[k]] == []

    # nothing machine- or time-specific anywhere in the published bytes
    for root, files in ((s1.output_uri, f1), (s2.output_uri, f2)):
        for name, data in files.items():
            assert str(tmp_path).encode() not in data, name
            assert root.encode() not in data, name
    assert not [k for k in f1 if k.startswith(f"{YEAR}.zarr/{LOCKS_DIR}/")]
    for k, data in f1.items():
        if k.endswith(".json"):
            assert b"published_at" not in data and b"tessera-output" not in data, k

    # provenance lives in the work root
    prov = [json.loads(Path(provenance_uri(s.work_uri, YEAR, T_A)).read_text()) for s in (s1, s2)]
    assert prov[0]["output_uri"] == s1.output_uri and prov[1]["output_uri"] == s2.output_uri
    assert prov[0]["content_sha256"] == prov[1]["content_sha256"]
    t0 = time.strptime(prov[0]["published_at"], "%Y-%m-%dT%H:%M:%SZ")
    t1 = time.strptime(prov[1]["published_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert time.mktime(t1) - time.mktime(t0) >= 86_000
