"""Differential attention (Ye et al. 2024, Diff Transformer; survey Sec. 3.3).

Q and K of each head are split into halves [Q1; Q2], [K1; K2] of width d:
    A = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V
    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init,
    lambda_init = 0.8 - 0.6 exp(-0.3 (layer - 1))
then each head is normalised (RMS over its channels, the paper's GroupNorm with one group per head)
and scaled by (1 - lambda_init). The fast path runs the flash kernel twice (one per softmax map).
"""
from __future__ import annotations

import math

import torch

from ..hardware.flash import flash_attention
from ..validate import check_positive_int, check_qkv, check_scale, check_tensor


def lambda_init_for(layer: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def _lambda(lq1, lk1, lq2, lk2, lambda_init):
    return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lambda_init


def _head_norm(o, lambda_init, eps):
    o32 = o.to(torch.promote_types(o.dtype, torch.float32))
    return (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps) * (1 - lambda_init)).to(o.dtype)


def _check(q, k, v, lambdas, layer, scale):
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v)
    check_scale(scale)
    check_positive_int("layer", layer)
    if D % 2:
        raise ValueError(f"differential attention splits q and k in halves: head dim D={D} must be even")
    for name, t in lambdas.items():
        check_tensor(name, t, ndim=1, layout="[D / 2]")
        if t.shape[0] != D // 2:
            raise ValueError(f"{name} must have shape [D / 2] = [{D // 2}], got {tuple(t.shape)}")
    return D // 2


def differential_attention(q, k, v, lambda_q1, lambda_k1, lambda_q2, lambda_k2, *, layer=1, causal=True,
                           scale=None, eps=1e-5):
    """q `[B, T, H, 2d]`, k `[B, S, Hkv, 2d]`, v `[B, S, Hkv, Dv]`, lambda_* `[d]` -> o `[B, T, H, Dv]`.
    `scale` defaults to d ** -0.5. Time 2x that of softmax attention, O(N^2 d)."""
    d = _check(q, k, v, dict(lambda_q1=lambda_q1, lambda_k1=lambda_k1, lambda_q2=lambda_q2, lambda_k2=lambda_k2),
               layer, scale)
    scale = d ** -0.5 if scale is None else scale
    a1 = flash_attention(q[..., :d].contiguous(), k[..., :d].contiguous(), v, causal=causal, scale=scale)
    a2 = flash_attention(q[..., d:].contiguous(), k[..., d:].contiguous(), v, causal=causal, scale=scale)
    lam = _lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init_for(layer)).to(a1.dtype)
    return _head_norm(a1 - lam * a2, lambda_init_for(layer), eps)


def differential_reference(q, k, v, lambda_q1, lambda_k1, lambda_q2, lambda_k2, *, layer=1, causal=True,
                           scale=None, eps=1e-5, **_ignored):
    """The two softmax maps materialised and subtracted, as in the paper's Eq. (1)."""
    B, T, H, D = q.shape
    S, d = k.shape[1], D // 2
    scale = d ** -0.5 if scale is None else scale
    kh, vh = (x.repeat_interleave(H // k.shape[2], dim=2) for x in (k, v))
    keep = torch.arange(S, device=q.device).view(1, S) <= torch.arange(T, device=q.device).view(T, 1) + S - T
    maps = []
    for half in (slice(0, d), slice(d, D)):
        s = torch.einsum("bthd,bshd->bhts", q[..., half], kh[..., half]) * scale
        if causal:
            s = s.masked_fill(~keep, -math.inf)
        maps.append(torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), -1).nan_to_num(0.0).to(q.dtype))
    lam = _lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init_for(layer))
    o = torch.einsum("bhts,bshd->bthd", maps[0] - lam * maps[1], vh)
    return _head_norm(o, lambda_init_for(layer), eps)


def differential_inputs(shape, dtype, device, generator, **options):
    from dataclasses import replace

    from ..inputs import randn, softmax_inputs

    if shape.head_dim < 64:
        shape = replace(shape, head_dim=64)  # two halves of 32, a head dim the flash kernel takes
    out = softmax_inputs(shape, dtype, device, generator, **options)
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):  # the paper initialises N(0, 0.1)
        out[name] = randn((shape.head_dim // 2,), dtype, device, generator, std=0.1)
    return out


def _register() -> None:
    from ..registry import KV_CACHE, Complexity, Method, register

    register(Method(
        name="differential", family="sparse", cite="Ye et al. 2024 (Diff Transformer; survey Sec. 3.3)",
        fn=differential_attention, reference=differential_reference, make_inputs=differential_inputs,
        complexity=Complexity("O(N^2 d)", "O(N)", 2.0, 1.0),
        state_or_cache=KV_CACHE,
        options={"lambda_q1": None, "lambda_k1": None, "lambda_q2": None, "lambda_k2": None, "layer": 1,
                 "causal": True, "scale": None, "eps": 1e-5},
        supports=frozenset({"causal", "noncausal", "backward", "gqa"}),
        grad_inputs=("q", "k", "v", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"),
        approximates_softmax=True,
        description="difference of two softmax maps with re-parameterised lambda, per-head RMS norm"))


_register()
