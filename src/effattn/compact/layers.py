"""The MHA / GQA / MQA layer (survey Eqs. 23-26) and checkpoint conversion between head counts.

`GroupedAttention(d_model, heads, kv_heads, head_dim)`: q = x W_Q `[B, T, h, d]`, K_c = X W_Kc and
V_c = X W_Vc `[B, S, hkv, d]`, RoPE on q and K_c, and each K/V head shared by h / hkv query heads
(never repeated in memory). The cache holds K_c and V_c: 2 hkv d numbers per token. kv_heads = heads is
MHA (Vaswani et al., 2017), kv_heads = 1 is MQA (Shazeer, 2019).

`convert_kv_heads(layer, kv_heads)` uptrains an MHA checkpoint into GQA/MQA the way Ainslie et al. (2023)
do: the K and V projection matrices of the heads of each group are mean-pooled into one head.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.rotary import RotaryEmbedding
from ..reference import softmax_attention
from ..registry import REGISTRY
from ..validate import check_positive_int
from .cache import CompactLayer, LayerCache, kernel_decode
from . import mha  # noqa: F401  (registers "standard", the default core)


class GroupedAttention(CompactLayer):
    """Multi-head attention with `kv_heads` key/value heads (MHA, GQA, MQA); no biases (Table 3 counts
    4 Dm h d parameters for MHA and 2 Dm h d + 2 Dm hkv d for GQA). `core` names the registered exact
    softmax method that computes the attention (default "standard"; a flash or decode kernel once
    registered): any method taking (q, k, v, causal=...) with GQA heads. `decode_kernel=True`: attention over
    a cache runs the split-KV decode kernel on the cache buffers in place (`kernel_decode`; causal only)."""

    def __init__(self, d_model: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, *,
                 rope: bool = True, rope_base: float = 10000.0, causal: bool = True, core: str = "standard",
                 decode_kernel: bool = False, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.core = REGISTRY.get(core).name  # registered exact softmax method doing the attention itself
        self.decode_kernel = decode_kernel
        check_positive_int("d_model", d_model)
        check_positive_int("heads", heads)
        kv_heads = heads if kv_heads is None else check_positive_int("kv_heads", kv_heads)
        head_dim = d_model // heads if head_dim is None else check_positive_int("head_dim", head_dim)
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.d_model, self.heads, self.kv_heads, self.head_dim, self.causal = d_model, heads, kv_heads, head_dim, causal
        kw = dict(bias=False, dtype=dtype, device=device)
        self.wq = nn.Linear(d_model, heads * head_dim, **kw)
        self.wk = nn.Linear(d_model, kv_heads * head_dim, **kw)
        self.wv = nn.Linear(d_model, kv_heads * head_dim, **kw)
        self.wo = nn.Linear(heads * head_dim, d_model, **kw)
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.fields = {"k": (kv_heads, head_dim), "v": (kv_heads, head_dim)}
        self.heads_first = True  # per-head (per-rank) token runs: attention reads the cache in place

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, *, reference: bool = False) -> torch.Tensor:
        """x `[B, T, d_model]` -> `[B, T, d_model]`. `reference=True` computes Eq. 26 literally (K/V heads
        repeated, plain softmax attention) for testing."""
        offset = self._check(x, cache)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.head_dim)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            stored = cache.append(k=k, v=v)
            if self.decode_kernel and self.causal and not reference:
                return self.wo(kernel_decode(q, cache).reshape(B, T, self.heads * self.head_dim))
            k, v = stored["k"], stored["v"]
        attn = softmax_attention if reference else REGISTRY.get(self.core).fn
        o = attn(q, k, v, causal=self.causal)
        return self.wo(o.reshape(B, T, self.heads * self.head_dim))


def convert_kv_heads(layer: GroupedAttention, kv_heads: int) -> GroupedAttention:
    """A copy of `layer` with `kv_heads` key/value heads: the K/V projections of the layer.kv_heads // kv_heads
    heads that form each new group are mean-pooled (Ainslie et al., 2023, Sec. 2.1); Q and O are copied.
    A layer whose heads inside each group are already equal converts exactly."""
    if not isinstance(layer, GroupedAttention):
        raise TypeError(f"layer must be a GroupedAttention, got {type(layer).__name__}")
    check_positive_int("kv_heads", kv_heads)
    if layer.kv_heads % kv_heads or layer.heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide the layer's kv_heads={layer.kv_heads}")
    p = layer.wq.weight
    out = GroupedAttention(layer.d_model, layer.heads, kv_heads, layer.head_dim, rope=layer.rope is not None,
                           rope_base=layer.rope.base if layer.rope is not None else 10000.0,
                           causal=layer.causal, core=layer.core, decode_kernel=layer.decode_kernel, dtype=p.dtype,
                           device=p.device)
    group = layer.kv_heads // kv_heads
    with torch.no_grad():
        out.wq.weight.copy_(layer.wq.weight)
        out.wo.weight.copy_(layer.wo.weight)
        for new, old in ((out.wk, layer.wk), (out.wv, layer.wv)):
            # weight rows are head-major: [kv_heads * group * head_dim, d_model]
            w = old.weight.view(kv_heads, group, layer.head_dim, layer.d_model)
            new.weight.copy_(w.mean(dim=1).reshape(kv_heads * layer.head_dim, layer.d_model))
    return out
