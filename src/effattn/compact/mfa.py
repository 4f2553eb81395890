"""Multi-matrix factorisation attention, MFA (Hu et al. 2024; survey Sec. 5.2, Eqs. 32-33).

MQA's single key/value head (cache 2 d per token), with the query projection factorised so that many wide
heads stay cheap: a shared down-projection c_q = x W_down_Q `[d]`, then per-head up-projections
q_i = c_q W_up_Q^(i) `[d]` (W_up_Q `[d, h d]`). K_c = X W_Kc, V_c = X W_Vc `[N, d]` are shared by every head
(K = K_c (x) 1_h). RoPE rotates the query heads and the one key head, as in the paper's models.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.rotary import RotaryEmbedding, apply_rotary, rotary_angles
from ..reference import softmax_attention
from ..validate import check_positive_int, check_same, check_scale, check_tensor
from .cache import CompactLayer, LayerCache, kernel_decode
from .mha import standard_attention

OPTIONS = {"w_uq": None, "causal": False, "scale": None, "rope_base": None}


def _check_mfa(q, k, v, w_uq, scale, rope_base) -> None:
    check_tensor("q", q, ndim=3, layout="[B, T, d_c] (the shared query latent)")
    check_tensor("k", k, ndim=3, layout="[B, S, d] (the single key head)")
    check_tensor("v", v, ndim=3, layout="[B, S, d_v] (the single value head)")
    check_tensor("w_uq", w_uq, ndim=3, layout="[d_c, H, d]")
    for name, t in (("k", k), ("v", v), ("w_uq", w_uq)):
        check_same("q", q, name, t)
    if k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"q [B, T, d_c], k [B, S, d], v [B, S, d_v] must share B and S, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if w_uq.shape[0] != q.shape[2] or w_uq.shape[2] != k.shape[2]:
        raise ValueError(f"w_uq must be [d_c={q.shape[2]}, H, d={k.shape[2]}], got {tuple(w_uq.shape)}")
    check_scale(scale)
    if rope_base is not None and not (isinstance(rope_base, (int, float)) and rope_base > 1):
        raise ValueError(f"rope_base must be None (no rotary) or a number > 1, got {rope_base!r}")
    if rope_base is not None and k.shape[2] % 2:
        raise ValueError(f"rotary needs an even head dim, got d={k.shape[2]}")


def _rotate_queries(q: torch.Tensor, S: int, rope_base: float | None) -> torch.Tensor:
    """RoPE at the queries' positions S - T .. S - 1 (bottom-right aligned, like causal masking)."""
    if rope_base is None:
        return q
    T, D = q.shape[1], q.shape[-1]
    cos, sin = rotary_angles(torch.arange(S - T, S, device=q.device), D, rope_base)
    return apply_rotary(q, cos, sin)


def mfa_attention(q, k, v, w_uq=None, *, causal=False, scale=None, rope_base=None):
    """MFA attention from the shared query latent and the single cached K/V head.

    q: `[B, T, d_c]` (c_q = x W_down_Q), k: `[B, S, d]` (rotated when rope_base is given), v: `[B, S, d_v]`,
    w_uq: `[d_c, H, d]` (W_up_Q). With `rope_base`, query heads are rotated at positions S - T .. S - 1.
    Returns o `[B, T, H, d_v]`. The K/V head is shared by all query heads without being repeated (MQA);
    time O(T d_c H d + T S H d), KV read O(S d) per step.
    """
    if w_uq is None:
        raise TypeError("mfa_attention needs the query up-projection w_uq [d_c, H, d]")
    _check_mfa(q, k, v, w_uq, scale, rope_base)
    qh = mfa_queries(q, w_uq, k.shape[1], rope_base)
    return standard_attention(qh, k[:, :, None], v[:, :, None], causal=causal, scale=scale)


def mfa_queries(q: torch.Tensor, w_uq: torch.Tensor, S: int, rope_base: float | None) -> torch.Tensor:
    """Per-head queries c_q W_up_Q^(i) `[B, T, H, d]`, rotated at positions S - T .. S - 1."""
    return _rotate_queries(torch.einsum("btc,chd->bthd", q, w_uq), S, rope_base)


def mfa_attention_reference(q, k, v, w_uq, *, causal=False, scale=None, rope_base=None, **_ignored):
    """Eqs. 32-33 literally: q = c_q W_up_Q reshaped into heads, K = K_c (x) 1_h, V = V_c (x) 1_h."""
    B, T, C = q.shape
    H, D = w_uq.shape[1], w_uq.shape[2]
    qh = _rotate_queries((q @ w_uq.reshape(C, H * D)).view(B, T, H, D), k.shape[1], rope_base)
    K = k[:, :, None, :].expand(-1, -1, H, -1)
    V = v[:, :, None, :].expand(-1, -1, H, -1)
    return softmax_attention(qh, K, V, causal=causal, scale=scale)


class MFA(CompactLayer):
    """The MFA layer: W_down_Q `[Dm, d]`, W_up_Q `[d, h d]`, W_Kc, W_Vc `[Dm, d]`, W_O `[h d, Dm]`;
    Dm (3 d + h d) + h d^2 parameters, 2 d cached numbers per token (Table 3)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, *, rope: bool = True, rope_base: float = 10000.0,
                 causal: bool = True, decode_kernel: bool = False, dtype: torch.dtype | None = None,
                 device=None) -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim)):
            check_positive_int(name, val)
        self.d_model, self.heads, self.head_dim, self.causal = d_model, heads, head_dim, causal
        self.decode_kernel = decode_kernel  # attention over a cache by the split-KV kernel, as GroupedAttention
        kw = dict(bias=False, dtype=dtype, device=device)
        self.w_dq = nn.Linear(d_model, head_dim, **kw)
        self.w_uq = nn.Parameter(torch.empty(head_dim, heads, head_dim, dtype=dtype, device=device))
        bound = (3 / head_dim) ** 0.5  # variance 1 / d, like nn.Linear's fan-in scaling
        nn.init.uniform_(self.w_uq, -bound, bound)
        self.wk = nn.Linear(d_model, head_dim, **kw)
        self.wv = nn.Linear(d_model, head_dim, **kw)
        self.wo = nn.Linear(heads * head_dim, d_model, **kw)
        self.rope_base = rope_base if rope else None
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.fields = {"k": (head_dim,), "v": (head_dim,)}

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, *, reference: bool = False) -> torch.Tensor:
        """x `[B, T, d_model]` -> `[B, T, d_model]`; `reference=True` uses `mfa_attention_reference`."""
        offset = self._check(x, cache)
        B, T, _ = x.shape
        k, v = self.wk(x), self.wv(x)
        if self.rope is not None:
            k = self.rope(k[:, :, None], offset)[:, :, 0]
        if cache is not None:
            stored = cache.append(k=k, v=v)
            if self.decode_kernel and self.causal and not reference:
                q = mfa_queries(self.w_dq(x), self.w_uq, cache.length, self.rope_base)
                return self.wo(kernel_decode(q, cache).reshape(B, T, self.heads * self.head_dim))
            k, v = stored["k"], stored["v"]
        attn = mfa_attention_reference if reference else mfa_attention
        o = attn(self.w_dq(x), k, v, self.w_uq, causal=self.causal, rope_base=self.rope_base)
        return self.wo(o.reshape(B, T, self.heads * self.head_dim))


def _register() -> None:
    from ..inputs import randn
    from ..registry import Complexity, Method, Shape, register
    from .formulas import PARAMS, state_or_cache

    def make_inputs(shape: Shape, dtype, device, generator, **options) -> dict:
        B, T, S, H, D = shape.batch, shape.seq_q, shape.S, shape.heads, shape.head_dim
        return {"q": randn((B, T, D), dtype, device, generator),
                "k": randn((B, S, D), dtype, device, generator),
                "v": randn((B, S, shape.Dv), dtype, device, generator),
                "w_uq": randn((D, H, D), dtype, device, generator, std=D ** -0.5),
                "causal": True, "rope_base": 10000.0, **options}

    register(Method(
        name="mfa", family="compact", cite="Hu et al. 2024 (survey Table 3, MFA; Eqs. 32-33)",
        fn=mfa_attention, reference=mfa_attention_reference, make_inputs=make_inputs,
        complexity=Complexity("O(N^2 h d)", "O(N^2)", 2.0, 2.0),
        state_or_cache=state_or_cache("mfa"), params=PARAMS["mfa"], options=OPTIONS,
        supports=frozenset({"causal", "noncausal", "backward", "decode"}),
        grad_inputs=("q", "k", "v", "w_uq"),
        description="one shared K/V head (MQA cache) with a factorised query projection W_down_Q W_up_Q"))


_register()
