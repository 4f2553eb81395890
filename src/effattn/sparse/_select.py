"""Block bookkeeping shared by the dynamic sparse methods (MoBA, NSA, Quest, XAttention).

Queries are cut into blocks of `bq` query indices, keys into blocks of `bk` key indices; query i sits at
key position i + S - T (bottom-right). Relative to a query block, a key block is "past" (all its keys
before the block's first query position), "current" (it holds a position of one of the block's queries)
or "future" (all keys after the block's last query position).
"""
from __future__ import annotations

import math

import torch

from ..reference.softmax import mask_from_fn


def n_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def block_relation(T: int, S: int, bq: int, bk: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(past, current): bool `[nQ, nK]`."""
    nq, nk = n_blocks(T, bq), n_blocks(S, bk)
    i = torch.arange(nq, device=device).view(nq, 1)
    j = torch.arange(nk, device=device).view(1, nk)
    first = i * bq + (S - T)
    last = torch.clamp((i + 1) * bq, max=T) - 1 + (S - T)
    k_first, k_last = j * bk, torch.clamp((j + 1) * bk, max=S) - 1
    past = k_last < first
    current = (k_first <= last) & ~past
    return past, current


def top_k_of(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the (at most) `k` highest `scores` along the last dim among `candidates`."""
    k = min(k, scores.shape[-1])
    if k == 0:
        return torch.zeros_like(candidates)
    masked = scores.masked_fill(~candidates, -math.inf)
    idx = masked.topk(k, dim=-1).indices
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
    return chosen & candidates


def causal_fn(T: int, S: int):
    """Elementwise bottom-right causal mask on query/key indices."""
    return lambda b, h, q, kv: kv <= q + (S - T)


def expand_blocks(selected: torch.Tensor, T: int, S: int, bq: int, bk: int) -> torch.Tensor:
    """Block selection `[B, H, nQ, nK]` -> elementwise `[B, H, T, S]` (for references)."""
    return selected.repeat_interleave(bq, dim=-2)[..., :T, :].repeat_interleave(bk, dim=-1)[..., :S]


def dense_mask(selected: torch.Tensor, T: int, S: int, bq: int, bk: int, mask_fn=None) -> torch.Tensor:
    m = expand_blocks(selected, T, S, bq, bk)
    if mask_fn is not None:
        m = m & mask_from_fn(mask_fn, m.shape[0], m.shape[1], T, S, m.device)
    return m


def density(selected_dense: torch.Tensor) -> float:
    return float(selected_dense.float().mean())


def kv_heads_to_q(x: torch.Tensor, H: int) -> torch.Tensor:
    """`[B, N, Hkv, D]` -> `[B, N, H, D]` for small pooled tensors (never for full K/V in a kernel)."""
    return x.repeat_interleave(H // x.shape[2], dim=2)


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Selection scores in >= float32: discrete choices must not depend on bf16 rounding."""
    return torch.promote_types(t.dtype, torch.float32)
