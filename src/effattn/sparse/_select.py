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


def token_block_fn(sel_tokens: torch.Tensor, T: int, block: int):
    """Elementwise mask of a per-query block selection `[B, H, T, nK]`: key kv is kept for query q when
    its block kv // block is selected for q (indices clamped: builders may evaluate padded grids)."""
    nk = sel_tokens.shape[-1]
    return lambda b, h, qi, kv: sel_tokens[b, h, qi.clamp(max=T - 1), (kv // block).clamp(max=nk - 1)]


def token_block_mask(sel_tokens: torch.Tensor, T: int, S: int, block: int, query_block: int = 16):
    """Causal BlockMask of a per-query block selection `[B, H, T, ceil(S / block)]` (Quest pages, NSA
    per-token blocks): tiles of `query_block` queries visit the union of their queries' blocks, and the
    selection is applied elementwise inside them."""
    from .block_mask import block_mask_from_blocks

    B, H = sel_tokens.shape[:2]
    nq = n_blocks(T, query_block)
    padded = torch.nn.functional.pad(sel_tokens, (0, 0, 0, nq * query_block - T))
    tiles = padded.view(B, H, nq, query_block, -1).any(3)
    return block_mask_from_blocks(tiles, T, S, (query_block, block), causal=True,
                                  mask_fn=token_block_fn(sel_tokens, T, block))


def density(selected_dense: torch.Tensor) -> float:
    return float(selected_dense.float().mean())


def kv_heads_to_q(x: torch.Tensor, H: int) -> torch.Tensor:
    """`[B, N, Hkv, D]` -> `[B, N, H, D]` for small pooled tensors (never for full K/V in a kernel)."""
    return x.repeat_interleave(H // x.shape[2], dim=2)


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Selection scores in >= float32: discrete choices must not depend on bf16 rounding."""
    return torch.promote_types(t.dtype, torch.float32)
