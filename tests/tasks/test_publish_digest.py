"""The content hash: one definition whoever computes it (the embed stage or publishing),
and a publish that trusts the embedding's hash skips same content without reading it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

import tasks.publish.write as write_mod
from tasks.config import PublishConfig, StorageConfig
from tasks.errors import DataError
from tasks.grid import Tile
from tasks.publish import prepare_zone_stores, publish_tile, read_tile_record
from tasks.publish.digest import ATTR, SQUARE, SquareDigest, content_sha256
from tasks.refs import EmbeddingRef

YEAR = 2024
TILE = Tile(zone=31, south=False, x0=302080 // 5120 * 5120, y0=5785600 // 5120 * 5120,
            size_px=512)


def _by_definition(e: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(list(e.shape)).encode())
    for r in range(0, e.shape[0], SQUARE):
        for c in range(0, e.shape[1], SQUARE):
            sq = np.ascontiguousarray(e[r : r + SQUARE, c : c + SQUARE]).tobytes()
            h.update(hashlib.sha256(sq).digest())
    return h.hexdigest()


def test_digest_is_the_same_whatever_the_pieces() -> None:
    rng = np.random.default_rng(3)
    e = rng.normal(size=(600, 1300, 4)).astype(np.float32)  # clipped edge squares
    want = _by_definition(e)
    assert content_sha256(e) == want
    # embed's 256 and 512 blocks, publish's strips of 64 and whole blocks, odd strips
    for step_r, step_c in ((256, 256), (512, 512), (64, 1024), (256, 1024), (100, 512)):
        d = SquareDigest(e.shape)
        for r in range(0, 600, step_r):
            for c in range(0, 1300, step_c):
                d.add(r, c, e[r : r + step_r, c : c + step_c])
        assert d.hexdigest() == want, (step_r, step_c)
    d = SquareDigest(e.shape)  # squares in any order, each square's rows in order
    for c in (1280, 1024, 768, 512, 256, 0):
        for r in (0, 256, 512):
            d.add(r, c, e[r : r + 256, c : c + 256])
    assert d.hexdigest() == want
    assert content_sha256(e[:, :, ::-1].copy()) != want
    assert content_sha256(e[:512, :512]) != content_sha256(e[:512, :512].reshape(512, 256, 8))


def test_digest_with_rows_out_of_order_repeated_or_missing_is_unavailable() -> None:
    e = np.zeros((512, 512, 2), np.float32)
    d = SquareDigest(e.shape)
    d.add(64, 0, e[64:256])  # rows 0-63 of the first squares skipped
    d.add(0, 0, e[:64])
    assert d.hexdigest() is None
    d = SquareDigest(e.shape)
    d.add(0, 0, e)
    d.add(0, 0, e[:64])  # repeated
    assert d.hexdigest() is None
    d = SquareDigest(e.shape)
    d.add(0, 0, e[:256])
    assert d.hexdigest() is None  # half the tile
    with pytest.raises(ValueError, match="grid"):
        SquareDigest(e.shape).add(0, 8, e[:256, 8:264])


def test_publish_hashes_an_embedding_without_the_attribute_by_definition(
    tmp_path: Path,
) -> None:
    emb, storage = _setup(tmp_path, None)
    publish_tile(emb, YEAR, PublishConfig(), storage, "1.0")
    rec = read_tile_record(storage.output_uri, YEAR, TILE, storage)
    e = zarr.open_group(emb.uri, mode="r")["embedding"][:]
    assert rec is not None and rec["content_sha256"] == _by_definition(e)


def _setup(tmp_path: Path, attr: object | None) -> tuple[EmbeddingRef, StorageConfig]:
    e = np.random.default_rng(0).normal(size=(512, 512, 128)).astype(np.float32)
    uri = str(tmp_path / "emb.zarr")
    g = zarr.open_group(uri, mode="w")
    g.create_array("embedding", data=e, chunks=(64, 64, 128), compressors=None)
    if attr is not None:
        g.attrs[ATTR] = content_sha256(e) if attr is True else attr
    storage = StorageConfig(output_uri=str(tmp_path / "out"), work_uri=str(tmp_path / "work"))
    prepare_zone_stores([TILE], YEAR, PublishConfig(), storage, "1.0")
    return EmbeddingRef(uri=uri, key="k", tile=TILE, n_valid=0, n_nodata=0), storage


def test_known_digest_skips_same_content_without_reading(tmp_path: Path, monkeypatch) -> None:
    emb, storage = _setup(tmp_path, True)
    first = publish_tile(emb, YEAR, PublishConfig(), storage, "1.0")
    rec = read_tile_record(storage.output_uri, YEAR, TILE, storage)
    assert not first.skipped and rec is not None

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("the float input was read")

    monkeypatch.setattr(write_mod, "_BlockReader", no_read)
    again = publish_tile(emb, YEAR, PublishConfig(), storage, "1.0")
    assert again.skipped and again.key == first.key


def test_bad_digest_attribute_is_refused_naming_it(tmp_path: Path) -> None:
    emb, storage = _setup(tmp_path, "not-a-digest")
    with pytest.raises(DataError, match=ATTR):
        publish_tile(emb, YEAR, PublishConfig(), storage, "1.0")
    assert read_tile_record(storage.output_uri, YEAR, TILE, storage) is None


@pytest.mark.parametrize("chunk", [32, 64, 128, 512])
def test_chunk_files_read_in_place_give_zarrs_values(tmp_path: Path, chunk: int) -> None:
    """The embed stage's layout (uncompressed, local) is read from its chunk files directly:
    the same values as through Zarr, chunks never written (all no-data) included, whatever
    the chunk side against the read strips."""
    e = np.random.default_rng(1).normal(size=(512, 512, 8)).astype(np.float32)
    e[64:192, 256:384] = np.nan  # whole chunks of no-data: not stored
    e[5, 7] = np.nan
    uri = str(tmp_path / "e.zarr")
    src = zarr.open_group(uri, mode="w").create_array(
        "embedding", data=e, chunks=(chunk, chunk, 8), fill_value=np.nan, compressors=None
    )
    assert write_mod._chunk_files(src) is not None
    from tessera_model.quantise import quantise

    want_q, want_s = quantise(e)
    reader = write_mod._BlockReader(src, e.shape, 8, "v1", SquareDigest(e.shape))
    n = 0
    with reader:
        for rows, cols, q, s in reader:
            assert np.array_equal(q, want_q[rows, cols])
            assert np.array_equal(s, want_s[rows, cols], equal_nan=True)
            n += 1
    assert n == 2
    assert reader._digest is not None and reader._digest.hexdigest() == content_sha256(e)
    zstd = zarr.open_group(str(tmp_path / "z.zarr"), mode="w").create_array(
        "embedding", data=e, chunks=(chunk, chunk, 8)
    )
    assert write_mod._chunk_files(zstd) is None  # compressed: read through Zarr
