"""Quantized attention (survey Sec. 3, Table 2 prefill rows with a quantiser): SageAttention (Zhang et al.
2024/2025: INT8 Q K^T with K smoothing, FP8 P V) and FlashAttention-3's FP8 forward (Shah et al. 2024).

Forward only: these are inference methods. Each method's reference is the float64 computation of exactly
the quantised algorithm (the same quantisers, then exact attention on the dequantised values; with FP8
P V also the tile-wise FP8 rounding of P), so a kernel is held to the 2x rule against it; the end-to-end
error against exact attention is a property of the quantisation, measured in tests/hardware/test_quant.py
and benchmarks/quant.py. SageAttention3's FP4 needs Blackwell: only its quantiser and an emulation exist
(effattn.hardware.quant_fp4.sage3_fp4_emulation), no kernel.
"""
from __future__ import annotations

import torch

from .._triton_mode import require_triton
from ..reference.softmax import softmax_attention, visibility
from ..validate import check_choice, check_qkv, check_scale
from .quant_fwd import quant_fwd
from .quant_prep import quantize_qk, quantize_v
from .quantize import (FP8, FP8_MAX, P_TILE, dequantize, dequantize_v_fp8, hadamard, quantize_fp8,
                       quantize_int8, quantize_v_fp8, smooth_k as smooth_keys)

# (query tokens, key tokens) per scale. SageAttention2's per-thread groups follow the MMA register layout,
# which Triton does not expose; "thread" here is the finest grouping, one scale per token.
GRANULARITY = {"block": (128, 64), "warp": (16, 64), "thread": (1, 1)}
FP8_GRANULARITY = {"head": (None, None), "block": (128, 64)}
HEAD_DIMS = (16, 32, 64, 128)  # powers of 2, as the Hadamard rotation needs
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _quantise(q, k, v, *, qk_dtype, pv_dtype, smooth, groups, v_per_head=False, rotation=None, fused=False):
    """The quantisation rule shared by kernel and reference: (q codes, q scale, k codes, k scale, v or V
    codes, V scale or None). fused: the one-pass Triton quantisers (bit-identical) where they apply."""
    if rotation is not None:
        q, k = q.to(torch.float32) @ rotation, k.to(torch.float32) @ rotation
    if fused:
        fp8 = qk_dtype == "fp8"
        qc, sq = quantize_qk(q, groups[0], fp8=fp8, smooth=False)
        kc, sk = quantize_qk(k, groups[1], fp8=fp8, smooth=smooth)
    else:
        quant = quantize_int8 if qk_dtype == "int8" else quantize_fp8
        qc, sq = quant(q, groups[0])
        kc, sk = quant(smooth_keys(k) if smooth else k, groups[1])
    if pv_dtype == "fp8":
        vc, sv = quantize_v(v, v_per_head) if fused else quantize_v_fp8(v, per_head=v_per_head)
        return qc, sq, kc, sk, vc, sv
    return qc, sq, kc, sk, v if v.stride(-1) == 1 else v.contiguous(), None  # the kernel assumes unit stride


def _forward(codes, causal, scale, out_dtype, k_group):
    qc, sq, kc, sk, vc, sv = codes
    return quant_fwd(qc, kc, vc, sq, sk, sv, softmax_scale=scale, causal=causal, out_dtype=out_dtype, k_group=k_group)


def _fp8_pv_attention(q, k, v, *, causal, scale, p_tile=P_TILE):
    """Softmax attention with P V as the FP8 kernel computes it, in q's dtype: tiles of p_tile keys, running
    row max m, and P stored as e4m3(448 * exp(s - m)) in the P V product (the row sum uses exact P). The
    rounding of P depends on the kernel's key tile through m: the interpreter's is P_TILE, the GPU tuner may
    take 128, whose result differs from this one by that rounding only."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s = s.masked_fill(~visibility(B, H, T, S, causal=causal, device=q.device), float("-inf"))
    m = torch.full((B, H, T, 1), float("-inf"), dtype=q.dtype, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, H, T, v.shape[3], dtype=q.dtype, device=q.device)
    for j in range(0, S, p_tile):
        sb = s[..., j:j + p_tile]
        m_new = torch.maximum(m, sb.amax(-1, keepdim=True))
        m_use = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp(sb - m_use)
        alpha = torch.exp(m - m_use)
        l = l * alpha + p.sum(-1, keepdim=True)
        p8 = (p * FP8_MAX).to(FP8).to(q.dtype)
        acc = acc * alpha + torch.einsum("bhts,bshd->bhtd", p8, v[:, j:j + p_tile])
        m = m_new
    o = torch.where(l > 0, acc / (FP8_MAX * torch.where(l > 0, l, torch.ones_like(l))), torch.zeros_like(acc))
    return o.transpose(1, 2)


def _attend_dequantised(codes, q, causal, scale, S, p_tile):
    qc, sq, kc, sk, vc, sv = codes
    q_hat, k_hat = dequantize(qc, sq, q.dtype), dequantize(kc, sk, q.dtype)
    if sv is None:
        return softmax_attention(q_hat, k_hat, vc.to(q.dtype), causal=causal, scale=scale)
    return _fp8_pv_attention(q_hat, k_hat, dequantize_v_fp8(vc, sv, S, q.dtype), causal=causal, scale=scale,
                             p_tile=p_tile)


def _check(name, q, k, v, causal, scale, dtypes):
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v, dtypes=dtypes)
    check_scale(scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    for what, d in (("q/k head dim D", D), ("v head dim Dv", Dv)):
        if d not in HEAD_DIMS:
            raise ValueError(f"{name}: unsupported {what}={d}; supported: {HEAD_DIMS}")
    return S, D, D ** -0.5 if scale is None else float(scale)


def _sage_codes(q, k, v, qk_dtype, pv_dtype, smooth_k, granularity, fused=False):
    check_choice("qk_dtype", qk_dtype, ("int8", "fp8"))
    check_choice("pv_dtype", pv_dtype, ("fp16", "fp8"))
    check_choice("granularity", granularity, tuple(GRANULARITY))
    if not isinstance(smooth_k, bool):
        raise TypeError(f"smooth_k must be a bool, got {type(smooth_k).__name__}")
    return _quantise(q, k, v, qk_dtype=qk_dtype, pv_dtype=pv_dtype, smooth=smooth_k,
                     groups=GRANULARITY[granularity], fused=fused)


def sage_attention(q, k, v, *, causal=False, qk_dtype="int8", pv_dtype="fp16", smooth_k=True,
                   granularity="block", scale=None):
    """SageAttention forward: quantized Q K^T (INT8, or FP8) with K smoothing, P V in 16 bits or FP8.

    q: `[B, T, H, D]`, k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]` (H % Hkv == 0), fp16/bf16/fp32 on CUDA (or
    CPU under TRITON_INTERPRET=1), D and Dv in 16/32/64/128. granularity: one Q/K scale per 128/64 tokens
    ("block", SageAttention), per 16 query tokens ("warp", SageAttention2) or per token ("thread").
    smooth_k subtracts the per-channel mean of K over tokens (softmax-invariant). pv_dtype "fp16": P in V's
    dtype (fp32 inputs stay fp32), fp32 accumulation; "fp8": P and V in e4m3, V scaled per channel
    (SageAttention2). causal is bottom-right aligned. Returns o `[B, T, H, Dv]` in q's dtype. Forward only;
    time O(N^2 d), memory O(N d).
    """
    S, D, scale = _check("sage_attention", q, k, v, causal, scale, DTYPES)
    require_triton("sage_attention", q)
    with torch.no_grad():
        codes = _sage_codes(q, k, v, qk_dtype, pv_dtype, smooth_k, granularity, fused=True)
        return _forward(codes, causal, scale, q.dtype, GRANULARITY[granularity][1])


def sage_reference(q, k, v, *, causal=False, qk_dtype="int8", pv_dtype="fp16", smooth_k=True,
                   granularity="block", scale=None, p_tile=P_TILE, **_ignored):
    """Exactly sage_attention's quantised algorithm in plain PyTorch, in q's dtype (float64: ground truth).
    p_tile: the kernel's key tile, on which FP8 P's rounding depends (`_fp8_pv_attention`)."""
    S, D, scale = _check("sage_reference", q, k, v, causal, scale, DTYPES + (torch.float64,))
    codes = _sage_codes(q, k, v, qk_dtype, pv_dtype, smooth_k, granularity)
    return _attend_dequantised(codes, q, causal, scale, S, p_tile)


def _fp8_codes(q, k, v, D, granularity, rotate, seed, fused=False):
    check_choice("granularity", granularity, tuple(FP8_GRANULARITY))
    if not isinstance(rotate, bool):
        raise TypeError(f"hadamard must be a bool, got {type(rotate).__name__}")
    rotation = hadamard(D, int(seed), q.device) if rotate else None
    return _quantise(q, k, v, qk_dtype="fp8", pv_dtype="fp8", smooth=False,
                     groups=FP8_GRANULARITY[granularity], v_per_head=granularity == "head", rotation=rotation,
                     fused=fused)


def flash_fp8(q, k, v, *, causal=False, granularity="head", hadamard=False, seed=0, scale=None):
    """FlashAttention-3's FP8 forward: Q, K, V in e4m3 with per-head (or per-block: 128 query / 64 key
    tokens, V per channel) scales; hadamard=True first rotates Q and K by the same random
    orthogonal Hadamard matrix (seeded by `seed`), which leaves Q K^T unchanged and spreads outliers.

    Shapes, dtypes and return as `sage_attention`. Forward only; time O(N^2 d), memory O(N d)."""
    S, D, scale = _check("flash_fp8", q, k, v, causal, scale, DTYPES)
    require_triton("flash_fp8", q)
    with torch.no_grad():
        return _forward(_fp8_codes(q, k, v, D, granularity, hadamard, seed, fused=True), causal, scale, q.dtype,
                        FP8_GRANULARITY[granularity][1])


def flash_fp8_reference(q, k, v, *, causal=False, granularity="head", hadamard=False, seed=0, scale=None,
                        p_tile=P_TILE, **_ignored):
    """Exactly flash_fp8's quantised algorithm in plain PyTorch, in q's dtype (float64: ground truth).
    p_tile: as `sage_reference`'s."""
    S, D, scale = _check("flash_fp8_reference", q, k, v, causal, scale, DTYPES + (torch.float64,))
    return _attend_dequantised(_fp8_codes(q, k, v, D, granularity, hadamard, seed), q, causal, scale, S, p_tile)


def _register() -> None:
    from functools import partial

    from ..inputs import softmax_inputs
    from ..registry import Complexity, Method, StateOrCache, register

    kv_cache = StateOrCache("2 Hkv d (8-bit)", True, lambda s: 2 * s.Hkv * s.head_dim)
    common = dict(family="hardware", complexity=Complexity("O(N^2 d)", "O(N d)", 2.0, 1.0),
                  state_or_cache=kv_cache, supports=frozenset({"causal", "noncausal", "gqa"}), grad_inputs=(),
                  approximates_softmax=True, make_inputs=partial(softmax_inputs, causal=True))
    sage_opts = {"causal": False, "qk_dtype": "int8", "smooth_k": True, "granularity": "block", "scale": None}
    fp4 = "; SageAttention3 FP4 needs Blackwell: NVFP4 quantiser + emulation only (hardware.quant_fp4), no kernel"
    register(Method(
        name="sage_int8", cite="Zhang et al. 2024, SageAttention (survey Sec. 3, Table 2)",
        fn=partial(sage_attention, pv_dtype="fp16"), reference=partial(sage_reference, pv_dtype="fp16"),
        options={**sage_opts, "pv_dtype": "fp16"},
        description="INT8 Q K^T (per-block scales, K smoothing) + 16-bit P V, Triton forward; rel. L1 vs "
                    "exact 1.0-1.35% (H100, N=4k-64k), tests bound 2% incl. outlier keys" + fp4, **common))
    register(Method(
        name="sage_int8_fp8pv", cite="Zhang et al. 2025, SageAttention2 (survey Sec. 3, Table 2)",
        fn=partial(sage_attention, pv_dtype="fp8"), reference=partial(sage_reference, pv_dtype="fp8"),
        options={**sage_opts, "pv_dtype": "fp8"},
        description="INT8 Q K^T + FP8 e4m3 P V (V per channel), Triton forward; rel. L1 vs "
                    "exact 3.5-4.0% (H100, N=4k-64k), tests bound 5%" + fp4, **common))
    register(Method(
        name="flash_fp8", cite="Shah et al. 2024, FlashAttention-3 FP8 (survey Sec. 3, Table 2)",
        fn=flash_fp8, reference=flash_fp8_reference,
        options={"causal": False, "granularity": "head", "hadamard": False, "seed": 0, "scale": None},
        description="Q, K, V in FP8 e4m3 (per-head or per-block scales, optional random Hadamard rotation), "
                    "Triton forward; rel. L1 vs exact 4.5-5.4% (H100, N=4k-64k), tests bound 6% (10% with outlier "
                    "key channels: no smoothing)", **common))


_register()
