"""Data parallelism: a 2-process gloo run on CPU equals the single-process run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tessera_model import ArrayShards, ModelSpec, TrainSettings, fit
from tessera_model.distributed import GlobalBatchNorm1d, all_gather_rows, use_global_batchnorm
from tests.model.conftest import make_training_arrays

SPEC = ModelSpec(
    version="test", latent_dim=16, d_model=16, n_layers=1, n_heads=2, ffn_dim=32,
    dropout=0.0, projector_dim=32, projector_layers=2, sample_steps=8,
)  # fmt: skip
SETTINGS = TrainSettings(steps=6, batch_size=32, lr=2e-2, checkpoint_every=4, seed=3, device="cpu")

# Parameters whose true gradient is exactly 0 (softmax over T ignores a shift of the scores;
# BatchNorm and the Barlow Twins standardisation ignore a shift of their input): Adam turns their float noise, which depends on the
# summation order and so on the process count, into full-size steps. They are not compared.
_ZERO_GRADIENT = {
    f"{m}_backbone.attn_pool.{p}.bias" for m in ("s1", "s2") for p in ("query", "layer_norm")
} | {"dim_reducer.0.bias"} | {f"projector.net.{3 * i}.bias" for i in range(SPEC.projector_layers + 1)}


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank: the GlobalBatchNorm1d check, then the training run (one spawn for both)."""
    _init(rank, world, store)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 5, dtype=torch.float64)
        bn = use_global_batchnorm(nn.BatchNorm1d(5).double())
        local = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_()
        y = all_gather_rows(bn(local))
        (y**3).sum().backward()  # every rank computes the same global loss
        torch.save({"y": y.detach(), "grad": local.grad, "rm": bn.running_mean}, f"{out}.bn.{rank}")
        shards = ArrayShards(make_training_arrays(n=120), shard_size=50)
        fit(SPEC, shards, SETTINGS, f"{out}.ddp.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outputs of one 2-process gloo run of :func:`_worker` (spawned once for both tests)."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(tmp / "run")), nprocs=2, join=True)
    return tmp / "run"


def test_global_batchnorm_matches_full_batch(two_ranks: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64).requires_grad_()
    bn = nn.BatchNorm1d(5).double()
    y = bn(x)
    (y**3).sum().backward()
    for rank in range(2):
        got = torch.load(f"{two_ranks}.bn.{rank}", weights_only=True)
        torch.testing.assert_close(got["y"], y.detach())
        # backward through the gather sums over ranks: each rank holds 2x its share
        torch.testing.assert_close(got["grad"], 2 * x.grad[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(got["rm"], bn.running_mean)
    assert type(use_global_batchnorm(nn.BatchNorm1d(3))) is GlobalBatchNorm1d


def test_two_process_gloo_matches_single_process(two_ranks: Path, tmp_path: Path) -> None:
    single = fit(SPEC, ArrayShards(make_training_arrays(n=120), shard_size=50), SETTINGS,
                 str(tmp_path / "single.pt"))  # fmt: skip
    ddp = torch.load(f"{two_ranks}.ddp.pt", weights_only=True)
    assert ddp["step"] == 6 and ddp["world_size"] == 2 and len(ddp["rng_state"]["ranks"]) == 2
    np.testing.assert_allclose(ddp["losses"], single.losses, rtol=1e-4)
    assert single.losses[-1] != single.losses[0]  # it did train
    ref = torch.load(tmp_path / "single.pt", weights_only=True)["model_state_dict"]
    for k, v in ref.items():
        if k in _ZERO_GRADIENT or k.endswith("running_mean"):  # includes a zero-gradient bias
            continue
        torch.testing.assert_close(ddp["model_state_dict"][k], v, atol=1e-4, rtol=1e-3, msg=k)
