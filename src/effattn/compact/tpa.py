"""Tensor product attention, TPA (Zhang et al. 2025, "Tensor Product Attention Is All You Need"; survey
Sec. 5.2, Eqs. 34-38).

Each token's per-head keys are a rank-r_k sum of outer products of a head factor and a feature factor,
K_t = (1 / r_k) sum_r a_K,r(x_t) (x) b_K,r(x_t) with a `[h]` and b `[d]` (the same for V with r_v and Q with
r_q). The cache holds the factors: (r_k + r_v)(h + d) numbers per token. RoPE rotates the feature factors
b_Q, b_K; since it acts on the d axis only, rotating b_K rotates every head's key (the paper's Thm. 1),
so the rotated factors are what is cached.

The fast path never forms per-head K/V: q_h . K_s,h = (1 / r_k) sum_r a_K,r[s, h] (q_h . b_K,r[s]), a
shared-key (MQA-like) score per rank weighted per head, and o_h = (1 / r_v) sum_r sum_s p_hs a_V,r[s, h]
b_V,r[s]. Decoding reads only the factors.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.rotary import RotaryEmbedding
from ..reference import softmax_attention, visibility
from ..validate import check_positive_int, check_same, check_scale, check_tensor
from .cache import CompactLayer, LayerCache
from .formulas import TPADims

OPTIONS = {"a_v": None, "b_v": None, "causal": False, "scale": None}


def _check_tpa(q, a_k, b_k, a_v, b_v, scale) -> None:
    check_tensor("q", q, ndim=4, layout="[B, T, H, D]")
    for name, t, layout in (("a_k", a_k, "[B, S, r_k, H]"), ("b_k", b_k, "[B, S, r_k, D]"),
                            ("a_v", a_v, "[B, S, r_v, H]"), ("b_v", b_v, "[B, S, r_v, Dv]")):
        check_tensor(name, t, ndim=4, layout=layout)
        check_same("q", q, name, t)
    B, T, H, D = q.shape
    S, r_k, r_v = a_k.shape[1], a_k.shape[2], a_v.shape[2]
    want = {"a_k": (B, S, r_k, H), "b_k": (B, S, r_k, D), "a_v": (B, S, r_v, H)}
    for name, t in (("a_k", a_k), ("b_k", b_k), ("a_v", a_v)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]} (from q [B, T, H, D] and a_k [B, S, r_k, H]), "
                             f"got {tuple(t.shape)}")
    if tuple(b_v.shape[:3]) != (B, S, r_v):
        raise ValueError(f"b_v must have shape [B={B}, S={S}, r_v={r_v}, Dv], got {tuple(b_v.shape)}")
    check_scale(scale)


def tpa_attention(q, a_k, b_k, a_v=None, b_v=None, *, causal=False, scale=None):
    """TPA attention from the cached factors, without forming per-head K/V.

    q: `[B, T, H, D]` (formed from its own factors, rotated), a_k: `[B, S, r_k, H]`, b_k: `[B, S, r_k, D]`
    (rotated), a_v: `[B, S, r_v, H]`, b_v: `[B, S, r_v, Dv]`. Returns o `[B, T, H, Dv]`. Time
    O(T S H (r_k D + r_v Dv)), memory O(B H T S); the factors are read once per rank.
    """
    if a_v is None or b_v is None:
        raise TypeError("tpa_attention needs the value factors a_v [B, S, r_v, H] and b_v [B, S, r_v, Dv]")
    _check_tpa(q, a_k, b_k, a_v, b_v, scale)
    B, T, H, D = q.shape
    S, r_k, r_v, Dv = a_k.shape[1], a_k.shape[2], a_v.shape[2], b_v.shape[3]
    scale = D ** -0.5 if scale is None else scale
    stat = torch.promote_types(q.dtype, torch.float32)
    qf = q.permute(0, 2, 1, 3).reshape(B, H * T, D)  # heads folded into rows: each b_K,r is shared by all heads
    scores = torch.zeros(B, H, T, S, dtype=stat, device=q.device)
    for r in range(r_k):
        shared = torch.bmm(qf, b_k[:, :, r].transpose(1, 2)).view(B, H, T, S)
        scores += shared.to(stat) * a_k[:, :, r].permute(0, 2, 1)[:, :, None, :].to(stat)
    scores *= scale / r_k
    keep = visibility(B, H, T, S, causal=causal, device=q.device)
    scores = scores.masked_fill(~keep, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key give 0
    o = torch.zeros(B, H * T, Dv, dtype=stat, device=q.device)
    for r in range(r_v):
        weighted = (probs * a_v[:, :, r].permute(0, 2, 1)[:, :, None, :].to(stat)).to(q.dtype)
        o += torch.bmm(weighted.view(B, H * T, S), b_v[:, :, r]).to(stat)
    return (o / r_v).to(q.dtype).view(B, H, T, Dv).permute(0, 2, 1, 3)


def tensor_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 36/38: (1 / r) sum_r a_r (x) b_r. a `[B, N, r, H]`, b `[B, N, r, D]` -> `[B, N, H, D]`."""
    return torch.einsum("bnrh,bnrd->bnhd", a, b) / a.shape[2]


def tpa_attention_reference(q, a_k, b_k, a_v, b_v, *, causal=False, scale=None, **_ignored):
    """Eq. 38 literally: form K and V from their factors, then softmax attention (float64 truth)."""
    return softmax_attention(q, tensor_product(a_k, b_k), tensor_product(a_v, b_v), causal=causal, scale=scale)


class TPA(CompactLayer):
    """The TPA layer: contextual factors a_Q, b_Q, a_K, b_K, a_V, b_V are linear in x (Eqs. 34, 37), output
    W_O. Dm (r_q + r_k + r_v)(h + d) + Dm h d parameters (Table 3); T6's default ranks 6, 2, 2."""

    def __init__(self, d_model: int, heads: int, head_dim: int, dims: TPADims = TPADims(6, 2, 2), *,
                 rope: bool = True, rope_base: float = 10000.0, causal: bool = True,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim),
                          ("dims.q_rank", dims.q_rank), ("dims.k_rank", dims.k_rank), ("dims.v_rank", dims.v_rank)):
            check_positive_int(name, val)
        self.d_model, self.heads, self.head_dim, self.dims, self.causal = d_model, heads, head_dim, dims, causal
        kw = dict(bias=False, dtype=dtype, device=device)
        self.ranks = {"q": dims.q_rank, "k": dims.k_rank, "v": dims.v_rank}
        self.w_a = nn.ModuleDict({n: nn.Linear(d_model, r * heads, **kw) for n, r in self.ranks.items()})
        self.w_b = nn.ModuleDict({n: nn.Linear(d_model, r * head_dim, **kw) for n, r in self.ranks.items()})
        self.wo = nn.Linear(heads * head_dim, d_model, **kw)
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.fields = {"a_k": (dims.k_rank, heads), "b_k": (dims.k_rank, head_dim),
                       "a_v": (dims.v_rank, heads), "b_v": (dims.v_rank, head_dim)}
        self.heads_first = True  # per-head (per-rank) token runs: attention reads the cache in place

    def _factors(self, x: torch.Tensor, name: str, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        r = self.ranks[name]
        a = self.w_a[name](x).view(B, T, r, self.heads)
        b = self.w_b[name](x).view(B, T, r, self.head_dim)
        if self.rope is not None and name != "v":
            b = self.rope(b, offset)  # the rank axis stands where heads usually are
        return a, b

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, *, reference: bool = False) -> torch.Tensor:
        """x `[B, T, d_model]` -> `[B, T, d_model]`; `reference=True` uses `tpa_attention_reference`."""
        offset = self._check(x, cache)
        B, T, _ = x.shape
        q = tensor_product(*self._factors(x, "q", offset))
        a_k, b_k = self._factors(x, "k", offset)
        a_v, b_v = self._factors(x, "v", offset)
        if cache is not None:
            stored = cache.append(a_k=a_k, b_k=b_k, a_v=a_v, b_v=b_v)
            a_k, b_k, a_v, b_v = stored["a_k"], stored["b_k"], stored["a_v"], stored["b_v"]
        attn = tpa_attention_reference if reference else tpa_attention
        o = attn(q, a_k, b_k, a_v, b_v, causal=self.causal)
        return self.wo(o.reshape(B, T, self.heads * self.head_dim))


def _register() -> None:
    from ..inputs import randn
    from ..registry import Complexity, Method, Shape, register
    from .formulas import PARAMS, state_or_cache, tpa_dims

    def make_inputs(shape: Shape, dtype, device, generator, **options) -> dict:
        d = tpa_dims(shape)
        B, T, S, H, D = shape.batch, shape.seq_q, shape.S, shape.heads, shape.head_dim
        return {"q": randn((B, T, H, D), dtype, device, generator),
                "a_k": randn((B, S, d.k_rank, H), dtype, device, generator),
                "b_k": randn((B, S, d.k_rank, D), dtype, device, generator),
                "a_v": randn((B, S, d.v_rank, H), dtype, device, generator),
                "b_v": randn((B, S, d.v_rank, shape.Dv), dtype, device, generator),
                "causal": True, **options}

    register(Method(
        name="tpa", family="compact", cite="Zhang et al. 2025 (survey Table 3, TPA; Eqs. 34-38)",
        fn=tpa_attention, reference=tpa_attention_reference, make_inputs=make_inputs,
        complexity=Complexity("O(N^2 h d (r_k + r_v))", "O(N^2)", 2.0, 2.0),
        state_or_cache=state_or_cache("tpa"), params=PARAMS["tpa"], options=OPTIONS,
        supports=frozenset({"causal", "noncausal", "backward", "decode"}),
        grad_inputs=("q", "a_k", "b_k", "a_v", "b_v"),
        description="K, V as rank-r sums of head (x) feature outer products; only the factors are cached"))


_register()
