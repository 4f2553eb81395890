"""Multi-head latent attention, MLA (DeepSeek-V2, Liu et al. 2024; survey Sec. 5.2, Eqs. 27-31).

Keys and values of all heads are up-projections of one latent per token, c_kv = x W_down_KV `[r_kv]`;
position enters through a decoupled RoPE key k_rope = RoPE(x W_KR) `[d_R]` shared by all heads. The cache
holds only c_kv and k_rope: r_kv + d_R numbers per token.

Head i scores query q_i = [q_i^N, q_i^R] against k_i = [c_kv W_UK^(i), k_rope] and reads v_i = c_kv W_UV^(i).
Two ways to compute it (the `form` option):
- "expanded": up-project the cache to per-head K, V and run multi-head attention (Eqs. 30-31). Cheap for
  training and long prefills, but decoding re-expands the whole cache every step.
- "absorbed": q_i^N . (c_kv W_UK^(i)) = (q_i^N W_UK^(i)T) . c_kv, so W_UK is folded into the query, and
  sum_j p_ij c_kv,j W_UV^(i) = (sum_j p_ij c_kv,j) W_UV^(i), so W_UV is applied after attention. What is left is
  MQA in the latent space: one key [c_kv, k_rope] of dim r_kv + d_R and one value c_kv of dim r_kv shared by
  all heads; decoding reads r_kv + d_R numbers per cached token and never materialises per-head K/V.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.rotary import RotaryEmbedding
from ..reference import softmax_attention
from ..registry import REGISTRY
from ..validate import check_choice, check_positive_int, check_same, check_scale, check_tensor
from .cache import CompactLayer, LayerCache
from .formulas import MLADims
from .mha import standard_attention

FORMS = ("absorbed", "expanded")
OPTIONS = {"w_uk": None, "w_uv": None, "causal": False, "scale": None, "form": "absorbed"}


def _check_mla(q, c_kv, k_rope, w_uk, w_uv, scale, form) -> tuple[int, int]:
    """Validate the functional inputs; return (d_nope, d_rope)."""
    check_tensor("q", q, ndim=4, layout="[B, T, H, d_N + d_R]")
    check_tensor("c_kv", c_kv, ndim=3, layout="[B, S, r_kv]")
    check_tensor("k_rope", k_rope, ndim=3, layout="[B, S, d_R]")
    check_tensor("w_uk", w_uk, ndim=3, layout="[r_kv, H, d_N]")
    check_tensor("w_uv", w_uv, ndim=3, layout="[r_kv, H, d_v]")
    for name, t in (("c_kv", c_kv), ("k_rope", k_rope), ("w_uk", w_uk), ("w_uv", w_uv)):
        check_same("q", q, name, t)
    B, T, H, Dq = q.shape
    r_kv, d_rope = c_kv.shape[2], k_rope.shape[2]
    if c_kv.shape[0] != B or k_rope.shape[:2] != c_kv.shape[:2]:
        raise ValueError(f"c_kv [B, S, r_kv] and k_rope [B, S, d_R] must share B={B} and S, got c_kv "
                         f"{tuple(c_kv.shape)}, k_rope {tuple(k_rope.shape)}")
    if w_uk.shape[:2] != (r_kv, H) or w_uv.shape[:2] != (r_kv, H):
        raise ValueError(f"w_uk [r_kv, H, d_N] and w_uv [r_kv, H, d_v] need r_kv={r_kv}, H={H}, got w_uk "
                         f"{tuple(w_uk.shape)}, w_uv {tuple(w_uv.shape)}")
    if w_uk.shape[2] + d_rope != Dq:
        raise ValueError(f"q must have head dim d_N + d_R = {w_uk.shape[2]} + {d_rope}, got {Dq}")
    check_scale(scale)
    check_choice("form", form, FORMS)
    return w_uk.shape[2], d_rope


def expand_kv(c_kv, k_rope, w_uk, w_uv) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 30-31: K = [c_kv W_UK, k_rope (x) 1_h] `[B, S, H, d_N + d_R]`, V = c_kv W_UV `[B, S, H, d_v]`."""
    H = w_uk.shape[1]
    k_nope = torch.einsum("bsr,rhn->bshn", c_kv, w_uk)
    k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)
    return k, torch.einsum("bsr,rhv->bshv", c_kv, w_uv)


def absorbed_attention(q, kv_latent, w_uk, w_uv, *, causal=False, scale=None, core=standard_attention) -> torch.Tensor:
    """Attention in the latent space. kv_latent `[B, S, r_kv + d_R]` is [c_kv, k_rope] side by side (the
    layer's cache stores it that way, so decoding slices instead of concatenating). `core` is the exact
    softmax attention run on the latent MQA problem (head dim r_kv + d_R, value dim r_kv)."""
    d_nope, r_kv = w_uk.shape[2], w_uk.shape[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # W_UK folded into the query: q_i^N W_UK^(i)T, [B, T, H, r_kv]
    q_latent = torch.cat([torch.einsum("bthn,rhn->bthr", q[..., :d_nope], w_uk), q[..., d_nope:]], dim=-1)
    kv = kv_latent[:, :, None, :]  # one KV "head" shared by all query heads
    o_latent = core(q_latent, kv, kv[..., :r_kv], causal=causal, scale=scale)
    return torch.einsum("bthr,rhv->bthv", o_latent, w_uv)  # W_UV applied after attention


def mla_attention(q, c_kv, k_rope, w_uk=None, w_uv=None, *, causal=False, scale=None, form="absorbed"):
    """MLA attention from the cached latents.

    q: `[B, T, H, d_N + d_R]` (NoPE part first, RoPE part already rotated), c_kv: `[B, S, r_kv]`, k_rope:
    `[B, S, d_R]` (rotated), w_uk: `[r_kv, H, d_N]` (W_UK), w_uv: `[r_kv, H, d_v]` (W_UV). scale defaults
    to (d_N + d_R) ** -0.5. Returns o `[B, T, H, d_v]`. form "absorbed" (default) attends in the latent
    space, time O(T S H (r_kv + d_R)); "expanded" materialises per-head K/V, O(S r_kv H d + T S H d).
    """
    if w_uk is None or w_uv is None:
        raise TypeError("mla_attention needs the up-projections w_uk [r_kv, H, d_N] and w_uv [r_kv, H, d_v]")
    _check_mla(q, c_kv, k_rope, w_uk, w_uv, scale, form)
    if form == "expanded":
        k, v = expand_kv(c_kv, k_rope, w_uk, w_uv)
        return standard_attention(q, k, v, causal=causal, scale=scale)
    return absorbed_attention(q, torch.cat([c_kv, k_rope], dim=-1), w_uk, w_uv, causal=causal, scale=scale)


def mla_attention_reference(q, c_kv, k_rope, w_uk, w_uv, *, causal=False, scale=None, **_ignored):
    """Eqs. 30-31 literally: expand the latents to per-head K, V, then softmax attention (float64 truth)."""
    k, v = expand_kv(c_kv, k_rope, w_uk, w_uv)
    return softmax_attention(q, k, v, causal=causal, scale=scale)


class MLA(CompactLayer):
    """The MLA layer (Eqs. 27-31): q = [c_q W_UQ^N, RoPE(c_q W_UQ^R)] with c_q = x W_DQ; [c_kv, k_rope] =
    [x W_DKV, RoPE(x W_KR)] (one matrix, as DeepSeek-V2's code fuses them); W_UK, W_UV; output W_O.
    Parameters Dm (r_q + r_kv + d_R + h d_v) + r_q h (d_N + d_R) + r_kv h (d_N + d_v) (Table 3; DeepSeek-V2
    also RMS-normalises c_q and c_kv, whose r_q + r_kv gains the table and this layer leave out)."""

    def __init__(self, d_model: int, heads: int, dims: MLADims, *, rope_base: float = 10000.0, causal: bool = True,
                 core: str = "standard", dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.core = REGISTRY.get(core).name  # exact softmax method for the absorbed (latent MQA) attention
        for name in ("q_rank", "kv_rank", "d_nope", "d_rope", "d_v"):
            check_positive_int(f"dims.{name}", getattr(dims, name))
        check_positive_int("d_model", d_model)
        check_positive_int("heads", heads)
        if dims.d_rope % 2:
            raise ValueError(f"dims.d_rope must be even (rotary rotates pairs of channels), got {dims.d_rope}")
        self.d_model, self.heads, self.dims, self.causal = d_model, heads, dims, causal
        kw = dict(bias=False, dtype=dtype, device=device)
        self.w_dq = nn.Linear(d_model, dims.q_rank, **kw)
        self.w_uq = nn.Linear(dims.q_rank, heads * (dims.d_nope + dims.d_rope), **kw)
        self.w_dkv = nn.Linear(d_model, dims.kv_rank + dims.d_rope, **kw)  # [W_DKV | W_KR]
        self.w_uk = nn.Parameter(torch.empty(dims.kv_rank, heads, dims.d_nope, dtype=dtype, device=device))
        self.w_uv = nn.Parameter(torch.empty(dims.kv_rank, heads, dims.d_v, dtype=dtype, device=device))
        self.wo = nn.Linear(heads * dims.d_v, d_model, **kw)
        bound = (3 / dims.kv_rank) ** 0.5  # variance 1 / r_kv: unit-variance per-head keys and values
        nn.init.uniform_(self.w_uk, -bound, bound)
        nn.init.uniform_(self.w_uv, -bound, bound)
        self.rope = RotaryEmbedding(dims.d_rope, rope_base)
        self.fields = {"kv_latent": (dims.kv_rank + dims.d_rope,)}

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, *, form: str | None = None,
                reference: bool = False) -> torch.Tensor:
        """x `[B, T, d_model]` -> `[B, T, d_model]`. form: "absorbed" or "expanded"; default absorbed when
        decoding from a cache, expanded otherwise. `reference=True` uses `mla_attention_reference`."""
        offset = self._check(x, cache)
        form = ("absorbed" if cache is not None else "expanded") if form is None else form
        check_choice("form", form, FORMS)
        B, T, _ = x.shape
        d = self.dims
        q = self.w_uq(self.w_dq(x)).view(B, T, self.heads, d.d_nope + d.d_rope)
        q = torch.cat([q[..., :d.d_nope], self.rope(q[..., d.d_nope:], offset)], dim=-1)
        kv = self.w_dkv(x)
        k_rope = self.rope(kv[:, :, None, d.kv_rank:], offset)[:, :, 0]
        kv = torch.cat([kv[..., :d.kv_rank], k_rope], dim=-1)  # [c_kv, k_rope]: all the cache holds
        if cache is not None:
            kv = cache.append(kv_latent=kv)["kv_latent"]
        c_kv, k_rope = kv[..., :d.kv_rank], kv[..., d.kv_rank:]
        if reference:
            o = mla_attention_reference(q, c_kv, k_rope, self.w_uk, self.w_uv, causal=self.causal)
        elif form == "absorbed":
            o = absorbed_attention(q, kv, self.w_uk, self.w_uv, causal=self.causal, core=REGISTRY.get(self.core).fn)
        else:
            k, v = expand_kv(c_kv, k_rope, self.w_uk, self.w_uv)
            o = REGISTRY.get(self.core).fn(q, k, v, causal=self.causal)
        return self.wo(o.reshape(B, T, self.heads * d.d_v))


def _register() -> None:
    from dataclasses import replace

    from ..inputs import randn
    from ..registry import Complexity, Method, Shape, register
    from .formulas import PARAMS, mla_dims, state_or_cache

    def make_inputs(shape: Shape, dtype, device, generator, **options) -> dict:
        shape = replace(shape, kv_heads=None)
        d = mla_dims(shape)
        B, T, S, H = shape.batch, shape.seq_q, shape.S, shape.heads
        return {"q": randn((B, T, H, d.d_nope + d.d_rope), dtype, device, generator),
                "c_kv": randn((B, S, d.kv_rank), dtype, device, generator),
                "k_rope": randn((B, S, d.d_rope), dtype, device, generator),
                # std r_kv^-1/2 gives unit-variance per-head keys and values
                "w_uk": randn((d.kv_rank, H, d.d_nope), dtype, device, generator, std=d.kv_rank ** -0.5),
                "w_uv": randn((d.kv_rank, H, d.d_v), dtype, device, generator, std=d.kv_rank ** -0.5),
                "causal": True, **options}

    register(Method(
        name="mla", family="compact", cite="Liu et al. 2024, DeepSeek-V2 (survey Table 3, MLA; Eqs. 27-31)",
        fn=mla_attention, reference=mla_attention_reference, make_inputs=make_inputs,
        complexity=Complexity("O(N^2 h (r_kv + d_R))", "O(N^2)", 2.0, 2.0),
        state_or_cache=state_or_cache("mla"), params=PARAMS["mla"], forms=FORMS, options=OPTIONS,
        supports=frozenset({"causal", "noncausal", "backward", "decode"}),
        grad_inputs=("q", "c_kv", "k_rope", "w_uk", "w_uv"),
        description="low-rank latent c_kv + decoupled RoPE key cached; W_UK/W_UV absorbed for decoding"))


_register()
