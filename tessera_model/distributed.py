"""Data parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched by torchrun.

Barlow Twins standardises each projected dimension over the batch and the projector has
BatchNorm, so a data-parallel step equals a single-process step with the same global batch
only if both see global batch statistics. Here each rank encodes and projects its slice of
the global batch; the projector's BatchNorm uses statistics all-reduced over the ranks
(:class:`GlobalBatchNorm1d`, the CPU-capable equivalent of ``SyncBatchNorm``) and the
projections are all-gathered (:func:`all_gather_rows`, differentiable) so every rank
evaluates the same global loss. Gradients are then averaged over the ranks
(:func:`average_gradients`). The collectives' backward passes sum over ranks, which makes
every rank's gradient ``world_size`` times its share; the average restores the exact
single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs."""
        return self.rank == 0


def current_world() -> World:
    """The initialised default process group, or a single-process world."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        world = current_world()
        ctx.rank, ctx.rows = world.rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_reduce_sum(x: Tensor) -> Tensor:
    """Differentiable sum over ranks (identity in a single process)."""
    return _AllReduceSum.apply(x) if current_world().size > 1 else x


def all_gather_rows(x: Tensor) -> Tensor:
    """Differentiable concatenation of every rank's (b, ...) rows in rank order -> (W*b, ...)."""
    return _AllGatherRows.apply(x) if current_world().size > 1 else x


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every rank's rows (same keys and buffers).

    In a single process, or in eval mode, it is exactly :class:`torch.nn.BatchNorm1d`.
    Every rank must hold the same number of rows.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(b, C) -> (b, C), normalised with the global batch mean and biased variance."""
        world = current_world()
        if not self.training or world.size == 1:
            return super().forward(x)
        n = x.shape[0] * world.size
        xs = x.to(torch.promote_types(x.dtype, torch.float32))  # sums in >= fp32 under AMP
        total, sq = all_reduce_sum(torch.cat([xs.sum(0), (xs * xs).sum(0)])).chunk(2)
        mean = total / n
        var = (sq / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)  # type: ignore[union-attr]
        y = (xs - mean) * torch.rsqrt(var + self.eps)  # fp32 out, as autocast's batch_norm
        return y * self.weight + self.bias if self.affine else y


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ``BatchNorm1d`` of ``module`` into :class:`GlobalBatchNorm1d` in place."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
    return module


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op in a single process)."""
    if current_world().size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def average_gradients(module: nn.Module, bucket_bytes: int = 64 << 20) -> None:
    """Average parameter gradients over ranks, in flattened buckets (no-op in one process)."""
    world = current_world()
    if world.size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    bucket: list[Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world.size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    world = current_world()
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if current_world().size > 1:
        dist.barrier()
