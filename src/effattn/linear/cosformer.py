"""cosFormer (Qin et al., 2022, "cosFormer: Rethinking Softmax in Attention"). Not a row of the survey's tables;
it is the survey's kernelised linear attention (Sec. 7.1 and 7.4, Eqs. 58-59) with a ReLU feature map and a
position re-weighting.

    o_i = sum_j ReLU(q_i) . ReLU(k_j) cos(pi/2 (i - j) / M) v_j  /  sum_j ReLU(q_i) . ReLU(k_j) cos(pi/2 (i - j) / M)

over j <= i (causal) or all j (non-causal), M >= the sequence length (the paper's re-weighting). With
cos(a - b) = cos a cos b + sin a sin b the re-weighting splits into two linear attentions, one on the features
ReLU(x) cos(w i), one on ReLU(x) sin(w i), w = pi / (2M); concatenating them gives one linear
attention with 2D features, which the causal form runs on the engine (v with a column of ones carries the
normaliser). `max_len` is M (default: the length of the call, the paper's choice for a whole sequence; pass a
fixed one for decoding).

The state is kept relative to the last token read, R = sum_j e^{i w (last - j)} ReLU(k_j) [v_j, 1]
(real part, then imaginary part: `[B, H, 2D, Dv + 1]`), so a call needs no absolute position: the next call's
tokens at local positions t see R rotated by w (t + 1). The engine works in the call's absolute frame,
H = sum_j e^{-i w j} ReLU(k_j) [v_j, 1] = e^{i w} R for tokens before the call (j < 0), which is where the two
states are converted.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from ..reference import linear_recurrent
from ..validate import check_choice, check_positive_int, check_qkv
from .engine import chunk_gated_linear_attn
from .feature_maps import normalized_linear_attn

FORMS = ("chunk", "recurrent")


def _angles(T: int, max_len: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(T, device=like.device, dtype=like.dtype) * (math.pi / (2 * max_len))  # w i


def _rotate(state: torch.Tensor, angle: float) -> torch.Tensor:
    """e^{i angle} (re + i im) for a state `[..., 2D, V]` stacked as (re, im) along the feature axis."""
    re, im = state.chunk(2, dim=-2)
    c, s = math.cos(angle), math.sin(angle)
    return torch.cat([c * re - s * im, s * re + c * im], dim=-2)


def _conj(state: torch.Tensor) -> torch.Tensor:
    re, im = state.chunk(2, dim=-2)
    return torch.cat([re, -im], dim=-2)


def _check(q, k, v, causal, max_len, initial_state, form):
    _, T, _, H, Hkv, _, _ = check_qkv(q, k, v, same_length=True)
    check_choice("form", form, FORMS)
    check_choice("causal", causal, (True, False))
    if Hkv != H:
        raise ValueError(f"cosformer needs as many key heads as query heads, got H={H}, Hkv={Hkv}")
    if max_len is not None:
        check_positive_int("max_len", max_len)
        if not causal and max_len < T:
            raise ValueError(f"max_len must be >= the sequence length T={T} (cos weights stay >= 0), got {max_len}")
    if not causal and initial_state is not None:
        raise ValueError("initial_state is for causal cosformer (a state carried between calls); got causal=False")


def cosformer(q, k, v, *, causal=True, max_len=None, eps=1e-6, form="chunk", initial_state=None,
              output_final_state=False, chunk_size=64):
    """cosFormer attention. q, k: `[B, T, H, D]`, v: `[B, T, H, Dv]`; max_len M (default T); initial_state
    `[B, H, 2D, Dv + 1]` (causal only; see the module docstring). Returns o `[B, T, H, Dv]` (and, causal, the
    final state with `output_final_state`). Time O(T D Dv), state O(D Dv) per head. `form` (causal): "chunk" (the
    engine's Triton kernels, chunk length `chunk_size`) or "recurrent". Tokens further apart than M get
    negative weights: keep M >= the span a query sees."""
    _check(q, k, v, causal, max_len, initial_state, form)
    T = q.shape[1]
    M = T if max_len is None else max_len
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ang = _angles(T, M, torch.empty(0, dtype=acc, device=q.device)).view(1, T, 1, 1)

    def features(x):
        r = torch.relu(x.to(acc))
        return torch.cat([r * torch.cos(ang), r * torch.sin(ang)], dim=-1)

    fq, fk = features(q), features(k)
    if not causal:  # two non-causal linear attentions: phi(q) (phi(K)^T [V, 1])
        va = torch.cat([v.to(acc), v.new_ones(*v.shape[:-1], 1, dtype=acc)], dim=-1)
        o = torch.einsum("bthm,bhmv->bthv", fq, torch.einsum("bshm,bshv->bhmv", fk, va))
        return (o[..., :-1] / (o[..., -1:] + eps)).to(q.dtype)
    w = math.pi / (2 * M)
    h0 = None if initial_state is None else _conj(_rotate(initial_state.to(acc), w))
    form_fn = partial(chunk_gated_linear_attn, chunk_size=chunk_size) if form == "chunk" else linear_recurrent
    o, h = normalized_linear_attn(fq.to(q.dtype), fk.to(q.dtype), v, form_fn, scale=1.0, normalize=True, eps=eps,
                                  initial_state=h0, output_final_state=True)
    if not output_final_state:
        return o
    return o, _rotate(_conj(h), w * (T - 1))  # R = e^{i w (T - 1)} conj-stacked H


def cosformer_reference(q, k, v, *, causal=True, max_len=None, eps=1e-6, initial_state=None,
                        output_final_state=False, **_ignored):
    """The paper's quadratic form: every pair's weight ReLU(q_i) . ReLU(k_j) cos(pi/2 (i - j) / M), plus, with
    a state R from earlier tokens, ReLU(q_i) Re(e^{i w (i + 1)} R); in the inputs' dtype."""
    T = q.shape[1]
    M = T if max_len is None else max_len
    w = math.pi / (2 * M)
    pos = torch.arange(T, dtype=q.dtype, device=q.device)
    weight = torch.cos(w * (pos[:, None] - pos[None, :]))  # [T(i), T(j)]
    if causal:
        weight = weight.tril()
    rq, rk = torch.relu(q), torch.relu(k)
    scores = torch.einsum("bihd,bjhd->bhij", rq, rk) * weight
    va = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    o = torch.einsum("bhij,bjhv->bihv", scores, va)
    if initial_state is not None:
        re, im = initial_state.to(q.dtype).chunk(2, dim=-2)  # [B, H, D, Dv + 1]
        ca, sa = torch.cos(w * (pos + 1)).view(1, T, 1, 1), torch.sin(w * (pos + 1)).view(1, T, 1, 1)
        o = o + ca * torch.einsum("bihd,bhdv->bihv", rq, re) - sa * torch.einsum("bihd,bhdv->bihv", rq, im)
    out = o[..., :-1] / (o[..., -1:] + eps)
    if not (causal and output_final_state):
        return out
    # R_T = sum_j e^{i w (T - 1 - j)} ReLU(k_j) [v_j, 1] + e^{i w T} R_0
    lag = w * (T - 1 - pos).view(1, T, 1, 1)
    re = torch.einsum("bjhd,bjhv->bhdv", rk * torch.cos(lag), va)
    im = torch.einsum("bjhd,bjhv->bhdv", rk * torch.sin(lag), va)
    if initial_state is not None:
        r0, i0 = initial_state.to(q.dtype).chunk(2, dim=-2)
        c, s = math.cos(w * T), math.sin(w * T)
        re, im = re + c * r0 - s * i0, im + s * r0 + c * i0
    return out, torch.cat([re, im], dim=-2)


def cosformer_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """q, k, v with one key head per query head; a state from earlier tokens (positive normaliser column, as a
    real one is a sum of non-negative weights); a fixed max_len = 2048, so decoding agrees with one call and
    layers built from this record (which inherit it) keep non-negative weights over long contexts."""
    from dataclasses import replace

    from ..inputs import linear_inputs

    shape = replace(shape, kv_heads=None)
    out = linear_inputs(shape, dtype, device, generator, initial_state=False, **options)
    if initial_state:
        B, H, D, Dv = shape.batch, shape.heads, shape.head_dim, shape.Dv
        state = torch.randn((B, H, 2 * D, Dv + 1), generator=generator).abs() * 0.5
        out["initial_state"] = state.to(device)
    out.setdefault("max_len", 2048)
    return out


def _register() -> None:
    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="cosformer", family="linear",
        cite="Qin et al. 2022, cosFormer (survey Sec. 7.1/7.4 feature map phi, Eqs. 58-59; ReLU features)",
        fn=cosformer, reference=cosformer_reference,
        make_inputs=partial(cosformer_inputs, output_final_state=True),
        complexity=Complexity("O(N d^2)", "O(N d)", 1.0, 1.0),
        state_or_cache=StateOrCache("H 2d (d + 1)", False, lambda s: s.heads * 2 * s.head_dim * (s.Dv + 1)),
        forms=FORMS, options={"causal": True, "max_len": None, "eps": 1e-6, "form": "chunk", "initial_state": None,
                              "output_final_state": False, "chunk_size": 64},
        supports=frozenset({"causal", "noncausal", "backward", "decode", "state"}),
        grad_inputs=("q", "k", "v", "initial_state"),
        description="ReLU features re-weighted by cos(pi/2 (i-j)/M), split into cos and sin linear attentions"))


_register()
