"""What every KV cache shares: its geometry, input checks for `append`, and the `decode` interface.

A cache stores, per sequence, the keys `[L, Hkv, D]` and values `[L, Hkv, Dv]` of the tokens seen so far.
`segments(seq_ids)` describes the storage to the decode kernel (`effattn.hardware.decode_kernels`), and
`keys_values(i, dtype)` returns sequence i's keys and values as dense tensors (dequantised), which the
float64 references and eviction policies use.
"""
from __future__ import annotations

import torch

from ..validate import FLOAT_DTYPES, check_positive_int, check_tensor


class KVCacheBase:
    def __init__(self, kv_heads: int, head_dim: int, head_dim_v: int | None, dtype: torch.dtype, device) -> None:
        check_positive_int("kv_heads", kv_heads)
        check_positive_int("head_dim", head_dim)
        if head_dim_v is not None:
            check_positive_int("head_dim_v", head_dim_v)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
        self._memo = None  # (seq_ids, segments): rebuilt only after the cache changes

    def segments(self, seq_ids=None):
        """(list of KVSegment, totals `[B]` int32) describing the cache to the decode kernel. Built once per
        change of the cache, so repeated decode calls launch no host-to-device copies."""
        key = None if seq_ids is None else tuple(seq_ids)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self._build_segments(seq_ids))
        return self._memo[1]

    def _check_append(self, k, v, batch: int, lengths) -> list[int]:
        """k `[n, T, Hkv, D]`, v `[n, T, Hkv, Dv]` in the cache's dtype and device; `lengths` (default all
        T) how many of the T tokens of each row to append. Returns the lengths as ints."""
        check_tensor("k", k, ndim=4, layout="[B, T, Hkv, D]")
        check_tensor("v", v, ndim=4, layout="[B, T, Hkv, Dv]")
        want_k = (batch, k.shape[1], self.kv_heads, self.head_dim)
        want_v = (batch, k.shape[1], self.kv_heads, self.head_dim_v)
        if tuple(k.shape) != want_k:
            raise ValueError(f"k must have shape [B, T, Hkv, D] = {list(want_k)} for this cache, got {list(k.shape)}")
        if tuple(v.shape) != want_v:
            raise ValueError(f"v must have shape [B, T, Hkv, Dv] = {list(want_v)} for this cache, got {list(v.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != self.dtype or t.device != self.device:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype} on {self.device}, "
                                f"got {t.dtype} on {t.device}")
        if lengths is None:
            return [k.shape[1]] * batch
        lengths = [int(x) for x in lengths]
        if len(lengths) != batch or any(n < 0 or n > k.shape[1] for n in lengths):
            raise ValueError(f"lengths must hold {batch} ints in [0, T={k.shape[1]}], got {lengths}")
        return lengths

    def _lengths_tensor(self, lengths: list[int]) -> torch.Tensor:
        return torch.tensor(lengths, dtype=torch.int32, device=self.device)

    def batch_lengths(self, seq_ids=None) -> list[int]:  # overridden by caches with sequence ids
        if seq_ids is not None:
            raise ValueError(f"seq_ids is only meaningful for a PagedKVCache, got {seq_ids!r}")
        return list(self.lengths)

    def sequence_ids(self) -> list[int]:
        """The sequences a decode call covers by default, in batch order."""
        return list(range(len(self.lengths)))

    def keys_values_batch(self, dtype=None, seq_ids=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.keys_values(i, dtype) for i in (self.sequence_ids() if seq_ids is None else seq_ids)]


def decode_reference(q: torch.Tensor, cache, *, dtype=torch.float64, seq_ids=None, causal: bool = True,
                     scale: float | None = None, return_lse: bool = False):
    """Readable ground truth for `effattn.decode`: exact softmax attention of q `[B, Tq, H, D]` over each
    sequence's (dequantised) keys and values, computed in `dtype` on q's device. Returns o `[B, Tq, H, Dv]`
    in `dtype` (and LSE `[B, H, Tq]`)."""
    from ..reference import softmax_attention

    outs = [softmax_attention(q[i:i + 1].to(dtype), k[None].to(q.device), v[None].to(q.device), causal=causal,
                              scale=scale, return_lse=return_lse)
            for i, (k, v) in enumerate(cache.keys_values_batch(dtype, seq_ids))]
    if return_lse:
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])
    return torch.cat(outs)
