"""Training pixels in shards, streamed in a seeded order that is a pure function of the step.

A training set is a sequence of shards (e.g. one Zarr group of N pixels each, written
globally shuffled by the training-set builder). The trainer never holds more than the
shards of the current batch in memory: epoch ``e`` visits the shards in a seeded order and
the pixels of each shard in a seeded order; batch ``i`` of the epoch is positions
``[i*B, (i+1)*B)`` of that sequence (the incomplete tail is dropped). The pixels of a step
therefore depend only on ``(seed, step)``, which makes a resumed run exact and lets every
data-parallel rank agree on the global batch without communication.

Shapes (per shard of n pixels) are those of :class:`TrainingArrays`: ``s2`` uint16
(n, Tmax, C2), ``s2_doy`` (n, Tmax), ``s2_valid`` bool (n, Tmax), ``s1`` int16 (n, T1max,
C1), ``s1_doy`` (n, T1max), ``s1_valid`` bool (n, T1max).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, model_validator

from tessera_model.errors import InputShapeError

FIELDS = ("s2", "s2_doy", "s2_valid", "s1", "s1_doy", "s1_valid")


class TrainingArrays(BaseModel):
    """Pixels to train on; each pixel has its own DOY axis (pixels come from many tiles).

    Shapes: s2 uint16 (N, Tmax, C2) DN with the offset removed, s2_doy uint16 (N, Tmax),
    s2_valid bool (N, Tmax), s1 int16 (N, T1max, C1), s1_doy (N, T1max), s1_valid bool
    (N, T1max). Padding steps are simply not valid.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    s2: np.ndarray
    s2_doy: np.ndarray
    s2_valid: np.ndarray
    s1: np.ndarray
    s1_doy: np.ndarray
    s1_valid: np.ndarray

    @model_validator(mode="after")
    def _check(self) -> TrainingArrays:
        n = self.s2.shape[0]
        checks = {
            "s2": (self.s2, 3, np.uint16),
            "s2_doy": (self.s2_doy, 2, None),
            "s2_valid": (self.s2_valid, 2, np.bool_),
            "s1": (self.s1, 3, np.int16),
            "s1_doy": (self.s1_doy, 2, None),
            "s1_valid": (self.s1_valid, 2, np.bool_),
        }
        for name, (arr, ndim, dtype) in checks.items():
            if arr.ndim != ndim or arr.shape[0] != n:
                raise InputShapeError(
                    f"Expected {name} with {ndim} dims and N={n}. Got {arr.shape}."
                )
            if dtype is not None and arr.dtype != dtype:
                raise InputShapeError(
                    f"Expected {name} of dtype {np.dtype(dtype)}. Got {arr.dtype}."
                )
        if self.s2.shape[:2] != self.s2_doy.shape or self.s2_doy.shape != self.s2_valid.shape:
            raise InputShapeError(
                f"Expected s2, s2_doy, s2_valid to share (N, Tmax). Got {self.s2.shape}, "
                f"{self.s2_doy.shape}, {self.s2_valid.shape}."
            )
        if self.s1.shape[:2] != self.s1_doy.shape or self.s1_doy.shape != self.s1_valid.shape:
            raise InputShapeError(
                f"Expected s1, s1_doy, s1_valid to share (N, T1max). Got {self.s1.shape}, "
                f"{self.s1_doy.shape}, {self.s1_valid.shape}."
            )
        return self

    @property
    def n_pixels(self) -> int:
        """Number of pixels N."""
        return int(self.s2.shape[0])

    def usable(self) -> npt.NDArray[np.bool_]:
        """(N,) bool: the pixel has at least one valid S2 and one valid S1 step."""
        return self.s2_valid.any(axis=1) & self.s1_valid.any(axis=1)

    def take(self, rows: npt.NDArray[np.int64]) -> TrainingArrays:
        """The given rows (fancy indexing; a copy)."""
        return TrainingArrays(**{k: getattr(self, k)[rows] for k in FIELDS})


def concat_arrays(parts: Sequence[TrainingArrays]) -> TrainingArrays:
    """Concatenate pixel sets along N, padding the time axes to the longest part."""
    t2 = max(p.s2.shape[1] for p in parts)
    t1 = max(p.s1.shape[1] for p in parts)

    def pad(a: np.ndarray, t: int) -> np.ndarray:
        if a.shape[1] == t:
            return a
        width = [(0, 0), (0, t - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, width)

    out = {}
    for k in FIELDS:
        t = t2 if k.startswith("s2") else t1
        out[k] = np.concatenate([pad(getattr(p, k), t) for p in parts])
    return TrainingArrays(**out)


@runtime_checkable
class PixelShards(Protocol):
    """A training set as a sequence of shards, read one at a time.

    Every pixel must have at least one valid S2 and one valid S1 step (the trainer checks).
    """

    @property
    def shard_sizes(self) -> Sequence[int]:
        """Number of pixels in each shard."""
        ...

    def read_shard(self, index: int) -> TrainingArrays:
        """All pixels of shard ``index``."""
        ...


class ArrayShards:
    """In-memory :class:`PixelShards` over :class:`TrainingArrays` (tests, small runs).

    Pixels without a valid S2 or S1 step are dropped first.

    Args:
        data: the pixels.
        shard_size: pixels per shard (the last shard may be shorter); default one shard.
    """

    def __init__(self, data: TrainingArrays, shard_size: int | None = None) -> None:
        self._data = data.take(np.flatnonzero(data.usable()))
        n = self._data.n_pixels
        size = max(1, shard_size or n)
        self._starts = list(range(0, n, size))
        self._sizes = [min(size, n - s) for s in self._starts]

    @property
    def shard_sizes(self) -> Sequence[int]:
        """Number of pixels in each shard."""
        return self._sizes

    def read_shard(self, index: int) -> TrainingArrays:
        """All pixels of shard ``index``."""
        start = self._starts[index]
        return self._data.take(np.arange(start, start + self._sizes[index]))


class BatchOrder:
    """Which pixels make up the global batch of each step (a pure function of seed and step).

    Args:
        shard_sizes: pixels per shard.
        batch_size: global batch size B.
        seed: order seed.

    Raises:
        ValueError: fewer pixels than one batch.
    """

    def __init__(self, shard_sizes: Sequence[int], batch_size: int, seed: int) -> None:
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n_pixels = int(self.offsets[-1])
        if self.n_pixels < batch_size:
            raise ValueError(
                f"Expected at least batch_size={batch_size} usable pixels. Got {self.n_pixels}."
            )
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = self.n_pixels // batch_size
        self._epoch = -1
        self._seq_shard = np.zeros(0, np.int64)
        self._seq_row = np.zeros(0, np.int64)

    def _sequence(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.sizes))
        shard = np.concatenate([np.full(self.sizes[s], s, np.int64) for s in order])
        row = np.concatenate(
            [np.random.default_rng([self.seed, epoch, int(s)]).permutation(self.sizes[s])
             for s in order]
        )  # fmt: skip
        self._epoch, self._seq_shard, self._seq_row = epoch, shard, row

    def batch(self, step: int) -> tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``(epoch, shard (B,), row_in_shard (B,))`` of the global batch of ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._sequence(epoch)
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return epoch, self._seq_shard[sl], self._seq_row[sl]

    def pixel_ids(
        self, shard: npt.NDArray[np.int64], row: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.uint64]:
        """Stable ids (global positions in the training set) of the given pixels."""
        return (self.offsets[shard] + row).astype(np.uint64)


class ShardReader:
    """Reads the pixels of a batch from :class:`PixelShards`, keeping a few shards cached.

    Memory is bounded by ``cache`` shards (a batch spans at most a few).
    """

    def __init__(self, shards: PixelShards, cache: int = 2) -> None:
        self.shards, self.cache = shards, max(1, cache)
        self._cached: OrderedDict[int, TrainingArrays] = OrderedDict()

    def _shard(self, index: int) -> TrainingArrays:
        if index in self._cached:
            self._cached.move_to_end(index)
            return self._cached[index]
        data = self.shards.read_shard(index)
        expected = self.shards.shard_sizes[index]
        if data.n_pixels != expected:
            raise InputShapeError(
                f"Expected {expected} pixels in shard {index}. Got {data.n_pixels}."
            )
        bad = np.flatnonzero(~data.usable())
        if bad.size:
            raise InputShapeError(
                f"Expected every pixel of shard {index} to have a valid S2 and S1 step. "
                f"Got {bad.size} without (first row {int(bad[0])})."
            )
        self._cached[index] = data
        while len(self._cached) > self.cache:
            self._cached.popitem(last=False)
        return data

    def read(self, shard: npt.NDArray[np.int64], row: npt.NDArray[np.int64]) -> TrainingArrays:
        """The pixels ``(shard[j], row[j])`` in that order."""
        present = np.unique(shard)
        parts = [self._shard(int(s)) for s in present]
        if len(parts) == 1:
            return parts[0].take(row)
        # Gather per shard then restore the batch order.
        pieces, where = [], []
        for s, data in zip(present, parts, strict=True):
            sel = np.flatnonzero(shard == s)
            pieces.append(data.take(row[sel]))
            where.append(sel)
        joined = concat_arrays(pieces)
        inverse = np.empty(len(shard), np.int64)
        inverse[np.concatenate(where)] = np.arange(len(shard))
        return joined.take(inverse)
