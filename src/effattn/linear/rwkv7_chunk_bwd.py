"""Triton backward of RWKV-7's chunkwise form (rwkv7.py has the math, rwkv7_chunk.py the forward), so RWKV-7
trains on Triton kernels. The forward stored the state h at every chunk's start and each super-chunk's map M:

1. The state gradients, chunk by chunk in reverse, dh <- e^{Gc_C} dh + W^T (b e^{Gc_C - Gc}) dh + scale q~^T do,
   in two levels like the forward: `_rwkv7_bwd_scan` FROM_ZERO gives each super-chunk's g (what its outputs
   add to the gradient at its start), `_rwkv7_super_scan` REVERSE walks the super-chunks, dh <- M^T dh + g
   (the last value is the initial state's gradient), and `_rwkv7_bwd_scan` from the gradient after each
   super-chunk stores dh' after every chunk. (The value columns of the state never mix, so the scans split
   them over programs.)
2. `_rwkv7_chunk_bwd`, one program per (chunk, sequence, head), all chunks at once: from h, dh' and do,
   every input's gradient. With X = (I - A_ab)^{-1}, Ra = a e^{Gp}, Y = A_ak v, u = X (Ra h + Y):

       du = Bd dh',  dI = scale do,  dq~ = scale do h^T,  dW = du h^T + P_rb^T dq~,  dU = du + P_rb^T dI,
       dBd = u dh'^T,  dKd = v dh'^T,  dv = Kd dh' + P_rk^T dI + A_ak^T X^T dU,
       dP_rb = dq~ W^T + dI U^T,  dP_rk = dI v^T,  dA_ak = (X^T dU) v^T,  dA_ab = X^T (dW Ra^T + dU Y^T) X^T,

   then through the pairwise products (x_i y_j e^{gx_i - gy_j} gives x and gx the sum over j, y and -gy the
   sum over i) and the decays (Bd = b e^{Gc_C - Gc}, Kd = k e^{Gc_C - Gc}, q~ = r e^{Gc} + ..., Ra, e^{Gc_C})
   to r, a, b, k and the log decay: dw = reverse cumsum(dGc + dGp) - dGp + dGc_C.
   Key channels go in slices of 16 ([C, C, 16] temporaries) in three passes: the [C, C] products and the
   channel sums (Ra h, Bd dh', Kd dh'); the channel sums of the gradients (dP_rb, dX); the per-channel
   gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import cdiv
from .rwkv7_chunk import (SLICE, SUB, _chunk_products, _decayed, _mild, _rows, _rwkv7_super_scan, _state_block,
                          _unit_lower_inverse, block, buffer_dot_precision, float32_state, rwkv7_chunk_forward)


@triton.jit
def _state_rows(S, ch, K, V, SL: tl.constexpr, BV: tl.constexpr):
    """Rows ch .. ch + SL of the float32 `[K, V]` state at S: `[SL, BV]`, zero past K and V."""
    ok = ch + tl.arange(0, SL)
    ov = tl.arange(0, BV)
    return tl.load(S + ok[:, None] * V + ov[None, :], mask=(ok[:, None] < K) & (ov[None, :] < V), other=0.0)


@triton.jit
def _slice(r, w, k, a, b, base_k, t0, T, ch, K, sk, C: tl.constexpr, SL: tl.constexpr):
    """One chunk's channel slice ch .. ch + SL: r, k, a, b `[C, SL]`, the chunk-local cumulative log decays Gc,
    Gp = Gc - w and the chunk's total Gc_C `[SL]`."""
    ws = _rows(w + base_k, t0, T, ch, C, SL, K, sk)
    gc = tl.cumsum(ws, 0)
    last = tl.sum(tl.where(tl.arange(0, C)[:, None] == C - 1, gc, 0.0), 0)
    return (_rows(r + base_k, t0, T, ch, C, SL, K, sk), _rows(k + base_k, t0, T, ch, C, SL, K, sk),
            _rows(a + base_k, t0, T, ch, C, SL, K, sk), _rows(b + base_k, t0, T, ch, C, SL, K, sk), gc, gc - ws, last)


@triton.jit
def _dq_dw(dI, du, P_rb, hs, DOT_PREC: tl.constexpr):
    """One channel slice's dq~ = dI h^T (dI = scale do) and dW = du h^T + P_rb^T dq~ `[C, SL]`; hs: the slice's
    rows of the chunk-start state `[SL, BV]`."""
    dQ = tl.dot(dI, tl.trans(hs), input_precision=DOT_PREC)
    return dQ, tl.dot(tl.trans(P_rb), dQ, tl.dot(du, tl.trans(hs), input_precision=DOT_PREC), input_precision=DOT_PREC)


@triton.jit
def _rwkv7_bwd_scan(do, DHB, DHS, Gb, SS, Wb, Qb, Bb, Lb, T, H, K, V, NT, scale, C: tl.constexpr,
                    BK: tl.constexpr, SV: tl.constexpr, SUB: tl.constexpr, FROM_ZERO: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One super-chunk's SUB chunks in reverse, one program per (value block, super-chunk, sequence-head), with
    dh `[BK, SV]` in registers: dh <- e^{Gc_C} dh + W^T (b e^{Gc_C - Gc}) dh + scale q~^T do. From the gradient
    after the super-chunk (DHB), storing dh after each chunk (DHS `[NT, B H, K, V]`); or FROM_ZERO, storing only
    the end (Gb: what the super-chunk's outputs add to the gradient at its start)."""
    iv, ns, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h = bh // H, bh % H
    rows = tl.arange(0, C)
    ok = tl.arange(0, BK)
    ov = iv * SV + tl.arange(0, SV)
    dh, p_state, m_kv = _state_block(DHB + tl.cast(ns, tl.int64) * SS, bh, K, V, iv * SV, BK, SV, not FROM_ZERO)
    base_v = bb * T * H * V + h * V
    n1 = tl.minimum(ns * SUB + SUB, NT)
    for i in range(n1 - ns * SUB):
        n = n1 - 1 - i
        chunk = bh * NT + n
        if not FROM_ZERO:  # the gradient of the state after chunk n
            tl.store(DHS + tl.cast(n, tl.int64) * SS + p_state, dh, mask=m_kv)
        pk = (chunk * C + rows[:, None]) * BK + ok[None, :]
        t = n * C + rows
        don = tl.load(do + base_v + t[:, None] * (H * V) + ov[None, :], mask=(t[:, None] < T) & (ov[None, :] < V),
                      other=0.0).to(tl.float32)
        du = tl.dot(tl.load(Bb + pk), dh, input_precision=DOT_PREC)  # [C, SV]
        carry = tl.load(Lb + chunk * BK + ok)[:, None] * dh
        dh = tl.dot(tl.trans(tl.load(Wb + pk)), du, carry, input_precision=DOT_PREC)
        dh = tl.dot(tl.trans(tl.load(Qb + pk)), scale * don, dh, input_precision=DOT_PREC)
    if FROM_ZERO:
        tl.store(Gb + tl.cast(ns, tl.int64) * SS + p_state, dh, mask=m_kv)


@triton.jit
def _rwkv7_chunk_bwd(r, w, k, v, a, b, do, HS, DHS, dr, dw, dk, dv, da, db, T, H, K, V, NT, scale,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SL: tl.constexpr, FACTORED: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """One chunk's gradients (module docstring); launched twice like the forward's prep, FACTORED and not."""
    n, bh = tl.program_id(0), tl.program_id(1)
    bb, h = bh // H, bh % H
    t0 = n * C
    sk, sv = H * K, H * V
    base_k = bb * T * sk + h * K
    base_v = bb * T * sv + h * V
    rows = tl.arange(0, C)
    strict = rows[:, None] > rows[None, :]
    causal = rows[:, None] >= rows[None, :]
    st = (tl.cast(n, tl.int64) * tl.num_programs(1) + bh) * K * V  # int64: this chunk's states in [NT, B H, K, V]
    # pass 1: the pairwise products and the channel sums Ra h, Bd dh', Kd dh'
    wf = _rows(w + base_k, t0, T, 0, C, BK, K, sk)
    gcf = tl.cumsum(wf, 0)
    lastf = tl.sum(tl.where(rows[:, None] == C - 1, gcf, 0.0), 0)
    if _mild(lastf) == FACTORED:
        A_ab, A_ak, P_rb, P_rk = _chunk_products(r, w, k, a, b, wf, gcf, lastf, base_k, t0, T, K, sk, C, BK, SL,
                                                 FACTORED, DOT_PREC)
        RaH = tl.zeros([C, BV], tl.float32)
        du = tl.zeros([C, BV], tl.float32)
        dv_acc = tl.zeros([C, BV], tl.float32)
        for ch in range(0, BK, SL):  # in slices: a [C, BK] operand would be held by every warp (M = C = 16)
            rs, ks, as_, bs, gc, gp, last = _slice(r, w, k, a, b, base_k, t0, T, ch, K, sk, C, SL)
            to_end = tl.exp(last[None, :] - gc)
            dhs = _state_rows(DHS + st, ch, K, V, SL, BV)
            RaH = tl.dot(as_ * tl.exp(gp), _state_rows(HS + st, ch, K, V, SL, BV), RaH, input_precision=DOT_PREC)
            du = tl.dot(bs * to_end, dhs, du, input_precision=DOT_PREC)
            dv_acc = tl.dot(ks * to_end, dhs, dv_acc, input_precision=DOT_PREC)
        X = _unit_lower_inverse(A_ab, C, DOT_PREC)
        vv = _rows(v + base_v, t0, T, 0, C, BV, V, sv)
        dI = scale * _rows(do + base_v, t0, T, 0, C, BV, V, sv)
        Y = tl.dot(A_ak, vv, input_precision=DOT_PREC)
        U = tl.dot(X, Y, input_precision=DOT_PREC)
        u = tl.dot(X, RaH, U, input_precision=DOT_PREC)
        dU = tl.dot(tl.trans(P_rb), dI, du, input_precision=DOT_PREC)
        dY = tl.dot(tl.trans(X), dU, input_precision=DOT_PREC)
        dA_ak = tl.where(strict, tl.dot(dY, tl.trans(vv), input_precision=DOT_PREC), 0.0)
        dP_rk = tl.where(causal, tl.dot(dI, tl.trans(vv), input_precision=DOT_PREC), 0.0)
        dv_acc = tl.dot(tl.trans(P_rk), dI, dv_acc, input_precision=DOT_PREC)
        dv_acc = tl.dot(tl.trans(A_ak), dY, dv_acc, input_precision=DOT_PREC)
        t = t0 + rows
        ov = tl.arange(0, BV)
        tl.store(dv + base_v + t[:, None] * sv + ov[None, :], dv_acc.to(dv.dtype.element_ty),
                 mask=(t[:, None] < T) & (ov[None, :] < V))
        # pass 2: the channel sums of the gradients, dP_rb and dX
        dP_rb = tl.dot(dI, tl.trans(U), input_precision=DOT_PREC)
        dX = tl.dot(dU, tl.trans(Y), input_precision=DOT_PREC)
        for ch in range(0, BK, SL):
            rs, ks, as_, bs, gc, gp, last = _slice(r, w, k, a, b, base_k, t0, T, ch, K, sk, C, SL)
            Ra = as_ * tl.exp(gp)
            hs = _state_rows(HS + st, ch, K, V, SL, BV)
            dQ, dW = _dq_dw(dI, du, P_rb, hs, DOT_PREC)
            dP_rb = tl.dot(dQ, tl.trans(tl.dot(X, Ra, input_precision=DOT_PREC)), dP_rb, input_precision=DOT_PREC)
            dX = tl.dot(dW, tl.trans(Ra), dX, input_precision=DOT_PREC)
        dP_rb = tl.where(causal, dP_rb, 0.0)
        dA_ab = tl.where(strict, tl.dot(tl.dot(tl.trans(X), dX, input_precision=DOT_PREC), tl.trans(X),
                                        input_precision=DOT_PREC), 0.0)
        # pass 3: every channel's gradients
        for ch in range(0, BK, SL):
            rs, ks, as_, bs, gc, gp, last = _slice(r, w, k, a, b, base_k, t0, T, ch, K, sk, C, SL)
            hs = _state_rows(HS + st, ch, K, V, SL, BV)
            dhs = _state_rows(DHS + st, ch, K, V, SL, BV)
            to_end = tl.exp(last[None, :] - gc)
            eg, ep = tl.exp(gc), tl.exp(gp)
            dQ, dW = _dq_dw(dI, du, P_rb, hs, DOT_PREC)
            dRa = tl.dot(tl.trans(X), dW, input_precision=DOT_PREC)
            dBd = tl.dot(u, tl.trans(dhs), input_precision=DOT_PREC) * to_end  # d(b e^{Gc_C - Gc}) * e^{Gc_C - Gc}
            dKd = tl.dot(vv, tl.trans(dhs), input_precision=DOT_PREC) * to_end
            if FACTORED:  # the factored products of _chunk_products: each sum over j or i is one dot
                ref = 0.5 * last[None, :]
                b_q = bs * tl.exp(ref - gc)
                k_q = ks * tl.exp(ref - gc)
                da_s = dRa * ep + tl.exp(gp - ref) * tl.dot(dA_ab, b_q, tl.dot(dA_ak, k_q, input_precision=DOT_PREC),
                                                            input_precision=DOT_PREC)
                dr_s = dQ * eg + tl.exp(gc - ref) * tl.dot(dP_rb, b_q, tl.dot(dP_rk, k_q, input_precision=DOT_PREC),
                                                           input_precision=DOT_PREC)
                a_q = as_ * tl.exp(gp - ref)
                r_q = rs * tl.exp(gc - ref)
                db_pair = tl.exp(ref - gc) * tl.dot(tl.trans(dA_ab), a_q, tl.dot(tl.trans(dP_rb), r_q,
                                                                                  input_precision=DOT_PREC),
                                                    input_precision=DOT_PREC)
                dk_pair = tl.exp(ref - gc) * tl.dot(tl.trans(dA_ak), a_q, tl.dot(tl.trans(dP_rk), r_q,
                                                                                  input_precision=DOT_PREC),
                                                    input_precision=DOT_PREC)
            else:  # one [i, j, d] decay tensor at a time (registers): A's (strict, Gp_i - Gc_j), then P's
                e = _decayed(tl.full([C, SL], 1.0, tl.float32), gp, gc, strict)
                da_s = dRa * ep + tl.sum((dA_ab[:, :, None] * bs[None, :, :] + dA_ak[:, :, None] * ks[None, :, :]) * e,
                                         1)
                e = e * as_[:, None, :]
                db_pair = tl.sum(dA_ab[:, :, None] * e, 0)
                dk_pair = tl.sum(dA_ak[:, :, None] * e, 0)
                e = _decayed(tl.full([C, SL], 1.0, tl.float32), gc, gc, causal)
                dr_s = dQ * eg + tl.sum((dP_rb[:, :, None] * bs[None, :, :] + dP_rk[:, :, None] * ks[None, :, :]) * e,
                                        1)
                e = e * rs[:, None, :]
                db_pair += tl.sum(dP_rb[:, :, None] * e, 0)
                dk_pair += tl.sum(dP_rk[:, :, None] * e, 0)
            # the log decays: Gc (q~, both sides of P, the key side of A, Bd, Kd), Gp (Ra, the a side of A), Gc_C
            decayed = dBd * bs + dKd * ks  # d(Bd) Bd + d(Kd) Kd
            dGc = rs * dr_s - bs * db_pair - ks * dk_pair - decayed  # r dr: q~'s decay and P's query side
            dGp = as_ * da_s
            dlast = tl.sum(decayed, 0) + tl.sum(hs * dhs, 1) * tl.exp(last)
            dw_s = tl.cumsum(dGc + dGp, 0, reverse=True) - dGp + dlast[None, :]
            oc = ch + tl.arange(0, SL)
            pk = base_k + t[:, None] * sk + oc[None, :]
            mk = (t[:, None] < T) & (oc[None, :] < K)
            tl.store(dr + pk, dr_s.to(dr.dtype.element_ty), mask=mk)
            tl.store(dw + pk, dw_s.to(dw.dtype.element_ty), mask=mk)
            tl.store(da + pk, da_s.to(da.dtype.element_ty), mask=mk)
            tl.store(db + pk, (dBd + db_pair).to(db.dtype.element_ty), mask=mk)
            tl.store(dk + pk, (dKd + dk_pair).to(dk.dtype.element_ty), mask=mk)


class _Rwkv7Chunk(torch.autograd.Function):
    """The chunk form's Triton forward (storing the chunk-start states) and this module's backward."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, h0, scale, C):
        r, w, k, v, a, b = (t.contiguous() for t in (r, w, k, v, a, b))
        o, ht, hs, bufs = rwkv7_chunk_forward(r, w, k, v, a, b, scale, h0, C, store_states=True)
        ctx.save_for_backward(r, w, k, v, a, b, hs, *bufs)
        ctx.scale, ctx.C, ctx.has_h0 = scale, C, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, a, b, hs, Wb, Qb, Bb, Lb, Mb = ctx.saved_tensors
        B, T, H, K = r.shape
        V, C = v.shape[-1], ctx.C
        NT, BK, BV = cdiv(T, C), block(K), block(V)
        NS = cdiv(NT, SUB)
        prec = buffer_dot_precision(r.dtype)
        do = torch.zeros(v.shape, dtype=v.dtype, device=v.device) if do is None else do.contiguous()
        dht = float32_state(dht)
        f32 = dict(dtype=torch.float32, device=r.device)
        SV = min(BV, 32)
        SS = B * H * K * V
        scan = dict(C=C, BK=BK, SV=SV, SUB=SUB, DOT_PREC=prec, num_warps=4, num_stages=2)
        # what each super-chunk's outputs add to the gradient at its start; then the super-chunks in reverse
        # (dh <- M^T dh + g); then every super-chunk's chunks from the gradient after it
        gb, dhb, dhs = (torch.empty(n, B * H, K, V, **f32) for n in (NS, NS, NT))
        _rwkv7_bwd_scan[(cdiv(V, SV), NS, B * H)](do, gb, dhs, gb, SS, Wb, Qb, Bb, Lb, T, H, K, V, NT,
                                                  float(ctx.scale), FROM_ZERO=True, **scan)
        dh0 = empty_output((B, H, K, V), torch.float32, r.device)
        _rwkv7_super_scan[(cdiv(V, SV), B * H)](dht, dh0, dhb, SS, Mb, gb, K, V, NS, BK=BK, SV=SV,
                                                USE_H0=dht is not None, REVERSE=True, DOT_PREC=prec, num_warps=4,
                                                num_stages=2)
        _rwkv7_bwd_scan[(cdiv(V, SV), NS, B * H)](do, dhb, dhs, gb, SS, Wb, Qb, Bb, Lb, T, H, K, V, NT,
                                                  float(ctx.scale), FROM_ZERO=False, **scan)
        dr, dw, dk, dv, da, db = (empty_output(t.shape, t.dtype, t.device) for t in (r, w, k, v, a, b))
        for factored in (True, False):  # each chunk is done by one of the two
            _rwkv7_chunk_bwd[(NT, B * H)](r, w, k, v, a, b, do, hs, dhs, dr, dw, dk, dv, da, db, T, H, K, V, NT,
                                          float(ctx.scale), C=C, BK=BK, BV=BV, SL=min(SLICE, BK), FACTORED=factored,
                                          DOT_PREC=prec, num_warps=8)
        return dr, dw, dk, dv, da, db, dh0 if ctx.has_h0 else None, None, None


def rwkv7_chunk_train(r, w, k, v, a, b, scale: float, initial_state, chunk_size: int):
    """As `rwkv7_chunk_forward` (o `[B, T, H, V]`, final state `[B, H, K, V]` float32), differentiable in r, w, k,
    v, a, b and the initial state through the Triton backward."""
    return _Rwkv7Chunk.apply(r, w, k, v, a, b, initial_state, float(scale), chunk_size)
