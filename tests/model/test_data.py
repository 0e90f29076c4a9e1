"""Sharded training data: a seeded batch order that is a pure function of the step; bounded reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tessera_model import (
    ArrayShards,
    InputShapeError,
    ModelSpec,
    TrainingArrays,
    TrainSettings,
    fit,
)
from tessera_model.data import BatchOrder, ShardReader, concat_arrays
from tests.model.conftest import make_training_arrays


class CountingShards(ArrayShards):
    def __init__(self, data: TrainingArrays, shard_size: int) -> None:
        super().__init__(data, shard_size)
        self.reads: list[int] = []

    def read_shard(self, index: int) -> TrainingArrays:
        self.reads.append(index)
        return super().read_shard(index)


def test_batch_order_is_pure_and_covers_each_epoch() -> None:
    order = BatchOrder([30, 30, 17], batch_size=10, seed=4)
    assert order.per_epoch == 7
    fresh = BatchOrder([30, 30, 17], batch_size=10, seed=4)
    for step in (12, 0, 6, 12):  # any order of queries gives the same batches
        np.testing.assert_array_equal(order.batch(step)[1], fresh.batch(step)[1])
        np.testing.assert_array_equal(order.batch(step)[2], fresh.batch(step)[2])
    ids = np.concatenate([order.pixel_ids(*order.batch(s)[1:]) for s in range(7)])
    assert len(np.unique(ids)) == 70 and ids.max() < 77  # no pixel twice in an epoch
    epoch1 = np.concatenate([order.pixel_ids(*order.batch(s)[1:]) for s in range(7, 14)])
    assert order.batch(7)[0] == 1 and not np.array_equal(epoch1, ids)
    other = BatchOrder([30, 30, 17], batch_size=10, seed=5)
    assert not np.array_equal(other.pixel_ids(*other.batch(0)[1:]), ids[:10])
    with pytest.raises(ValueError, match="batch_size=100"):
        BatchOrder([30, 30], batch_size=100, seed=0)


def test_reader_keeps_batch_order_across_shards_and_bounds_memory() -> None:
    data = make_training_arrays(n=90)
    shards = CountingShards(data, shard_size=20)
    full = concat_arrays([shards.read_shard(i) for i in range(len(shards.shard_sizes))])
    shards.reads.clear()
    reader = ShardReader(shards, cache=2)
    order = BatchOrder(shards.shard_sizes, batch_size=16, seed=1)
    for step in range(order.per_epoch):
        _, shard, row = order.batch(step)
        got = reader.read(shard, row)
        rows = order.pixel_ids(shard, row).astype(np.int64)
        np.testing.assert_array_equal(got.s2, full.s2[rows])
        np.testing.assert_array_equal(got.s1_doy, full.s1_doy[rows])
        assert len(reader._cached) <= 2
    # shard order then pixel order: each shard is read about once per epoch, not per batch
    assert len(shards.reads) <= 2 * len(shards.shard_sizes)


def test_reader_rejects_unusable_pixels() -> None:
    data = make_training_arrays(n=20)
    bad = TrainingArrays(**{**data.model_dump(), "s1_valid": np.zeros_like(data.s1_valid)})

    class Raw:
        shard_sizes = [20]

        def read_shard(self, index: int) -> TrainingArrays:
            return bad

    with pytest.raises(InputShapeError, match="valid S2 and S1"):
        ShardReader(Raw()).read(np.zeros(4, np.int64), np.arange(4))


def test_resume_exact_when_streaming_shards(tiny_spec: ModelSpec, tmp_path: Path) -> None:
    shards = ArrayShards(make_training_arrays(n=100), shard_size=30)
    settings = TrainSettings(steps=6, batch_size=16, lr=2e-2, checkpoint_every=2, seed=2, device="cpu")
    full = fit(tiny_spec, shards, settings, str(tmp_path / "a.pt"))
    fit(tiny_spec, shards, settings, str(tmp_path / "b.pt"), stop_after=4)  # "killed" after 4
    resumed = fit(tiny_spec, shards, settings, str(tmp_path / "b.pt"))
    assert resumed.losses == full.losses  # bit-exact on CPU
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
