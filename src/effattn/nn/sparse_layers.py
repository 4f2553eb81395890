"""Layers of the sparse class that need their own parameters (survey Sec. 3.3 and 6.4): NSA (compression
maps and branch gates), Linformer (sequence projections E, F) and differential attention (lambda vectors
and the per-head norm). NSA and differential attention are causal token mixers with `step` (see
`effattn.nn.common`); Linformer mixes every position of a fixed-length window, so it has no decoding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..sparse.differential import differential_attention, lambda_init_for
from ..sparse.linformer import linformer
from ..sparse.nsa import nsa
from ..validate import check_positive_int
from .common import CachedLayer, check_layer_input, layer_dims, split_heads
from .rotary import RotaryEmbedding


class _KVCacheLayer(CachedLayer):
    """q, k, v projections (GQA when kv_heads < heads), optional rotary, output projection, and a K/V
    cache: `_attend(q, k, v, x)` sees all keys so far with the new queries bottom-right aligned."""

    cache_keys = ("k", "v")

    def __init__(self, dim, heads, kv_heads, qk_dim, v_dim, rotary, rotary_dim=None):
        super().__init__()
        kv_heads = heads if kv_heads is None else check_positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a positive multiple of kv_heads={kv_heads}")
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.q_proj = nn.Linear(dim, heads * qk_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * qk_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * v_dim, bias=False)
        self.o_proj = nn.Linear(heads * v_dim, dim, bias=False)
        self.rope = RotaryEmbedding(rotary_dim or qk_dim) if rotary else None

    def _rotate(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        return x if self.rope is None else self.rope(x, offset)

    def _run(self, x, cache):
        offset = 0 if cache is None else cache["offset"]
        q = self._rotate(split_heads(self.q_proj(x), self.heads), offset)
        k = self._rotate(split_heads(self.k_proj(x), self.kv_heads), offset)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if cache is not None:
            k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
        return self.o_proj(self._attend(q, k, v, x).flatten(2)), {"k": k, "v": v}


class NSAAttention(_KVCacheLayer):
    """Native sparse attention layer (Yuan et al. 2025), trainable end to end.

    o = g_cmp o_cmp + g_slc o_slc + g_win o_win per head (`effattn.sparse.nsa`, per-token selection so
    that it is causal token by token), gates g = sigmoid(x W_g) `[B, T, H, 3]`, compression maps w_k, w_v
    `[block_size]` (initialised to the block mean). The three branches share one K/V projection (the
    paper gives each branch its own; one keeps the cache at 2 Hkv d per token). `step` keeps the K/V cache
    and recomputes the compressed tokens from it, so decoding equals `forward`. Before the first complete
    block of `block_size` tokens the compressed branch is empty (o_cmp = 0; w_k, w_v get no gradient).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, head_dim: int | None = None,
                 block_size: int = 64, top_n: int = 4, window: int = 512, rotary: bool = True) -> None:
        head_dim = layer_dims(dim, heads, head_dim)
        super().__init__(dim, heads, kv_heads, head_dim, head_dim, rotary)
        check_positive_int("block_size", block_size, power_of_two=True, minimum=16)
        self.options = dict(block_size=block_size, top_n=check_positive_int("top_n", top_n, minimum=0),
                            window=check_positive_int("window", window), selection="token")
        self.gate_proj = nn.Linear(dim, heads * 3)
        self.w_k = nn.Parameter(torch.full((block_size,), 1.0 / block_size))
        self.w_v = nn.Parameter(torch.full((block_size,), 1.0 / block_size))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, " + ", ".join(f"{k}={v}" for k, v in self.options.items())

    def _attend(self, q, k, v, x):
        gates = torch.sigmoid(self.gate_proj(x)).unflatten(-1, (self.heads, 3))
        return nsa(q, k, v, gates, self.w_k.to(q.dtype), self.w_v.to(q.dtype), **self.options)


class DifferentialAttention(_KVCacheLayer):
    """Differential attention layer (Ye et al. 2024, Diff Transformer).

    Per head: q, k of width 2 * head_dim split in halves for the two softmax maps, v of width 2 * head_dim,
    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init(layer) (vectors
    `[head_dim]`, drawn N(0, 0.1) as in the paper), then the per-head RMS norm with a learned weight
    `[2 * head_dim]` shared by the heads, times (1 - lambda_init). head_dim defaults to dim // heads
    (pass heads = the paper's h = dim / (2 d) for its parameter count); rotary acts on each half.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, head_dim: int | None = None,
                 layer: int = 1, rotary: bool = True, eps: float = 1e-5) -> None:
        d = layer_dims(dim, heads, head_dim)
        super().__init__(dim, heads, kv_heads, 2 * d, 2 * d, rotary, rotary_dim=d)
        self.layer, self.eps, self.half = check_positive_int("layer", layer), eps, d
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.randn(d) * 0.1))
        self.norm_weight = nn.Parameter(torch.ones(2 * d))

    @property
    def lambda_init(self) -> float:
        return lambda_init_for(self.layer)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.half}, layer={self.layer}"

    def _rotate(self, x, offset):
        if self.rope is None:
            return x
        halves = x.unflatten(-1, (2, self.half)).flatten(2, 3)  # [B, T, 2 H, d]: each half its own rotation
        return self.rope(halves, offset).unflatten(2, (x.shape[2], 2)).flatten(-2)

    def _attend(self, q, k, v, x):
        lambdas = [getattr(self, n).to(q.dtype) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")]
        o = differential_attention(q, k, v, *lambdas, layer=self.layer, causal=True, eps=self.eps)
        return o * self.norm_weight.to(o.dtype)


class LinformerAttention(nn.Module):
    """Linformer self-attention layer (Wang et al. 2020): keys and values projected along the sequence by
    learned E, F `[proj, max_len]` (one pair shared by the heads, the paper's "headwise sharing"), o = softmax(Q (E K)^T / sqrt(d)) (F V).

    Non-causal by definition: every output mixes all positions through E and F, so there is no `step`
    and it is no decoder token mixer (not in `effattn.nn.LAYERS`). Sequences shorter than max_len use the
    first T columns of E and F (as the reference implementation does for padding-free batches).
    `forward(x)`: x `[B, T, dim]`, T <= max_len -> `[B, T, dim]`.
    """

    def __init__(self, dim: int, heads: int, max_len: int, proj: int = 256, *, kv_heads: int | None = None,
                 head_dim: int | None = None) -> None:
        super().__init__()
        head_dim = layer_dims(dim, heads, head_dim)
        kv_heads = heads if kv_heads is None else check_positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a positive multiple of kv_heads={kv_heads}")
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.max_len, self.proj = check_positive_int("max_len", max_len), check_positive_int("proj", proj)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)
        # std 1/sqrt(max_len): a projected row keeps the scale of a key / value row.
        self.E = nn.Parameter(torch.randn(proj, max_len) * max_len ** -0.5)
        self.F = nn.Parameter(torch.randn(proj, max_len) * max_len ** -0.5)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, max_len={self.max_len}, proj={self.proj}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.dim)
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"x has T={T} tokens, more than max_len={self.max_len} that E and F project")
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.kv_heads)
        v = split_heads(self.v_proj(x), self.kv_heads)
        o = linformer(q, k, v, self.E[:, :T].to(x.dtype), self.F[:, :T].to(x.dtype))
        return self.o_proj(o.flatten(2))


__all__ = ["NSAAttention", "DifferentialAttention", "LinformerAttention"]
