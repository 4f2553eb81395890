"""Contiguous KV cache: one `[B, max_len, Hkv, D]` buffer per K and V, each sequence filled from the start
(gpt-fast's KVCache, with per-sequence lengths)."""
from __future__ import annotations

import torch

from ..hardware.decode_kernels import KVSegment
from ..validate import check_positive_int
from .base import KVCacheBase


class ContiguousKVCache(KVCacheBase):
    """k `[B, max_len, Hkv, D]`, v `[B, max_len, Hkv, Dv]`; sequence b holds `lengths[b]` tokens.

    Memory: B * max_len * Hkv * (D + Dv) elements, whatever the lengths (the waste paging removes).
    """

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, head_dim_v: int | None = None,
                 *, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__(kv_heads, head_dim, head_dim_v, dtype, device)
        check_positive_int("batch", batch)
        check_positive_int("max_len", max_len)
        self.batch, self.max_len = batch, max_len
        self.k = torch.zeros(batch, max_len, kv_heads, head_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros(batch, max_len, kv_heads, self.head_dim_v, dtype=dtype, device=self.device)
        self.lengths = [0] * batch

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Append k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]` (the first `lengths[b]` tokens of row b)."""
        lengths = self._check_append(k, v, self.batch, lengths)
        over = [b for b, n in enumerate(lengths) if self.lengths[b] + n > self.max_len]
        if over:
            raise ValueError(f"append would exceed max_len={self.max_len} for sequences {over} "
                             f"(lengths {self.lengths}, appending {lengths})")
        for b, n in enumerate(lengths):
            start = self.lengths[b]
            self.k[b, start:start + n] = k[b, :n]
            self.v[b, start:start + n] = v[b, :n]
            self.lengths[b] = start + n
        self._memo = None

    def retain(self, index: torch.Tensor) -> None:
        """Keep, for every (sequence, KV head), the tokens `index[b, h]` (ascending), dropping the rest:
        index `[B, Hkv, n]` int64. Eviction policies call this; every sequence then holds n tokens."""
        B, Hkv, n = index.shape
        if B != self.batch or Hkv != self.kv_heads:
            raise ValueError(f"index must be [B={self.batch}, Hkv={self.kv_heads}, n], got {list(index.shape)}")
        if n and int(index.max()) >= min(self.lengths):
            raise ValueError(f"index refers to token {int(index.max())} beyond a sequence length {self.lengths}")
        gather = index.transpose(1, 2).to(self.device)  # [B, n, Hkv]
        for buf in (self.k, self.v):
            kept = torch.gather(buf[:, :max(self.lengths)], 1,
                                gather.unsqueeze(-1).expand(-1, -1, -1, buf.shape[-1]))
            buf[:, :n] = kept
        self.lengths = [n] * self.batch
        self._memo = None

    def _build_segments(self, seq_ids):
        lens = self._lengths_tensor(self.batch_lengths(seq_ids))
        return [KVSegment(self.k, self.v, lens, torch.zeros_like(lens), max(self.lengths))], lens

    def keys_values(self, b: int, dtype=None):
        L = self.lengths[b]
        return self.k[b, :L].to(dtype or self.dtype), self.v[b, :L].to(dtype or self.dtype)
