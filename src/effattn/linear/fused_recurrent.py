"""Fused recurrent Triton kernel for decoding: the gated recurrence token by token, state in and out.

One program per (value block, sequence, head) keeps its `[Dk, BV]` slice of the state in registers for the
whole sequence, so a decoding step (T = 1) reads the state once and writes it once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import cdiv, next_pow2
from .engine import validate_linear


@triton.jit
def _fused_recurrent(q, k, v, g, beta, o, h0, ht, cu, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
                     HAS_BETA: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr):
    i_v, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = tl.load(cu + i_s), tl.load(cu + i_s + 1)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    p_kv = (i_h * K + ok[:, None]) * V + ov[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_s * H * K * V + p_kv, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        if GATE == 1:
            b_h *= tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        elif GATE == 2:
            b_h *= tl.exp(tl.load(g + (t * H + i_h) * K + ok, mask=mk, other=0.0).to(tl.float32))[:, None]
        if DELTA:  # v_t - k_t (G_t S_{t-1}): the prediction error the delta rule writes
            b_v -= tl.sum(b_k[:, None] * b_h, 0)
        if HAS_BETA:
            b_v *= tl.load(beta + t * H + i_h).to(tl.float32)
        b_h += b_k[:, None] * b_v[None, :]
        tl.store(o + (t * H + i_h) * V + ov, (tl.sum(b_q[:, None] * b_h, 0) * scale).to(o.dtype.element_ty),
                 mask=mv)
    if STORE_HT:
        tl.store(ht + i_s * H * K * V + p_kv, b_h.to(ht.dtype.element_ty), mask=mk[:, None] & mv[None, :])


def fused_recurrent_gated_linear_attn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None,
                                      output_final_state=False, cu_seqlens=None, delta_rule=False):
    """Token-by-token gated recurrence in one Triton kernel, for decoding (inference: no autograd).

    Same arguments and returns as `chunk_gated_linear_attn`: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`,
    g `[B, T, H]` or `[B, T, H, Dk]`, beta `[B, T, H]`, initial_state `[N, H, Dk, Dv]`; returns o (and the
    final state `[N, H, Dk, Dv]`, float32). Time O(T Dk Dv), state O(Dk Dv) per head.
    """
    num_seqs = validate_linear(q, k, v, g, beta, scale, initial_state, cu_seqlens, delta_rule=delta_rule)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)):
        raise ValueError("fused_recurrent_gated_linear_attn is for decoding and has no backward; inputs require "
                         "grad: use chunk_gated_linear_attn for training (or call under torch.no_grad())")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    cu = (torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device) if cu_seqlens is None
          else cu_seqlens)
    o = empty_output((B, T, H, V), q.dtype, q.device)
    ht = empty_output((num_seqs, H, K, V), torch.float32, q.device) if output_final_state else None
    BV = min(32, max(16, next_pow2(V)))
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    _fused_recurrent[(cdiv(V, BV), num_seqs, H)](
        c(q), c(k), c(v), c(g), c(beta), o, c(initial_state), ht, cu, scale, H=H, K=K, V=V,
        BK=max(16, next_pow2(K)), BV=BV, GATE=0 if g is None else g.dim() - 2, DELTA=delta_rule,
        HAS_BETA=beta is not None, USE_H0=initial_state is not None, STORE_HT=output_final_state)
    return (o, ht) if output_final_state else o
