"""The communication the schedules use, all through torch.distributed (NCCL on GPUs, gloo on CPU).

- `RingExchange`: send tensors to the next rank and receive the same shapes from the previous one with one
  `batch_isend_irecv`, returning at once so the caller computes while the transfer runs.
- `all_to_all`: differentiable all-to-all that scatters one dim and gathers another (Ulysses).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_size(group) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group), checking it exists."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) before the call")
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class RingExchange:
    """Post `send` to rank + 1 and receive like-shaped tensors from rank - 1; `wait()` returns them.

    Each call sends and receives in the same order on every rank, so matching is by order (NCCL) and
    by tag (gloo). Tensors being sent are kept alive until the exchange is waited on.
    """

    def __init__(self, tensors: list[torch.Tensor], group, rank: int, world: int, tag: int = 0) -> None:
        self._send = [t.contiguous() for t in tensors]
        self._recv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self._send]
        nxt, prv = _global(group, (rank + 1) % world), _global(group, (rank - 1) % world)
        ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in self._send]
        ops += [dist.P2POp(dist.irecv, t, prv, group, tag) for t in self._recv]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._send = []
        return self._recv


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, world: int) -> torch.Tensor:
    """Split x in `world` chunks along scatter_dim, send chunk j to rank j, concatenate what arrives
    (in rank order) along gather_dim."""
    # [world, ...]: chunk j goes to rank j. stack may keep a permuted layout of x (e.g. a gradient), and
    # the collective wants the standard one.
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send, memory_format=torch.contiguous_format)
    dist.all_to_all_single(recv, send, group=group)  # the single-tensor form runs on NCCL and gloo
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, world):
        ctx.dims, ctx.group, ctx.world = (scatter_dim, gather_dim), group, world
        return _all_to_all(x, scatter_dim, gather_dim, group, world)

    @staticmethod
    def backward(ctx, grad):
        # The adjoint of a permutation of chunks is the inverse permutation: the all-to-all with the
        # dims swapped.
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group, ctx.world), None, None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Differentiable all-to-all: x's `scatter_dim` must divide by the group size."""
    _, world = group_rank_size(group)
    if world == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, world)
