"""Splitting a sequence over the ranks of a group and putting it back together.

Contiguous: rank r holds tokens [r n, (r + 1) n) with n = N / W. Zigzag (for causal attention): the
sequence is cut into 2W chunks and rank r holds chunks r and 2W - 1 - r, so every rank has one early
and one late chunk and the causal work is the same on all ranks (Brandon et al., Striped/zigzag ring).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import group_rank_size


def _check_divisible(length: int, world: int, zigzag: bool, name: str = "x") -> int:
    parts = 2 * world if zigzag else world
    if length % parts:
        raise ValueError(f"{name}'s sequence length {length} must be divisible by "
                         f"{'2 x world size' if zigzag else 'the world size'} = {parts}")
    return length // parts


def chunk_ids(rank: int, world: int, zigzag: bool) -> tuple[int, ...]:
    """The chunks (of 2W when zigzag, of W otherwise) that `rank` holds, in sequence order."""
    return (rank, 2 * world - 1 - rank) if zigzag else (rank,)


def local_positions(seq_len: int, group=None, *, zigzag: bool = False, device=None) -> torch.Tensor:
    """Global token positions `[seq_len / W]` of this rank's shard (e.g. for rotary embeddings)."""
    rank, world = group_rank_size(group)
    c = _check_divisible(seq_len, world, zigzag, "seq_len")
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(rank, world, zigzag)])


def shard(x: torch.Tensor, group=None, *, zigzag: bool = False, dim: int = 1) -> torch.Tensor:
    """This rank's part of the full sequence x (sequence along `dim`, e.g. `[B, N, H, D]`)."""
    rank, world = group_rank_size(group)
    c = _check_divisible(x.shape[dim], world, zigzag)
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(rank, world, zigzag)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(x: torch.Tensor, group=None, *, zigzag: bool = False, dim: int = 1) -> torch.Tensor:
    """Gather every rank's shard (as `shard` cut it) into the full sequence, on every rank.

    For inspection and losses on the whole sequence: the result carries no autograd history.
    """
    rank, world = group_rank_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.detach().contiguous(), group=group)
    n_chunks = 2 * world if zigzag else world
    chunks: list[torch.Tensor | None] = [None] * n_chunks
    for r, s in enumerate(shards):
        for i, piece in zip(chunk_ids(r, world, zigzag), s.chunk(len(chunk_ids(r, world, zigzag)), dim=dim)):
            chunks[i] = piece
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def zigzag_to_contiguous(x: torch.Tensor, world: int, dim: int = 1) -> torch.Tensor:
    """Reorder a whole sequence gathered rank by rank from zigzag shards into natural order."""
    pieces = x.chunk(2 * world, dim=dim)  # rank r contributed pieces 2r (chunk r) and 2r + 1 (2W-1-r)
    order = [None] * (2 * world)
    for r in range(world):
        order[r], order[2 * world - 1 - r] = pieces[2 * r], pieces[2 * r + 1]
    return torch.cat(order, dim=dim)


def contiguous_to_zigzag(x: torch.Tensor, world: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `zigzag_to_contiguous`."""
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([c for r in range(world) for c in (chunks[r], chunks[2 * world - 1 - r])], dim=dim)
