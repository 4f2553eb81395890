"""Standard softmax attention and its head configurations MHA / GQA / MQA (survey Table 3).

`standard_attention` is what a user writes in plain PyTorch, `softmax(Q K^T * scale + M) V` with the full
`[B, H, T, S]` score matrix materialised: the quadratic baseline every method is compared with. MHA
(Vaswani et al., 2017), GQA (Ainslie et al., 2023) and MQA (Shazeer, 2019) are the same computation with
H, H/g or 1 key/value heads; keys and values are shared inside a group without being repeated in memory.
"""
from __future__ import annotations

import math

import torch

from ..reference.softmax import visibility
from ..validate import check_qkv, check_scale, check_softcap, normalize_window

OPTIONS = {"causal": False, "scale": None, "mask": None, "window": None, "softcap": None, "return_lse": False}


def standard_attention(q, k, v, *, causal=False, scale=None, mask=None, window=None, softcap=None,
                       return_lse=False):
    """Materialised softmax attention.

    q: `[B, T, H, D]`, k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]` with H % Hkv == 0. Causal alignment is
    bottom-right when T != S. Returns o `[B, T, H, Dv]` (and LSE `[B, H, T]` in float32, float64 for float64 inputs, with
    `return_lse`). Time O(N^2 d), memory O(N^2).
    """
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v)
    check_scale(scale)
    check_softcap(softcap)
    window = normalize_window(window, causal)
    scale = D ** -0.5 if scale is None else scale
    g = H // Hkv
    # Query heads of one group attend to the same K/V head: fold the group into the query length.
    qg = q.view(B, T, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, D)
    stat = torch.promote_types(q.dtype, torch.float32)  # softmax statistics in >= float32
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).to(stat) * scale  # [B, Hkv, g*T, S]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = visibility(B, H, T, S, causal=causal, window=window, mask=mask, device=q.device)
    scores = scores.view(B, Hkv, g, T, S).masked_fill(~keep.view(B, Hkv, g, T, S), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g, T]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0).to(v.dtype).view(B, Hkv, g * T, S)
    o = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, Hkv, g*T, Dv]
    o = o.view(B, Hkv, g, T, Dv).permute(0, 3, 1, 2, 4).reshape(B, T, H, Dv)
    return (o, lse.view(B, H, T)) if return_lse else o


def _register() -> None:
    from functools import partial

    from ..inputs import softmax_inputs
    from ..reference import softmax_attention
    from ..registry import KV_CACHE, Complexity, Method, Shape, register
    from .formulas import PARAMS, gqa_kv_heads, state_or_cache

    quadratic = Complexity("O(N^2 d)", "O(N^2)", 2.0, 2.0)
    common = dict(fn=standard_attention, reference=softmax_attention, options=OPTIONS, complexity=quadratic,
                  supports=frozenset({"causal", "noncausal", "backward", "gqa", "decode"}))

    def heads(kv_heads):
        def make(shape: Shape, dtype, device, generator, **options):
            from dataclasses import replace
            return softmax_inputs(replace(shape, kv_heads=kv_heads(shape)), dtype, device, generator,
                                  **{"causal": True, **options})
        return make

    register(Method(
        name="standard", family="baseline", cite="Vaswani et al. 2017 (survey Sec. 2, Eq. 1)",
        make_inputs=partial(softmax_inputs, causal=True),
        state_or_cache=KV_CACHE,
        description="plain PyTorch softmax(QK^T)V, N x N scores materialised", **common))
    register(Method(
        name="mha", family="compact", cite="Vaswani et al. 2017 (survey Table 3, MHA)",
        make_inputs=heads(lambda s: s.heads), state_or_cache=state_or_cache("mha"), params=PARAMS["mha"],
        description="multi-head attention: one K/V head per query head", **common))
    register(Method(
        name="gqa", family="compact", cite="Ainslie et al. 2023 (survey Table 3, GQA)",
        make_inputs=heads(gqa_kv_heads), state_or_cache=state_or_cache("gqa"), params=PARAMS["gqa"],
        description="grouped-query attention: hkv K/V heads shared by groups of query heads", **common))
    register(Method(
        name="mqa", family="compact", cite="Shazeer 2019 (survey Table 3, MQA)",
        make_inputs=heads(lambda s: 1), state_or_cache=state_or_cache("mqa"), params=PARAMS["mqa"],
        description="multi-query attention: one K/V head shared by all query heads", **common))

_register()
