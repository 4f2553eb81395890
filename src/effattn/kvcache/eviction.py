"""KV-cache eviction during generation (survey Table 4): StreamingLLM and H2O, on a ContiguousKVCache.

Both keep a fixed budget of cached tokens per sequence. Keys are cached after RoPE at their true
positions, so a kept token keeps its position (H2O's convention; StreamingLLM's paper re-numbers positions
inside the cache, which needs pre-RoPE keys).

- StreamingLLM (Xiao et al. 2024): the first `sinks` tokens (attention sinks) + the `recent` newest.
- H2O (Zhang et al. 2023): the `recent` newest + the `heavy` tokens with the largest attention received so
  far (summed over steps and over the query heads of each KV group), chosen per KV head.
"""
from __future__ import annotations

import math

import torch

from ..validate import check_positive_int
from .contiguous import ContiguousKVCache


def _check_cache(cache) -> None:
    if not isinstance(cache, ContiguousKVCache):
        raise TypeError(f"eviction works on a ContiguousKVCache, got {type(cache).__name__}")
    if len(set(cache.lengths)) != 1:
        raise ValueError(f"eviction needs sequences of equal length, got lengths {cache.lengths}")


class StreamingLLM:
    def __init__(self, sinks: int = 4, recent: int = 60) -> None:
        check_positive_int("sinks", sinks, minimum=0)
        check_positive_int("recent", recent)
        self.sinks, self.recent = sinks, recent
        self.budget = sinks + recent

    def observe(self, q: torch.Tensor, cache: ContiguousKVCache, scale: float | None = None) -> None:
        """StreamingLLM needs no attention statistics."""

    def evict(self, cache: ContiguousKVCache) -> None:
        _check_cache(cache)
        L = cache.lengths[0]
        if L <= self.budget:
            return
        keep = torch.cat([torch.arange(self.sinks), torch.arange(L - self.recent, L)])
        cache.retain(keep.view(1, 1, -1).expand(cache.batch, cache.kv_heads, -1))


class H2O:
    def __init__(self, heavy: int = 32, recent: int = 32) -> None:
        check_positive_int("heavy", heavy, minimum=0)
        check_positive_int("recent", recent)
        self.heavy, self.recent = heavy, recent
        self.budget = heavy + recent
        self.score: torch.Tensor | None = None  # [B, Hkv, L] accumulated attention of the cached tokens

    def observe(self, q: torch.Tensor, cache: ContiguousKVCache, scale: float | None = None) -> None:
        """Add the attention that q `[B, T, H, D]` (the newest T tokens, causal) pays to each cached token."""
        _check_cache(cache)
        B, T, H, D = q.shape
        L, Hkv = cache.lengths[0], cache.kv_heads
        k = cache.k[:, :L].float()  # [B, L, Hkv, D]
        qg = q.float().view(B, T, Hkv, H // Hkv, D)
        s = torch.einsum("btkgd,blkd->bkgtl", qg, k) * (D ** -0.5 if scale is None else scale)
        visible = torch.arange(L, device=q.device) <= (L - T + torch.arange(T, device=q.device)).view(T, 1)
        s = s.masked_fill(~visible, -math.inf)
        received = torch.softmax(s, dim=-1).sum(dim=(2, 3))  # [B, Hkv, L]
        if self.score is None:
            self.score = received
        else:
            grown = torch.zeros_like(received)
            grown[..., :self.score.shape[-1]] = self.score
            self.score = grown + received

    def evict(self, cache: ContiguousKVCache) -> None:
        _check_cache(cache)
        L = cache.lengths[0]
        if L <= self.budget:
            return
        old = self.score[..., :L - self.recent]
        heavy = old.topk(self.heavy, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, heavy]
        recent = torch.arange(L - self.recent, L, device=heavy.device).expand(*heavy.shape[:2], -1)
        keep = torch.cat([heavy, recent], dim=-1)
        cache.retain(keep)
        self.score = torch.gather(self.score, -1, keep)
