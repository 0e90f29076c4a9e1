"""Publishing one tile: read, quantise and write in one pass, then commit.

Each write block (256 rows x up to 1,024 columns, :func:`_blocks`) of the float embedding is
read once, strip by strip into a reused buffer (the embed stage's uncompressed chunk files
straight from disk, :func:`_chunk_files`; anything else through Zarr), and quantised
(:func:`tessera_model.quantise.quantise`, first K bands, into a reused int8 block); the int8
block goes to the zone group. The content hash
(:mod:`tasks.publish.digest`) is computed where the data is produced: the embed stage stores
it in the embedding's ``content_sha256`` attribute. An embedding without it (written by
other code) is hashed from that same one read, never by reading it again.

Commit protocol (under a shared :class:`~tasks.publish.leases.ZoneLease`): retract (record
removed, scales -> NaN), write ALL int8 embedding blocks, then the scales of the whole tile
(the commit: a reader treats a NaN scale as absent), then the record and
``tessera:n_tiles``. A publish killed before its scales leaves the tile absent; killed during
the scales write, only complete, correct pixels of the new content are visible; a re-run
finishes it (no record, so no skip).

Skipping: publishing the same content again is a no-op, decided by the content key. With
the hash known up front (the usual case) that is decided before anything is read, and a
tile to replace is written while it is read. Without it, the hash is complete only after
the last block: a tile with no record cannot be skipped, so it is written while it is read;
a tile with a record is read, hashed and quantised into a local spill file first
(:class:`_Spill`, 132 B per pixel, the int8 product, never the float input): same key,
nothing is written; a different key, the blocks are written from the spill. Either way the
float input is read at most once and memory stays bounded by two blocks.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer

from tasks.config import PublishConfig, StorageConfig
from tasks.errors import DataError, StorageError
from tasks.grid import SHARD_PX, Tile
from tasks.publish._fs import _open_root
from tasks.publish.conventions import BLOCK_SHARDS, N_BANDS, PUBLISH_FORMAT, quantisation_rule
from tasks.publish.coords import ZoneExtent, year_store_uri, zone_group_name
from tasks.publish.digest import ATTR, SquareDigest, check_digest
from tasks.publish.grow import _check_no_move
from tasks.publish.leases import _lease
from tasks.publish.records import (
    _converge_n_tiles,
    _record_uri,
    provenance_uri,
    read_tile_record,
)
from tasks.publish.zones import _check_root, _check_zone
from tasks.refs import EmbeddingRef, PublishRef
from tasks.storage import content_key, get_fs, join, write_bytes_atomic, zarr_store

DEFAULT_INFERENCE = "fp32"
"""What an embedding without an ``inference`` attribute was computed with."""


def _blocks(height: int, width: int) -> Iterator[tuple[slice, slice]]:
    """Write blocks of a tile, shard row by shard row: (rows, cols) slices, row-major."""
    step_c = SHARD_PX * BLOCK_SHARDS
    for r in range(0, height, SHARD_PX):
        for c in range(0, width, step_c):
            yield slice(r, min(r + SHARD_PX, height)), slice(c, min(c + step_c, width))


class _Block(NamedTuple):
    """One quantised write block: its place in the tile, int8 (h, w, K), scales (h, w)."""

    rows: slice
    cols: slice
    q: np.ndarray
    s: np.ndarray


STRIP_ROWS = 64
"""Rows of the float input read at a time (fewer when the input's chunks are taller)."""


def _chunk_files(src: zarr.Array) -> tuple[Path, tuple[int, int, int]] | None:
    """Where ``src``'s chunk files are when they hold its raw little-endian float32 values
    (local store, Zarr v3, no codec but ``bytes``, regular chunks spanning every band): the
    embed stage's layout. Reading those files straight into place costs about a tenth of
    the CPU time of Zarr's read path (which allocates and copies per chunk); ``None``
    otherwise (Zarr reads it)."""
    from zarr.codecs import BytesCodec
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.storage import LocalStore

    md = src.metadata
    if not (
        isinstance(md, ArrayV3Metadata)
        and isinstance(src.store, LocalStore)
        and len(md.codecs) == 1
        and isinstance(md.codecs[0], BytesCodec)
        and (md.codecs[0].endian is None or md.codecs[0].endian.value == "little")
        and sys.byteorder == "little"
        and np.dtype(src.dtype) == np.float32
        and isinstance(md.chunk_grid, RegularChunkGrid)
        and md.chunk_grid.chunk_shape[2] == src.shape[2]
    ):
        return None
    ch, cw, cb = md.chunk_grid.chunk_shape
    return Path(src.store.root) / src.path, (int(ch), int(cw), int(cb))
"""Rows of the float input read at a time (fewer when the input's chunks are taller)."""


class _BlockReader:
    """Each write block read once, strip by strip: hashed if its digest is not known, its
    first ``n_bands`` quantised.

    The input is read in strips (:data:`STRIP_ROWS` rows or the input's chunk rows, the
    block's width) into two strip buffers used in turn; the quantised block lives in one
    int8 and one scale buffer, reused block after block (the consumer is done with a block
    before asking for the next). So float memory is two strips, and no fresh pages are
    touched per strip or block. ``digest``, when given, ends as the tile's content hash
    (:mod:`.digest`); then a reader thread reads and hashes strip j + 1 while the caller
    quantises strip j, the first from construction on (while the caller takes its lease
    and retracts the old tile). ``None`` when the embedding carries its hash: strips are
    read as they are quantised. Use as a context manager (it may own a thread).
    """

    def __init__(
        self,
        src: zarr.Array,
        in_shape: tuple[int, int, int],
        n_bands: int,
        rule: str,
        digest: SquareDigest | None,
    ) -> None:
        from tessera_model.quantise import quantise  # the one implementation (section 4)

        self._quantise = quantise
        self._src, self._n_bands, self._rule, self._digest = src, n_bands, rule, digest
        self._blocks = list(_blocks(in_shape[0], in_shape[1]))
        chunk = int(src.chunks[0])
        strip = max(STRIP_ROWS, chunk)
        strip = strip if SHARD_PX % strip == 0 else SHARD_PX
        self._pieces = [
            (slice(r, min(r + strip, rows.stop)), cols)
            for rows, cols in self._blocks
            for r in range(rows.start, rows.stop, strip)
        ]
        width = self._blocks[0][1].stop - self._blocks[0][1].start
        self._direct = np.dtype(src.dtype) == np.float32
        n_buf = (2 if digest is not None else 1) if self._direct else 0
        self._bufs = [np.empty(strip * width * in_shape[2], np.float32) for _ in range(n_buf)]
        # two int8 blocks in turn: block i may still be being written while block i + 1 is
        # quantised (the consumer finishes block i before it asks for block i + 2)
        self._q = [np.empty(SHARD_PX * width * n_bands, np.int8) for _ in range(2)]
        self._s = np.empty(SHARD_PX * width, np.float32)
        # a thread only to overlap hashing (~1 GB/s) with quantising and writing: reading an
        # uncompressed strip alone costs less than handing it between threads under load
        self._done: list[None] = []  # blocks handed out so far
        self._files = _chunk_files(src) if self._direct else None
        if self._files is not None:
            self._chunk = np.empty(int(np.prod(self._files[1])), np.float32)
            self._fill = np.float32(src.metadata.fill_value)
        self._pool: ThreadPoolExecutor | None = None
        if digest is not None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-read")
            self._ahead = self._pool.submit(self._read, 0)

    def _read(self, j: int) -> np.ndarray:
        rows, cols = self._pieces[j]
        shape = (rows.stop - rows.start, cols.stop - cols.start, self._src.shape[2])
        if self._direct:  # straight into a reused buffer, C-contiguous
            buf = self._bufs[j % len(self._bufs)]
            piece = buf[: shape[0] * shape[1] * shape[2]].reshape(shape)
            if self._files is not None:
                self._read_files(rows, cols, piece)
            else:
                self._src.get_basic_selection(
                    (rows, cols, slice(None)), out=NDBuffer.from_numpy_array(piece)
                )
        else:
            piece = np.ascontiguousarray(self._src[rows, cols, :], dtype=np.float32)
        if self._digest is not None:  # one reader thread: pieces arrive in order
            self._digest.add(rows.start, cols.start, piece)
        return piece

    def _read_files(self, rows: slice, cols: slice, piece: np.ndarray) -> None:
        """Fill ``piece`` from the chunk files it overlaps (a missing file: fill value)."""
        assert self._files is not None
        root, (ch, cw, cb) = self._files
        chunk = self._chunk.reshape(ch, cw, cb)
        for i in range(rows.start // ch, -(-rows.stop // ch)):
            r0, r1 = max(rows.start, i * ch), min(rows.stop, (i + 1) * ch)
            for j in range(cols.start // cw, -(-cols.stop // cw)):
                c0, c1 = max(cols.start, j * cw), min(cols.stop, (j + 1) * cw)
                dst = piece[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start]
                path = root / self._src.metadata.encode_chunk_key((i, j, 0))
                try:
                    with open(path, "rb", buffering=0) as f:
                        got = f.readinto(self._chunk.data)
                except FileNotFoundError:  # never written: all fill value
                    dst[...] = self._fill
                    continue
                if got != self._chunk.nbytes:
                    raise StorageError(
                        f"{path}: Expected a chunk of {self._chunk.nbytes} B. Got {got} B."
                    )
                dst[...] = chunk[r0 - i * ch : r1 - i * ch, c0 - j * cw : c1 - j * cw]

    def __iter__(self) -> Iterator[_Block]:
        j, k = 0, self._n_bands
        for rows, cols in self._blocks:
            h, w = rows.stop - rows.start, cols.stop - cols.start
            q = self._q[len(self._done) % 2][: h * w * k].reshape(h, w, k)
            self._done.append(None)
            s = self._s[: h * w].reshape(h, w)
            while j < len(self._pieces) and self._pieces[j][0].start < rows.stop:
                if self._pool is None:
                    piece = self._read(j)
                else:
                    piece = self._ahead.result()
                    # piece j's buffer is reused by the read of piece j + 2, submitted only
                    # once piece j is quantised
                    if j + 1 < len(self._pieces):
                        self._ahead = self._pool.submit(self._read, j + 1)
                r = self._pieces[j][0].start - rows.start
                j += 1
                n = piece.shape[0]
                self._quantise(piece[..., :k], rule=self._rule, out=(q[r : r + n], s[r : r + n]))
                del piece
            yield _Block(rows, cols, q, s)

    def __enter__(self) -> _BlockReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Spill:
    """Quantised blocks parked in a local temporary file until the content key is known.

    The int8 blocks go to the file (deleted on close); the scales (4 B per pixel) stay in
    memory. Read back block by block, so memory stays bounded whatever the tile size.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="tessera-publish-")
        self._index: list[tuple[slice, slice, tuple[int, ...], np.ndarray]] = []

    def put(self, block: _Block) -> None:
        """Park a block (its buffers may be reused once this returns)."""
        self._index.append((block.rows, block.cols, block.q.shape, block.s.copy()))
        self._file.write(np.ascontiguousarray(block.q).data)

    def blocks(self) -> Iterator[_Block]:
        self._file.seek(0)
        for rows, cols, shape, s in self._index:
            q = np.empty(shape, np.int8)
            if self._file.readinto(q.data) != q.nbytes:
                raise StorageError("publish spill file: Expected a whole block. Got a short read.")
            yield _Block(rows, cols, q, s)

    def __enter__(self) -> _Spill:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._file.close()


@dataclass(frozen=True)
class _Job:
    """What one publish is, fixed before its first block is read."""

    tile: Tile
    year: int
    store_uri: str
    group: str
    model_version: str
    n_bands: int
    in_shape: tuple[int, int, int]
    rule: str
    coverage: str | None
    inference: str | None

    @property
    def where(self) -> str:
        return join(self.store_uri, self.group)

    def key(self, sha: str) -> str:
        """The skip key: content, format, model, group and any non-default rule."""
        extra: tuple[Any, ...] = ()
        if (self.n_bands, self.rule) != (N_BANDS, "v1"):
            extra = (self.n_bands, self.rule)
        if self.inference not in (None, DEFAULT_INFERENCE):
            extra = (*extra, "inference", self.inference)
        return content_key("publish", PUBLISH_FORMAT, sha, self.model_version, self.group, *extra)


def _check_modes(attrs: dict[str, Any], job: _Job) -> None:
    """Refuse a tile whose coverage rule or inference mode differs from its zone's.

    A zone without ``tessera:inference`` that already holds tiles holds fp32 ones (the
    attribute came later; an embedding without ``inference`` is fp32 too).

    Raises:
        DataError: naming the attribute, the store's value and the tile's.
    """
    zone_rule = attrs.get("tessera:coverage_rule")
    if job.coverage is not None and zone_rule is not None and job.coverage != zone_rule:
        raise DataError(
            f"{job.where}: Expected tessera:coverage_rule {zone_rule!r} (the store's). Got "
            f"{job.coverage!r} for tile {job.tile.id}: one store, one coverage rule."
        )
    zone_inf = attrs.get("tessera:inference")
    if zone_inf is None and int(attrs.get("tessera:n_tiles") or 0) > 0:
        zone_inf = DEFAULT_INFERENCE
    tile_inf = job.inference or DEFAULT_INFERENCE
    if zone_inf is not None and tile_inf != zone_inf:
        raise DataError(
            f"{job.where}: Expected tessera:inference {zone_inf!r} (the store's). Got "
            f"{tile_inf!r} for tile {job.tile.id}: one store, one inference mode (publish to "
            "another storage.output_uri)."
        )


def publish_tile(
    emb: EmbeddingRef,
    year: int,
    cfg: PublishConfig,
    storage: StorageConfig,
    model_version: str,
) -> PublishRef:
    """Quantise one tile's float embeddings and commit them into its zone group.

    The zone group must exist and cover the tile (:func:`~tasks.publish.prepare_zone_stores`).
    Under a shared :class:`~tasks.publish.ZoneLease`: retract, write every int8 embedding
    block (a shard row, at most 4 shards wide, so input memory is bounded by the block),
    then the whole tile's scales (the commit; a pixel is visible only once its scale is
    written), then the record. The float input is read once; the content hash comes from
    the embedding's ``content_sha256`` attribute or, absent, from that one read (module
    docstring). A publish that dies before its scales leaves the tile
    absent, and a re-run completes it. A tile already published with the same content
    (:mod:`tasks.publish.digest`), model version and format is skipped, with nothing written;
    different content replaces it cleanly (the record and the scales are retracted first).
    The record holds no time, path or cache key (same input, same bytes); when, where to and
    from which work-root embedding a tile was published goes to
    :func:`~tasks.publish.provenance_uri` in the work root.

    The embedding group's ``coverage_rule`` and ``inference`` attributes (absent inference
    means ``"fp32"``) are recorded in the tile record and, by the first tile carrying them,
    in the zone attributes (``tessera:coverage_rule``, ``tessera:inference``); a tile whose
    rule or mode differs from its zone's is refused before anything is written.

    Args:
        emb: Reference to a Zarr group with ``embedding`` float32 (H, W, B), NaN rows = no
            data, for ``emb.tile``.
        year: The year store to publish into.
        cfg: Publish config.
        storage: Storage roots (``output_uri`` holds the year stores).
        model_version: Must equal the zone group's ``tessera:model_version``.

    Returns:
        A :class:`PublishRef` naming the zone group; ``skipped`` when nothing was written.

    Raises:
        DataError: wrong input shape, version, coverage rule or inference mismatch, or a tile
            outside the zone grid.
        StorageError: the year store or zone group does not exist.
    """
    tile = emb.tile
    store_uri = year_store_uri(storage.output_uri, year)
    name = zone_group_name(tile)
    where = join(store_uri, name)
    root = _open_root(store_uri, storage)
    try:  # one metadata read, no separate existence check (each is a round trip)
        group = root[name] if root is not None else None
    except KeyError:
        group = None
    if root is None or group is None:
        raise StorageError(
            f"tile {tile.id}: Expected zone group {where} (run prepare_zone_stores first). Got none."
        )
    _check_root(root, store_uri, year)
    if not isinstance(group, zarr.Group):
        raise DataError(f"{where}: Expected a zone group. Got an array.")
    n_bands = int(group.attrs["tessera:n_bands"])
    _check_zone(group, where, model_version, n_bands)

    src_group = zarr.open_group(zarr_store(emb.uri, storage, read_only=True), mode="r")
    try:
        src = src_group["embedding"]
    except KeyError:
        raise DataError(
            f"tile {tile.id}: Expected array 'embedding' in {emb.uri}. Got none."
        ) from None
    full = int(src.shape[-1]) if isinstance(src, zarr.Array) and src.ndim == 3 else N_BANDS
    in_shape = (tile.height, tile.width, full)
    if not isinstance(src, zarr.Array) or tuple(src.shape) != in_shape or full < n_bands:
        got = tuple(src.shape) if isinstance(src, zarr.Array) else "a group"
        raise DataError(
            f"tile {tile.id}: Expected embedding shape {in_shape[:2]} x >= {n_bands}. Got {got}."
        )
    inference = src_group.attrs.get("inference")
    if inference is not None and not isinstance(inference, str):
        raise DataError(
            f"{emb.uri}: Expected attribute 'inference' a string such as 'fp32'. Got "
            f"{inference!r}."
        )
    job = _Job(
        tile=tile,
        year=year,
        store_uri=store_uri,
        group=name,
        model_version=model_version,
        n_bands=n_bands,
        in_shape=in_shape,
        rule=quantisation_rule(model_version),
        coverage=src_group.attrs.get("coverage_rule"),
        inference=inference,
    )
    _check_modes(dict(group.attrs), job)

    known = check_digest(src_group.attrs.get(ATTR), emb.uri)  # hashed by the embed stage
    old = read_tile_record(storage.output_uri, year, tile, storage)
    if known is not None and old is not None and old.get("publish_key") == job.key(known):
        return PublishRef(  # same content: decided before reading anything
            uri=where, key=job.key(known), tile=tile, store_uri=store_uri, group=name,
            skipped=True,
        )
    digest = None if known is not None else SquareDigest(in_shape)

    def sha() -> str:
        got = known if digest is None else digest.hexdigest()
        if got is None:  # cannot happen: publish blocks run over the squares in order
            raise StorageError(f"tile {tile.id}: Expected the whole input hashed. Got less.")
        return got

    with _BlockReader(src, in_shape, n_bands, job.rule, digest) as blocks:
        if old is None or known is not None:  # nothing to skip: write while reading
            key = _write_and_commit(job, iter(blocks), sha, old, cfg, storage)
        else:
            with _Spill() as spill:
                for block in blocks:
                    spill.put(block)
                key = job.key(sha())
                if old.get("publish_key") == key:
                    return PublishRef(
                        uri=where, key=key, tile=tile, store_uri=store_uri, group=name, skipped=True
                    )
                key = _write_and_commit(job, spill.blocks(), sha, old, cfg, storage)
    _write_provenance(job, emb, sha(), key, storage)
    return PublishRef(uri=where, key=key, tile=tile, store_uri=store_uri, group=name)


def _write_and_commit(
    job: _Job,
    blocks: Iterator[_Block],
    content_sha: Callable[[], str],
    old: dict[str, Any] | None,
    cfg: PublishConfig,
    storage: StorageConfig,
) -> str:
    """Retract, write every block, commit the scales and the record; the key back.

    ``content_sha`` gives the content hash once ``blocks`` is exhausted (they may feed it).
    """
    tile, store_uri, name, where = job.tile, job.store_uri, job.group, job.where
    with _lease(store_uri, name, cfg, storage, exclusive=False) as lease:
        _check_no_move(store_uri, name, storage)
        # (re)open under the lease: no grid change can happen until it is released
        group = zarr.open_group(zarr_store(where, storage), mode="r+")
        attrs = dict(group.attrs)
        ext = ZoneExtent.from_attrs(attrs)
        if not ext.covers(tile):
            raise DataError(
                f"tile {tile.id}: Expected a tile inside zone grid {where} (bbox {ext.bbox}); "
                f"run prepare_zone_stores with it first. Got tile bounds {list(tile.bounds)}."
            )
        _check_modes(attrs, job)
        modes = {}
        if job.coverage is not None and attrs.get("tessera:coverage_rule") is None:
            modes["tessera:coverage_rule"] = job.coverage
        if job.inference is not None and attrs.get("tessera:inference") is None:
            modes["tessera:inference"] = job.inference
        if modes:
            group.attrs.update(modes)
        emb_arr, scales_arr = group["embeddings"], group["scales"]
        r0, c0 = ext.offset(tile)
        rows_all, cols_all = slice(r0, r0 + tile.height), slice(c0, c0 + tile.width)
        # 1. Retract: drop the record, then the scales (whole NaN shards are deleted). A tile
        # without a record usually has no scales either (a first publish): reading them
        # (absent shards: no data) is cheaper than writing NaN over them; scales left by a
        # publish killed mid-commit are retracted as any others.
        record_uri = _record_uri(store_uri, tile)
        if old is not None:
            fs, rec_path = get_fs(record_uri, storage)
            fs.rm(rec_path)
            _converge_n_tiles(store_uri, where, ext, storage)
        if old is not None or not np.isnan(scales_arr[rows_all, cols_all]).all():
            scales_arr[rows_all, cols_all] = np.full((tile.height, tile.width), np.nan, np.float32)
        # 2. Every embedding block; the tile's scales wait in memory (4 B/pixel).
        scales = np.full((tile.height, tile.width), np.nan, np.float32)
        # block i is encoded and written by a writer thread while block i + 1 is read and
        # quantised here (Zarr's codecs release the GIL); one write in flight at a time
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-write") as writer:
            pending: Future[None] | None = None
            for rows, cols, q, s in blocks:
                if pending is not None:
                    pending.result()
                where_q = (slice(r0 + rows.start, r0 + rows.stop),
                           slice(c0 + cols.start, c0 + cols.stop), slice(None))
                pending = writer.submit(emb_arr.__setitem__, where_q, q)
                scales[rows, cols] = s
                lease.renew()
            if pending is not None:
                pending.result()
        sha = content_sha()
        key = job.key(sha)
        # 3. The commit: the scales of the whole tile, then the record.
        scales_arr[rows_all, cols_all] = scales
        n_valid = int(np.isfinite(scales).sum())
        record = {
            "tile_id": tile.id,
            "group": name,
            "row_offset": r0,
            "col_offset": c0,
            "shape": [tile.height, tile.width, job.n_bands],
            "bounds": list(tile.bounds),
            "epsg": ext.epsg,
            "year": job.year,
            "content_sha256": sha,
            "publish_key": key,
            "publish_format": PUBLISH_FORMAT,
            **({"coverage_rule": job.coverage} if job.coverage is not None else {}),
            **({"inference": job.inference} if job.inference is not None else {}),
            **({"quantisation": job.rule} if job.rule != "v1" else {}),
            "model_version": job.model_version,
            "n_valid": n_valid,
            "n_nodata": tile.height * tile.width - n_valid,
        }
        write_bytes_atomic(
            record_uri, json.dumps(record, sort_keys=True, indent=1).encode(), storage
        )
        _converge_n_tiles(store_uri, where, ext, storage)
    return key


def _write_provenance(
    job: _Job, emb: EmbeddingRef, sha: str, key: str, storage: StorageConfig
) -> None:
    """When and from which work-root embedding the tile was published (work root only)."""
    provenance = {
        "tile_id": job.tile.id,
        "year": job.year,
        "output_uri": storage.output_uri,
        "publish_key": key,
        "content_sha256": sha,
        "source_key": emb.key,
        "source_uri": emb.uri,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time())),
    }
    write_bytes_atomic(
        provenance_uri(storage.work_uri, job.year, job.tile),
        json.dumps(provenance, sort_keys=True, indent=1).encode(),
        storage,
    )

