"""Published bytes pinned: the streaming quantiser and one-read publish write what the
full-array implementation wrote (digests recorded from it before the rewrite).

Inputs are built from integer arithmetic only (no RNG, no libm), so they are the same on
every platform and numpy version; the digests cover the decoded int8 and scale arrays, the
tile record and the zone attributes (not the compressed shard bytes, which belong to the
codec library's version).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from tasks.config import PublishConfig, StorageConfig
from tasks.grid import Tile
from tasks.publish import prepare_zone_stores, publish_tile, read_tile_record
from tasks.publish.digest import ATTR, content_sha256
from tasks.refs import EmbeddingRef

YEAR = 2024
T_256 = Tile(zone=31, south=False, x0=302080, y0=5785600, size_px=256)
T_512 = Tile(zone=31, south=False, x0=302080 // 5120 * 5120, y0=5785600 // 5120 * 5120,
             size_px=512)


def portable_embedding(h: int, w: int, d: int, seed: int) -> np.ndarray:
    """Float32 (h, w, d) from integer hashing: every rounding case of the int8 rules.

    Per pixel: a scale from 1e-13 to 30 (below both rules' floors, too), a few all-zero and
    NaN (no-data) pixels, and pixels whose values are exact half-steps of their scale (ties
    that round half to even).
    """
    n = h * w * d
    i = np.arange(n, dtype=np.uint64)
    x = (i * np.uint64(2654435761) + np.uint64(seed) * np.uint64(40503)) % np.uint64(2**32)
    v = (x.astype(np.float64) / 2.0**31 - 1.0).astype(np.float32).reshape(h * w, d)
    p = np.arange(h * w, dtype=np.uint64)
    ph = (p * np.uint64(2246822519) + np.uint64(seed)) % np.uint64(1009)
    exps = np.array([-13, -11, -9, -3, -1, 0, 1], np.float32)
    scale = np.float32(10.0) ** exps[(ph % np.uint64(7)).astype(np.int64)]
    scale *= (1 + (ph % np.uint64(30)).astype(np.float32))
    v *= scale[:, None]
    ties = np.arange(d, dtype=np.float32) - np.float32(d // 2) + np.float32(0.5)
    ties[0] = 127.0  # absmax 127 * 2^-3: s = 2^-3 exactly, e / s hits .5 exactly
    tie_rows = (ph % np.uint64(13)) == 0
    v[tie_rows] = ties * np.float32(0.125)
    v[(ph % np.uint64(17)) == 0] = 0.0
    v[(ph % np.uint64(11)) == 0, (seed % d)] = np.nan
    return v.reshape(h, w, d)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + json.dumps(list(a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _publish(
    tmp_path: Path, tile: Tile, e: np.ndarray, model: str, dims: int, with_digest: bool = False
):
    uri = str(tmp_path / "emb.zarr")
    g = zarr.open_group(uri, mode="w")
    if with_digest:  # the embed stage's output: uncompressed, hashed where it was made
        g.create_array("embedding", data=e, chunks=(64, 64, e.shape[2]), compressors=None)
        g.attrs[ATTR] = content_sha256(e)
    else:
        g.create_array("embedding", data=e, chunks=(64, 64, e.shape[2]))
    emb = EmbeddingRef(uri=uri, key="pin", tile=tile, n_valid=0, n_nodata=0)
    storage = StorageConfig(output_uri=str(tmp_path / "out"), work_uri=str(tmp_path / "work"))
    cfg = PublishConfig(dims=dims)  # type: ignore[arg-type]
    prepare_zone_stores([tile], YEAR, cfg, storage, model, n_bands=dims)
    publish_tile(emb, YEAR, cfg, storage, model)
    g = zarr.open_group(str(tmp_path / "out" / f"{YEAR}.zarr" / "utm31"), mode="r")
    record = read_tile_record(storage.output_uri, YEAR, tile, storage)
    return g["embeddings"][:], g["scales"][:], record, dict(g.attrs)


# Recorded from the full-array implementation (tasks/publish.py at 3d5858e). The record
# digests changed once, deliberately, when the content hash moved to the embed stage and
# became a hash of 256 x 256 square hashes (tasks/publish/digest.py; before: 1e7b0b0226798e0d,
# 9523353a4c167285, a3fa14e3d80cc98a): checked field by field against the code before, only
# content_sha256 and publish_key differ; the arrays, the zone attributes and every other
# record field are as pinned.
PINNED = {
    ("1.0", 256, 128, 128): ("d26eb41459a277f2", "a4954255e557776c"),
    ("v2-nano-0123abcd", 512, 32, 16): ("1b808bc5a56bcc76", "70f5489bfc8c9ebc"),
    ("v2-nano-0123abcd", 256, 128, 64): ("c84e31e68ae2a07a", "0a6ea7758ee8fadb"),
}


@pytest.mark.parametrize(("model", "size", "full", "dims"), list(PINNED))
def test_published_arrays_and_record_are_pinned(
    tmp_path: Path, model: str, size: int, full: int, dims: int
) -> None:
    tile = T_256 if size == 256 else T_512
    e = portable_embedding(size, size, full, seed=size + dims)
    q, s, record, attrs = _publish(tmp_path, tile, e, model, dims)
    arrays, meta = PINNED[(model, size, full, dims)]
    got_meta = hashlib.sha256(
        json.dumps({"record": record, "attrs": attrs}, sort_keys=True).encode()
    ).hexdigest()[:16]
    assert _digest(q, s) == arrays
    assert got_meta == meta
    assert record["content_sha256"] == content_sha256(e)


@pytest.mark.parametrize(("model", "size", "full", "dims"), list(PINNED))
def test_digest_from_the_embed_stage_gives_the_same_bytes_and_record(
    tmp_path: Path, model: str, size: int, full: int, dims: int
) -> None:
    """An embedding carrying its content hash (as the embed stage writes it, uncompressed)
    publishes exactly what one without it does: nothing about the product depends on who
    hashed it."""
    tile = T_256 if size == 256 else T_512
    e = portable_embedding(size, size, full, seed=size + dims)
    want = _publish(tmp_path / "a", tile, e, model, dims)
    got = _publish(tmp_path / "b", tile, e, model, dims, with_digest=True)
    assert _digest(*got[:2]) == _digest(*want[:2])
    assert got[2:] == want[2:]
