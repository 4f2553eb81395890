"""Fused Triton scan for RWKV-4's WKV (see rwkv4.py for the recurrence in (m, l)), forward and backward.

One program per (batch, head, block of BD channels) keeps the state (m, l) `[BD]` in float32 registers and walks
the sequence in segments of CK tokens: each segment's keys and values are loaded as one `[CK, BD]` tile (the
loads of CK steps in flight at once, since the recurrence itself leaves nothing else to overlap them with), and
the steps then take their rows out of the tiles in registers. Compiled for sm_90 on a CPU (ptxas, bf16 inputs,
one warp): forward 102 and backward 168 registers, no spills, no shuffles (each thread holds a channel's column of
the tile); not yet run or timed on a GPU.

Memory: when a gradient is needed the forward also stores the state at the start of every segment, float32
checkpoints `[B, ceil(T / CK), 2, H, D]` (8 / CK bytes per token and channel: 0.5 with CK = 16). The backward
walks the segments in reverse: it recomputes a segment's states from its checkpoint into register tiles, then
steps back through them with the adjoints (g_m, g_l) of the state, starting from the final state's gradient.
Per step, with lam = sigmoid(l - u - k), keep = sigmoid(l + w - k) and the adjoints g_m', g_l' of the next state:
    a = g_o (m - v) lam (1 - lam),   b = g_m' (m - v) keep (1 - keep)        (through lam and keep)
    g_m = g_o lam + g_m' keep,       g_v = g_o (1 - lam) + g_m' (1 - keep)
    g_l = a + b + g_l' keep,         g_k = -a - b + g_l' (1 - keep),   g_u -= a,   g_w += b + g_l' keep
(l' = logaddexp(l + w, k) has derivatives keep and 1 - keep). With the empty state, l = -inf, lam = keep = 0
and every term above is finite. dw and du are summed per program and over the batch in PyTorch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import next_pow2


@triton.jit
def _gates(m, l, kt, vt, w, u):
    """One token: the output's weight on the past (lam), the state's (keep), the output and the next state."""
    lam = tl.sigmoid(l - u - kt)
    keep = tl.sigmoid(l + w - kt)
    a = l + w  # logaddexp(a, k), finite when l = -inf
    l_next = tl.maximum(a, kt) + tl.log(1.0 + tl.exp(-tl.abs(a - kt)))
    return lam, keep, lam * m + (1.0 - lam) * vt, keep * m + (1.0 - keep) * vt, l_next


@triton.jit
def _row(X, sel):
    """Row `sel` (a one-hot `[CK, 1]` mask) of a register tile `[CK, BD]`."""
    return tl.sum(tl.where(sel, X, 0.0), axis=0)


@triton.jit
def _program(w, u, T, H, D, BD: tl.constexpr, CK: tl.constexpr):
    """This program's batch, head, channels `[BD]` (and mask), w and u `[BD]`, the offset of its state in
    `[B, H, 2, D]`, the segment's rows `[CK]`, and the offset of its token 0 in `[B, T, H, D]`."""
    b, h = tl.program_id(0), tl.program_id(1)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    md = d < D
    w_ = tl.load(w + h * D + d, mask=md, other=0.0)
    u_ = tl.load(u + h * D + d, mask=md, other=0.0)
    x0 = (b.to(tl.int64) * T * H + h) * D + d
    return b, h, d, md, w_, u_, (b * H + h) * 2 * D + d, tl.arange(0, CK), x0


@triton.jit
def _tile(x, x0, t, md, H, D, T):
    """Tokens t `[CK]` of the program's channels, float32 `[CK, BD]` (zeros past T)."""
    mask = (t < T)[:, None] & md[None, :]
    return tl.load(x + x0[None, :] + t[:, None].to(tl.int64) * H * D, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rwkv4_fwd(k, v, w, u, s0, o, sT, ck, T, H, D, NS, BD: tl.constexpr, CK: tl.constexpr,
               USE_S0: tl.constexpr, SAVE: tl.constexpr):
    b, h, d, md, w_, u_, sb, j, x0 = _program(w, u, T, H, D, BD, CK)
    if USE_S0:
        m = tl.load(s0 + sb, mask=md, other=0.0)
        l = tl.load(s0 + sb + D, mask=md, other=0.0)
    else:
        m = tl.zeros([BD], tl.float32)
        l = tl.full([BD], float("-inf"), tl.float32)
    for s in range(NS):
        t = s * CK + j
        K = _tile(k, x0, t, md, H, D, T)
        V = _tile(v, x0, t, md, H, D, T)
        if SAVE:  # ck [B, NS, 2, H, D]: the state before the segment
            cb = ((b.to(tl.int64) * NS + s) * 2 * H + h) * D + d
            tl.store(ck + cb, m, mask=md)
            tl.store(ck + cb + H * D, l, mask=md)
        for i in tl.static_range(CK):
            sel = (j == i)[:, None]
            _, _, ot, m_next, l_next = _gates(m, l, _row(K, sel), _row(V, sel), w_, u_)
            live = s * CK + i < T
            tl.store(o + x0 + tl.cast(s * CK + i, tl.int64) * H * D, ot.to(o.dtype.element_ty), mask=md & live)
            m = tl.where(live, m_next, m)
            l = tl.where(live, l_next, l)
    tl.store(sT + sb, m, mask=md)
    tl.store(sT + sb + D, l, mask=md)


@triton.jit
def _rwkv4_bwd(k, v, w, u, ck, do, dsT, dk, dv, dw, du, ds0, T, H, D, NS, BD: tl.constexpr, CK: tl.constexpr,
               USE_S0: tl.constexpr, USE_DO: tl.constexpr, USE_DST: tl.constexpr):
    b, h, d, md, w_, u_, sb, j, x0 = _program(w, u, T, H, D, BD, CK)
    if USE_DST:  # adjoints of the final (m, l)
        gm = tl.load(dsT + sb, mask=md, other=0.0)
        gl = tl.load(dsT + sb + D, mask=md, other=0.0)
    else:
        gm = tl.zeros([BD], tl.float32)
        gl = tl.zeros([BD], tl.float32)
    dw_ = tl.zeros([BD], tl.float32)
    du_ = tl.zeros([BD], tl.float32)
    for r in range(NS):
        s = NS - 1 - r
        t = s * CK + j
        K = _tile(k, x0, t, md, H, D, T)
        V = _tile(v, x0, t, md, H, D, T)
        if USE_DO:
            G = _tile(do, x0, t, md, H, D, T)
        else:
            G = tl.zeros([CK, BD], tl.float32)
        cb = ((b.to(tl.int64) * NS + s) * 2 * H + h) * D + d
        m = tl.load(ck + cb, mask=md, other=0.0)
        l = tl.load(ck + cb + H * D, mask=md, other=0.0)
        M = tl.zeros([CK, BD], tl.float32)
        L = tl.zeros([CK, BD], tl.float32)
        for i in tl.static_range(CK):  # the segment's states again (rows past T are never read back)
            sel = (j == i)[:, None]
            M = tl.where(sel, m[None, :], M)
            L = tl.where(sel, l[None, :], L)
            _, _, _, m, l = _gates(m, l, _row(K, sel), _row(V, sel), w_, u_)
        for ii in tl.static_range(CK):
            i = CK - 1 - ii
            sel = (j == i)[:, None]
            m, vt, go = _row(M, sel), _row(V, sel), _row(G, sel)
            lam, keep, _, _, _ = _gates(m, _row(L, sel), _row(K, sel), vt, w_, u_)
            a = go * (m - vt) * lam * (1.0 - lam)
            bk = gm * (m - vt) * keep * (1.0 - keep)
            live = s * CK + i < T
            xt = x0 + tl.cast(s * CK + i, tl.int64) * H * D
            tl.store(dk + xt, (gl * (1.0 - keep) - a - bk).to(dk.dtype.element_ty), mask=md & live)
            tl.store(dv + xt, (go * (1.0 - lam) + gm * (1.0 - keep)).to(dv.dtype.element_ty), mask=md & live)
            dw_ += tl.where(live, bk + gl * keep, 0.0)
            du_ -= tl.where(live, a, 0.0)
            gm, gl = tl.where(live, go * lam + gm * keep, gm), tl.where(live, a + bk + gl * keep, gl)
    pb = (b * H + h) * D + d  # dw, du per batch [B, H, D]
    tl.store(dw + pb, dw_, mask=md)
    tl.store(du + pb, du_, mask=md)
    if USE_S0:
        tl.store(ds0 + sb, gm, mask=md)
        tl.store(ds0 + sb + D, gl, mask=md)


def _config(T, D):
    """(BD, CK, NS): channels a program (one warp), tokens a segment, segments."""
    BD = min(32, max(2, next_pow2(D)))
    CK = min(16, max(2, next_pow2(T)))
    return BD, CK, triton.cdiv(T, CK)


def _launch_fwd(k, v, w, u, s0, save: bool):
    B, T, H, D = k.shape
    BD, CK, NS = _config(T, D)
    o = empty_output((B, T, H, D), v.dtype, k.device)
    sT = empty_output((B, H, 2, D), torch.float32, k.device)
    ck = empty_output((B, NS, 2, H, D), torch.float32, k.device) if save else None
    _rwkv4_fwd[(B, H, triton.cdiv(D, BD))](k, v, w, u, s0, o, sT, ck, T, H, D, NS, BD=BD, CK=CK,
                                           USE_S0=s0 is not None, SAVE=save, num_warps=1)
    return o, sT, ck


class FusedRWKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, w, u, s0):
        o, sT, ck = _launch_fwd(k, v, w, u, s0, save=True)
        ctx.save_for_backward(k, v, w, u, s0, ck)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros read
        return o, sT

    @staticmethod
    def backward(ctx, do, dsT):
        k, v, w, u, s0, ck = ctx.saved_tensors
        B, T, H, D = k.shape
        BD, CK, NS = _config(T, D)
        dk, dv = empty_output((B, T, H, D), k.dtype, k.device), empty_output((B, T, H, D), v.dtype, k.device)
        dw, du = empty_output((B, H, D), torch.float32, k.device), empty_output((B, H, D), torch.float32, k.device)
        ds0 = empty_output((B, H, 2, D), torch.float32, k.device) if s0 is not None else None
        _rwkv4_bwd[(B, H, triton.cdiv(D, BD))](
            k, v, w, u, ck, None if do is None else do.contiguous(), None if dsT is None else dsT.contiguous(),
            dk, dv, dw, du, ds0, T, H, D, NS, BD=BD, CK=CK, USE_S0=s0 is not None, USE_DO=do is not None,
            USE_DST=dsT is not None, num_warps=1)
        return dk, dv, dw.sum(0), du.sum(0), ds0


def fused_rwkv4(k, v, w, u, initial_state=None):
    """RWKV-4's WKV in one Triton kernel per direction (validated by `effattn.linear.rwkv4.rwkv4`): k, v
    `[B, T, H, D]` float16 / bfloat16 / float32, w, u `[H, D]`, initial_state `[B, H, 2, D]` or None. Returns (wkv
    `[B, T, H, D]` in v's dtype, the final state `[B, H, 2, D]` float32). Time O(T H D), sequential in T."""
    args = (k.contiguous(), v.contiguous(), w.float().contiguous(), u.float().contiguous(),
            None if initial_state is None else initial_state.float().contiguous())
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return FusedRWKV4.apply(*args)
    o, sT, _ = _launch_fwd(*args, save=False)
    return o, sT
