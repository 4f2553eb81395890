"""TTT-Linear's dual form on Triton: a sequential walk over the mini-batches and a parallel pass, each way
(notation: ttt.py).

A mini-batch of n <= b tokens, keys X_k, values X_v, queries X_q `[n, D]`, learning rates eta `[n]`, token
weights c `[n]` (its positions' c_i), from the inner weights W `[D, D]` and bias b `[D]` at its start:

    Z_k = X_k W + b,   G = LN'(Z_k; X_v - X_k)         (the gradient of 1/2 |LN(Z_k) - (X_v - X_k)|^2 by Z_k)
    A = tril(X_q X_k^T + 1) * eta                      (the bias-augmented x~q . x~k, columns scaled by eta_s)
    Z_q = X_q W + b - c * (A G),        o = X_q + LN(Z_q)
    U = X_k^T (eta G),  u = sum_s eta_s G_s:  W <- W - c_{b-1} U,  b <- b - c_{b-1} u  (a complete mini-batch)

Only the key side is sequential. Forward: `_ttt_fwd_states`, one program per (batch, head), walks the
mini-batches with W, b in float32 registers and stores them at every mini-batch start; `_ttt_fwd_out` then computes
every mini-batch's outputs at once from those weights (the layout FLA's chunk_ttt_linear also uses).

The call starts at a mini-batch boundary (ttt.py runs the rest of a mini-batch begun before the call in PyTorch
first); a pending sum it starts with adds to the first mini-batch's (U, u) and, times c, to its A G; a trailing
partial mini-batch leaves its (U, u) as the pending sum of the final state.

Products of float32 tiles round their operands to bf16 for bf16 inputs (operand_precision), as FLA does; the
weights and every sum stay float32.

Backward: `_ttt_bwd_out` takes every mini-batch's gradients through its outputs at once (dq complete; parts of
dk, deta, dG, dW, and of the norm's and c's gradients), then `_ttt_bwd_states` walks the mini-batches in reverse
from the stored weights, recomputes the key side and carries dW, db back through the updates.

The gradient of G by Z_k is the layer norm's second derivative: with xhat, r = 1 / std of Z_k's rows,
g = (LN(Z_k) - target) * w and m = mean(g * xhat), G = r P(g) where P(x) = x - mean(x) - xhat mean(x * xhat);
for an upstream dG, u = r dG:

    dg = P(u),   dxhat = -m u - mean(u * xhat) g + dg w^2,   dZ_k = r P(dxhat) - r mean(dG * G) xhat.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import _dot, cdiv, dot_precision, next_pow2
from .chunk import _put, _tile
from .rwkv7_chunk import buffer_dot_precision

LN_EPS = 1e-6


def fused_fits(head_dim: int, mini_batch_size: int) -> bool:
    """Whether the kernels fit the H100's 228 KB of shared memory (sm_90a builds): tiles BD x BT <= 64 x 64 or
    128 x 32 (D = 128 with b = 64 needs 295 KB in the backward's parallel pass)."""
    BD, BT = max(16, next_pow2(head_dim)), max(16, next_pow2(mini_batch_size))
    return BD <= 128 and BD * BT <= 64 * 64


def operand_precision(dtype: torch.dtype) -> str:
    """The kernels' products of float32 tiles: bf16 inputs round both operands to bf16 (as FLA's chunk_ttt_linear
    does: half the operand traffic of tf32 and twice its tensor-core rate; the interpreter rounds, then multiplies
    in float32, so CPU tests see the same rounding); float16 keeps tf32 (a gradient tile reaches 1e3 / sqrt(eps)
    scale at W = 0, near float16's range); float32 three tf32 passes (buffer_dot_precision)."""
    if dtype == torch.bfloat16:
        return dot_precision(dtype) or "bf16"  # ("upcast" in the interpreter: _dot's way to multiply bf16)
    return buffer_dot_precision(dtype)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b of float32 tiles in float32, at operand_precision's PREC."""
    if PREC == "bf16":
        c = _dot(a.to(tl.bfloat16), b.to(tl.bfloat16), None, None)
    elif PREC == "upcast":
        c = _dot(a.to(tl.bfloat16), b.to(tl.bfloat16), None, "upcast")
    else:
        c = _dot(a, b, None, PREC)
    return c


@triton.jit
def _layer_norm_rows(z, cm, D: tl.constexpr, EPS: tl.constexpr):
    """xhat and 1 / std of each row of z `[BT, BD]` over its D live columns (the others must hold 0)."""
    mu = tl.sum(z, 1) / D
    c0 = tl.where(cm[None, :], z - mu[:, None], 0.0)
    r = 1.0 / tl.sqrt(tl.sum(c0 * c0, 1) / D + EPS)
    return c0 * r[:, None], r


@triton.jit
def _project(x, xh, cm, D: tl.constexpr):
    """P(x) = x - mean(x) - xhat mean(x * xhat) per row, over the live columns."""
    p = x - (tl.sum(x, 1) / D)[:, None] - xh * (tl.sum(x * xh, 1) / D)[:, None]
    return tl.where(cm[None, :], p, 0.0)


@triton.jit
def _key_side(xk, xv, W, bias, lw, lb, live, cm, D: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    """The inner gradient G at the mini-batch's keys, and the layer norm's xhat, 1 / std and g behind it."""
    zk = _mm(xk, W, PREC) + bias[None, :]
    xh, r = _layer_norm_rows(zk, cm, D, EPS)
    g = (xh * lw[None, :] + lb[None, :] - (xv - xk)) * lw[None, :]
    G = tl.where(live[:, None], _project(g, xh, cm, D) * r[:, None], 0.0)
    return xh, r, g, G


@triton.jit
def _query_side(xq, xk, e, G, W, bias, p0, n, bh, cols, cw, rows, cm, D: tl.constexpr, EPS: tl.constexpr,
                PREC: tl.constexpr, HAS_P0: tl.constexpr):
    """S = X_q X_k^T + 1, A = tril(S) * eta, AG = A G (+ X~q P~ in mini-batch 0 with HAS_P0: P~ the call's initial
    pending sum), and the layer norm's xhat and 1 / std of Z_q = X~q W~ - c AG."""
    S = _mm(xq, tl.trans(xk), PREC) + 1.0
    A = tl.where(rows[:, None] >= rows[None, :], S * e[None, :], 0.0)
    AG = _mm(A, G, PREC)
    if HAS_P0:
        Pw, pb = _first_pending(p0, n, bh, cols, cm, D)
        AG += _mm(xq, Pw, PREC) + pb[None, :]
    zq = _mm(xq, W, PREC) + bias[None, :] - cw[:, None] * AG
    xhq, rq = _layer_norm_rows(zq, cm, D, EPS)
    return S, A, AG, xhq, rq


@triton.jit
def _head(i_h, c, lw_ptr, lb_ptr, rows, cols, cm, D: tl.constexpr, MB: tl.constexpr):
    """The head's layer norm weight and bias, the token weights of a mini-batch's rows and c_{b-1}."""
    lw = tl.load(lw_ptr + i_h * D + cols, mask=cm, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + i_h * D + cols, mask=cm, other=0.0).to(tl.float32)
    cw = tl.load(c + rows, mask=rows < MB, other=0.0).to(tl.float32)
    return lw, lb, cw, tl.load(c + MB - 1).to(tl.float32)


@triton.jit
def _first_pending(p0, n, bh, cols, cm, D: tl.constexpr):
    """The call's initial pending sum (Pw `[D, D]`, pb `[D]`) for mini-batch 0, zeros for the others."""
    first = n == 0
    p = p0 + bh.to(tl.int64) * (D + 1) * D
    Pw = tl.load(p + cols[:, None] * D + cols[None, :], mask=cm[:, None] & cm[None, :] & first, other=0.0)
    return Pw, tl.load(p + D * D + cols, mask=cm & first, other=0.0)


@triton.jit
def _walk_program(T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """A walk program's share, grid (B, H): batch, head, their flat index, rows, columns and masks of a
    `[D, D]` tile in a `[D + 1, D]` weight buffer, and the batch element's first row in `[B T, H, D]` (int64)."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    rows, cols = tl.arange(0, BT), tl.arange(0, BD)
    cm = cols < D
    return (i_b, i_h, (i_b * H + i_h).to(tl.int64), rows, cols, cm, cm[:, None] & cm[None, :],
            cols[:, None] * D + cols[None, :], i_b.to(tl.int64) * T)


@triton.jit
def _keys_ahead(k, eta, row0, n, rows, T, i_h, cols, H: tl.constexpr, D: tl.constexpr, MB: tl.constexpr):
    """Mini-batch n's keys `[BT, BD]` and step sizes `[BT]` (zeros outside 0 .. T), as stored: a walk loads them
    one mini-batch ahead of use, since the compiler's pipelining leaves these loads (used in two layouts) in the
    loop, and the first product of every step would wait for them."""
    t = n * MB + rows
    live = (rows < MB) & (t < T) & (t >= 0)
    return (_tile(k, row0 + t, live, i_h, cols, H, D),
            tl.load(eta + (row0 + t) * H + i_h, mask=live, other=0.0))


@triton.jit
def _ttt_fwd_states(k, v, eta, lw_ptr, lb_ptr, c, w0, p0, w_end, pend, ws, T, NB, H: tl.constexpr,
                    D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr,
                    PREC: tl.constexpr, HAS_P0: tl.constexpr):
    """The sequential part, one program per (batch, head): the weights at every mini-batch start (ws), the final
    weights and the pending sum of a trailing partial mini-batch (p0: the pending sum the call starts with,
    added to the first mini-batch's). Nothing of the queries is on this path."""
    i_b, i_h, bh, rows, cols, cm, wm, p_w, row0 = _walk_program(T, H, D, BT, BD)
    W = tl.load(w0 + bh * (D + 1) * D + p_w, mask=wm, other=0.0)
    bias = tl.load(w0 + bh * (D + 1) * D + D * D + cols, mask=cm, other=0.0)
    lw, lb, cw, c_last = _head(i_h, c, lw_ptr, lb_ptr, rows, cols, cm, D, MB)
    U = tl.zeros([BD, BD], dtype=tl.float32)
    u = tl.zeros([BD], dtype=tl.float32)
    full = 1.0
    k_next, e_next = _keys_ahead(k, eta, row0, 0, rows, T, i_h, cols, H, D, MB)
    for n in range(0, NB):
        t = n * MB + rows
        live = (rows < MB) & (t < T)
        tt = row0 + t
        xk, e = k_next.to(tl.float32), e_next.to(tl.float32)
        k_next, e_next = _keys_ahead(k, eta, row0, n + 1, rows, T, i_h, cols, H, D, MB)
        xv = _tile(v, tt, live, i_h, cols, H, D).to(tl.float32)
        p_ws = ws + (bh * NB + n) * (D + 1) * D
        tl.store(p_ws + p_w, W, mask=wm)
        tl.store(p_ws + D * D + cols, bias, mask=cm)
        xh, r, g, G = _key_side(xk, xv, W, bias, lw, lb, live, cm, D, EPS, PREC)
        eG = e[:, None] * G
        U = _mm(tl.trans(xk), eG, PREC)
        u = tl.sum(eG, 0)
        if HAS_P0:  # (loaded in the walk: no registers held across it)
            Pw, pb = _first_pending(p0, n, bh, cols, cm, D)
            U, u = U + Pw, u + pb
        full = ((n + 1) * MB <= T).to(tl.float32)  # a complete mini-batch updates the weights
        W -= (full * c_last) * U
        bias -= (full * c_last) * u
    p_end = bh * (D + 1) * D
    tl.store(w_end + p_end + p_w, W, mask=wm)
    tl.store(w_end + p_end + D * D + cols, bias, mask=cm)
    tl.store(pend + p_end + p_w, (1.0 - full) * U, mask=wm)  # a trailing partial mini-batch's sum
    tl.store(pend + p_end + D * D + cols, (1.0 - full) * u, mask=cm)


@triton.jit
def _mini_batch_program(T, NB, H: tl.constexpr, D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):
    """A parallel program's share, grid (NB, B H): its mini-batch n, batch, head, rows and offsets."""
    n, bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = bh // H, bh % H
    rows, cols = tl.arange(0, BT), tl.arange(0, BD)
    t = n * MB + rows
    live = (rows < MB) & (t < T)
    cm = cols < D
    tt = i_b.to(tl.int64) * T + t  # rows of `[B T, H, D]`
    p_ws = (bh.to(tl.int64) * NB + n) * (D + 1) * D
    return n, bh, i_b, i_h, rows, cols, tt, live, cm, p_ws


@triton.jit
def _ttt_fwd_out(q, k, v, eta, lw_ptr, lb_ptr, c, ws, p0, o, T, NB, H: tl.constexpr, D: tl.constexpr,
                 MB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
                 HAS_P0: tl.constexpr):
    """Every mini-batch's outputs at once from the weights at its start."""
    n, bh, i_b, i_h, rows, cols, tt, live, cm, p_ws = _mini_batch_program(T, NB, H, D, MB, BT, BD)
    lw, lb, cw, c_last = _head(i_h, c, lw_ptr, lb_ptr, rows, cols, cm, D, MB)
    W = tl.load(ws + p_ws + cols[:, None] * D + cols[None, :], mask=cm[:, None] & cm[None, :], other=0.0)
    bias = tl.load(ws + p_ws + D * D + cols, mask=cm, other=0.0)
    xq = _tile(q, tt, live, i_h, cols, H, D).to(tl.float32)
    xk = _tile(k, tt, live, i_h, cols, H, D).to(tl.float32)
    xv = _tile(v, tt, live, i_h, cols, H, D).to(tl.float32)
    e = tl.load(eta + tt * H + i_h, mask=live, other=0.0).to(tl.float32)
    xh, r, g, G = _key_side(xk, xv, W, bias, lw, lb, live, cm, D, EPS, PREC)
    S, A, AG, xhq, rq = _query_side(xq, xk, e, G, W, bias, p0, n, bh, cols, cw, rows, cm, D, EPS, PREC, HAS_P0)
    out = xq + xhq * lw[None, :] + lb[None, :]
    _put(o, out, tt, live, i_h, cols, H, D)


@triton.jit
def _ttt_bwd_out(q, k, v, eta, lw_ptr, lb_ptr, c, ws, p0, do, dq, dk_part, deta_part, dg_out, dw_out, dnorm_part,
                 dc_part, dp0_part, T, NB, H: tl.constexpr, D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr, HAS_P0: tl.constexpr):
    """Every mini-batch at once, the gradients through its outputs: dq (complete), and the parts of dk, deta, the
    layer norm's weight and bias, c, and of dG and dW (dw_out `[B H NB, D + 1, D]`) that the reverse walk adds."""
    n, bh, i_b, i_h, rows, cols, tt, live, cm, p_ws = _mini_batch_program(T, NB, H, D, MB, BT, BD)
    lw, lb, cw, c_last = _head(i_h, c, lw_ptr, lb_ptr, rows, cols, cm, D, MB)
    wm = cm[:, None] & cm[None, :]
    p_w = cols[:, None] * D + cols[None, :]
    W = tl.load(ws + p_ws + p_w, mask=wm, other=0.0)
    bias = tl.load(ws + p_ws + D * D + cols, mask=cm, other=0.0)
    xq = _tile(q, tt, live, i_h, cols, H, D).to(tl.float32)
    xk = _tile(k, tt, live, i_h, cols, H, D).to(tl.float32)
    xv = _tile(v, tt, live, i_h, cols, H, D).to(tl.float32)
    p_e = tt * H + i_h
    e = tl.load(eta + p_e, mask=live, other=0.0).to(tl.float32)
    b_do = _tile(do, tt, live, i_h, cols, H, D).to(tl.float32)
    xh, r, g, G = _key_side(xk, xv, W, bias, lw, lb, live, cm, D, EPS, PREC)
    S, A, AG, xhq, rq = _query_side(xq, xk, e, G, W, bias, p0, n, bh, cols, cw, rows, cm, D, EPS, PREC, HAS_P0)
    # o = X_q + LN(Z_q)
    p_norm = (bh.to(tl.int64) * NB + n) * 2 * D
    tl.store(dnorm_part + p_norm + cols, tl.sum(b_do * xhq, 0), mask=cm)
    tl.store(dnorm_part + p_norm + D + cols, tl.sum(b_do, 0), mask=cm)
    dzq = _project(b_do * lw[None, :], xhq, cm, D) * rq[:, None]
    # Z_q = X_q W + b - c (A G), A = tril(S) * eta
    tl.store(dw_out + p_ws + p_w, _mm(tl.trans(xq), dzq, PREC), mask=wm)
    tl.store(dw_out + p_ws + D * D + cols, tl.sum(dzq, 0), mask=cm)
    tl.store(dc_part + (bh.to(tl.int64) * NB + n) * BT + rows, -tl.sum(dzq * AG, 1))
    dAG = -cw[:, None] * dzq
    _put(dg_out, _mm(tl.trans(A), dAG, PREC), tt, live, i_h, cols, H, D)
    dA = tl.where(rows[:, None] >= rows[None, :], _mm(dAG, tl.trans(G), PREC), 0.0)
    tl.store(deta_part + p_e, tl.sum(dA * S, 0), mask=live)
    dS = dA * e[None, :]
    b_dq = b_do + _mm(dzq, tl.trans(W), PREC) + _mm(dS, xk, PREC)
    if HAS_P0:  # mini-batch 0's A G holds X~q P~: the part of dP~ through the outputs, and dq's share
        Pw, pb = _first_pending(p0, n, bh, cols, cm, D)
        b_dq += _mm(dAG, tl.trans(Pw), PREC)
        p_p0 = dp0_part + bh.to(tl.int64) * (D + 1) * D
        tl.store(p_p0 + p_w, _mm(tl.trans(xq), dAG, PREC), mask=wm & (n == 0))
        tl.store(p_p0 + D * D + cols, tl.sum(dAG, 0), mask=cm & (n == 0))
    _put(dq, b_dq, tt, live, i_h, cols, H, D)
    _put(dk_part, _mm(tl.trans(dS), xq, PREC), tt, live, i_h, cols, H, D)


@triton.jit
def _ttt_bwd_states(k, v, eta, lw_ptr, lb_ptr, c, ws, p0, dw_end, dpend, dk_part, deta_part, dg_out, dw_out,
                    dp0_part, dk, dv, deta, dw0, dp0, dnorm, dc_last_out, T, NB, H: tl.constexpr, D: tl.constexpr,
                    MB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
                    HAS_P0: tl.constexpr):
    """The reverse walk, one program per (batch, head): dW, db carried back through the updates, with each
    mini-batch's dG and dW from its outputs (_ttt_bwd_out) added; through G the layer norm's second derivative."""
    i_b, i_h, bh, rows, cols, cm, wm, p_w, row0 = _walk_program(T, H, D, BT, BD)
    lw, lb, cw, c_last = _head(i_h, c, lw_ptr, lb_ptr, rows, cols, cm, D, MB)
    p_end = bh * (D + 1) * D
    dW = tl.load(dw_end + p_end + p_w, mask=wm, other=0.0)  # dL/dW, db at the current mini-batch's end
    db = tl.load(dw_end + p_end + D * D + cols, mask=cm, other=0.0)
    dP = tl.load(dpend + p_end + p_w, mask=wm, other=0.0)
    dp = tl.load(dpend + p_end + D * D + cols, mask=cm, other=0.0)
    dlw_acc = tl.zeros([BD], dtype=tl.float32)
    dlb_acc = tl.zeros([BD], dtype=tl.float32)
    dc_last = 0.0
    k_next, e_next = _keys_ahead(k, eta, row0, NB - 1, rows, T, i_h, cols, H, D, MB)
    bias_next = tl.load(ws + (bh * NB + NB - 1) * (D + 1) * D + D * D + cols, mask=cm, other=0.0)
    for i in range(0, NB):
        n = NB - 1 - i
        t = n * MB + rows
        live = (rows < MB) & (t < T)
        m2 = live[:, None] & cm[None, :]
        tt = row0 + t
        xk, e, bias = k_next.to(tl.float32), e_next.to(tl.float32), bias_next
        k_next, e_next = _keys_ahead(k, eta, row0, n - 1, rows, T, i_h, cols, H, D, MB)
        bias_next = tl.load(ws + (bh * NB + n - 1) * (D + 1) * D + D * D + cols, mask=cm & (n > 0), other=0.0)
        xv = _tile(v, tt, live, i_h, cols, H, D).to(tl.float32)
        p_e = tt * H + i_h
        p_ws = (bh * NB + n) * (D + 1) * D
        W = tl.load(ws + p_ws + p_w, mask=wm, other=0.0)
        # loaded here, used at the step's end: their latency overlaps the step
        dW_out = tl.load(dw_out + p_ws + p_w, mask=wm, other=0.0)
        db_out = tl.load(dw_out + p_ws + D * D + cols, mask=cm, other=0.0)
        dk_in = _tile(dk_part, tt, live, i_h, cols, H, D).to(tl.float32)
        deta_in = tl.load(deta_part + p_e, mask=live, other=0.0)
        xh, r, g, G = _key_side(xk, xv, W, bias, lw, lb, live, cm, D, EPS, PREC)
        # the update (U, u) = (X_k^T eta G, sum eta G): into the weights, or the pending sum of a trailing part
        eG = e[:, None] * G
        full = ((n + 1) * MB <= T).to(tl.float32)
        dU = full * (-c_last) * dW + (1.0 - full) * dP
        du = full * (-c_last) * db + (1.0 - full) * dp
        U = _mm(tl.trans(xk), eG, PREC)
        u = tl.sum(eG, 0)
        if HAS_P0:  # the initial pending sum adds to mini-batch 0's (U, u)
            Pw, pb = _first_pending(p0, n, bh, cols, cm, D)
            U, u = U + Pw, u + pb
            m0w, m0 = wm & (n == 0), cm & (n == 0)
            tl.store(dp0 + p_end + p_w, dU + tl.load(dp0_part + p_end + p_w, mask=m0w, other=0.0), mask=m0w)
            tl.store(dp0 + p_end + D * D + cols, du + tl.load(dp0_part + p_end + D * D + cols, mask=m0, other=0.0),
                     mask=m0)
        dc_last -= full * (tl.sum(tl.sum(dW * U, 1), 0) + tl.sum(db * u, 0))
        deG = _mm(xk, dU, PREC) + du[None, :]
        dG = tl.where(m2, _tile(dg_out, tt, live, i_h, cols, H, D).to(tl.float32) + e[:, None] * deG, 0.0)
        # G = r P(g), g = (LN(Z_k) - (X_v - X_k)) w: the layer norm's second derivative (module docstring)
        uu = dG * r[:, None]
        dg = _project(uu, xh, cm, D)
        m = tl.sum(g * xh, 1) / D
        dxh = -m[:, None] * uu - (tl.sum(uu * xh, 1) / D)[:, None] * g + dg * (lw * lw)[None, :]
        dlw_acc += tl.sum(dg * (2.0 * xh * lw[None, :] + lb[None, :] - (xv - xk)), 0)
        dlb_acc += tl.sum(dg * lw[None, :], 0)
        dtarget = -dg * lw[None, :]
        dzk = (_project(dxh, xh, cm, D) - (tl.sum(dG * G, 1) / D)[:, None] * tl.where(cm[None, :], xh, 0.0))
        dzk = tl.where(m2, dzk * r[:, None], 0.0)
        dW += dW_out + _mm(tl.trans(xk), dzk, PREC)
        db += db_out + tl.sum(dzk, 0)
        b_dk = dk_in + _mm(eG, tl.trans(dU), PREC) + _mm(dzk, tl.trans(W), PREC) - dtarget
        _put(dk, b_dk, tt, live, i_h, cols, H, D)
        _put(dv, dtarget, tt, live, i_h, cols, H, D)
        b_deta = deta_in + tl.sum(deG * G, 1)
        tl.store(deta + p_e, b_deta.to(deta.dtype.element_ty), mask=live)
    tl.store(dw0 + p_end + p_w, dW, mask=wm)
    tl.store(dw0 + p_end + D * D + cols, db, mask=cm)

    tl.store(dnorm + bh * 2 * D + cols, dlw_acc, mask=cm)
    tl.store(dnorm + bh * 2 * D + D + cols, dlb_acc, mask=cm)
    tl.store(dc_last_out + bh, dc_last)


def _launch_options(BD: int) -> dict:
    """num_warps (and num_stages) per kernel, from sm_90a builds in bf16. D <= 64: nothing spills; measured at
    T = 16k (forward / backward walk warps, ms): 4 / 8 2.56 / 9.91, 2 / 8 3.06 / 10.0, 8 / 8 2.83 / 10.1,
    4 / 4 2.55 / 13.4. D = 128: 8 warps everywhere (4 spilled 1.3 KB in the forward walk), and the backward walk at
    one stage, whose default three need 311 KB of shared memory (228 KB on the H100); untimed."""
    if BD <= 64:
        return {"fwd_states": dict(num_warps=4), "fwd_out": dict(num_warps=4), "bwd_out": dict(num_warps=4),
                "bwd_states": dict(num_warps=8)}
    return {"fwd_states": dict(num_warps=8), "fwd_out": dict(num_warps=8), "bwd_out": dict(num_warps=8),
            "bwd_states": dict(num_warps=8, num_stages=1)}


def _launch_args(q, mini_batch_size):
    B, T, H, D = q.shape
    BT, BD = max(16, next_pow2(mini_batch_size)), max(16, next_pow2(D))
    return B, T, H, D, cdiv(T, mini_batch_size), BT, BD


class _TTTLinearFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, w0, p0, coeffs, mini_batch_size):
        B, T, H, D, NB, BT, BD = _launch_args(q, mini_batch_size)
        consts = dict(H=H, D=D, MB=mini_batch_size, BT=BT, BD=BD, EPS=LN_EPS, PREC=operand_precision(q.dtype),
                      HAS_P0=p0 is not None)
        p0 = w0 if p0 is None else p0  # (not read)
        o = empty_output(q.shape, q.dtype, q.device)
        w_end, pend = (torch.empty((B, H, D + 1, D), dtype=torch.float32, device=q.device) for _ in range(2))
        ws = torch.empty((B, H, NB, D + 1, D), dtype=torch.float32, device=q.device)  # the weights at each start
        _ttt_fwd_states[(B, H)](k, v, eta, ln_weight, ln_bias, coeffs, w0, p0, w_end, pend, ws, T, NB,
                                **_launch_options(BD)["fwd_states"], **consts)
        _ttt_fwd_out[(NB, B * H)](q, k, v, eta, ln_weight, ln_bias, coeffs, ws, p0, o, T, NB,
                                  **_launch_options(BD)["fwd_out"], **consts)
        if any(ctx.needs_input_grad[:9]):
            ctx.save_for_backward(q, k, v, eta, ln_weight, ln_bias, p0, coeffs, ws)
        ctx.has_p0 = consts["HAS_P0"]
        ctx.mini_batch_size = mini_batch_size
        return o, w_end, pend

    @staticmethod
    def backward(ctx, do, dw_end, dpend):
        q, k, v, eta, ln_weight, ln_bias, p0, coeffs, ws = ctx.saved_tensors
        B, T, H, D, NB, BT, BD = _launch_args(q, ctx.mini_batch_size)
        consts = dict(H=H, D=D, MB=ctx.mini_batch_size, BT=BT, BD=BD, EPS=LN_EPS, PREC=operand_precision(q.dtype),
                      HAS_P0=ctx.has_p0)
        f32 = dict(dtype=torch.float32, device=q.device)
        do = torch.zeros_like(q) if do is None else do.contiguous()
        dw_end = torch.zeros((B, H, D + 1, D), **f32) if dw_end is None else dw_end.float().contiguous()
        dpend = torch.zeros((B, H, D + 1, D), **f32) if dpend is None else dpend.float().contiguous()
        # the gradients through every mini-batch's outputs, all at once
        dq = empty_output(q.shape, q.dtype, q.device)
        dk_part, dg_out = (torch.empty(q.shape, **f32) for _ in range(2))
        deta_part = torch.empty((B, T, H), **f32)
        dw_out = torch.empty_like(ws)
        dnorm_part = torch.empty((B * H, NB, 2, D), **f32)
        dc_part = torch.empty((B * H, NB, BT), **f32)
        dp0_part = torch.empty((B, H, D + 1, D), **f32)
        _ttt_bwd_out[(NB, B * H)](q, k, v, eta, ln_weight, ln_bias, coeffs, ws, p0, do, dq, dk_part, deta_part,
                                  dg_out, dw_out, dnorm_part, dc_part, dp0_part, T, NB,
                                  **_launch_options(BD)["bwd_out"], **consts)
        # the reverse walk through the updates
        dk, dv = (empty_output(q.shape, q.dtype, q.device) for _ in range(2))
        deta = empty_output((B, T, H), eta.dtype, q.device)
        dw0, dp0 = (empty_output((B, H, D + 1, D), torch.float32, q.device) for _ in range(2))
        dnorm = empty_output((B * H, 2, D), torch.float32, q.device)
        dc_last = empty_output((B * H,), torch.float32, q.device)
        _ttt_bwd_states[(B, H)](k, v, eta, ln_weight, ln_bias, coeffs, ws, p0, dw_end, dpend, dk_part, deta_part,
                                dg_out, dw_out, dp0_part, dk, dv, deta, dw0, dp0, dnorm, dc_last, T, NB,
                                **_launch_options(BD)["bwd_states"], **consts)
        dnorm = (dnorm.view(B, H, 2, D).sum(0) + dnorm_part.view(B, H, NB, 2, D).sum((0, 2)))
        dc = dc_part.sum((0, 1))[:ctx.mini_batch_size]
        dc[-1] += dc_last.sum()
        return (dq, dk, dv, deta, dnorm[:, 0].to(ln_weight.dtype), dnorm[:, 1].to(ln_bias.dtype), dw0,
                dp0 if ctx.has_p0 else None,
                dc.to(coeffs.dtype), None)


def ttt_linear_fused(q, k, v, eta, ln_weight, ln_bias, w0, p0, coeffs, mini_batch_size: int):
    """TTT-Linear from a mini-batch boundary, on Triton.

    q, k, v `[B, T, H, D]`, eta `[B, T, H]`, ln_weight, ln_bias `[H, D]`, w0: the inner weights with the bias as
    last row `[B, H, D + 1, D]`, p0: None or a pending sum to add to the first mini-batch's, as the state keeps
    it (`[B, H, D + 1, D]`), coeffs: the token weights c_i `[mini_batch_size]`. Returns o `[B, T, H, D]`, the weights
    after the last complete mini-batch and the pending sum of a trailing partial one (zero if none), both
    `[B, H, D + 1, D]` float32."""
    q, k, v, eta = (t.contiguous() for t in (q, k, v, eta))
    return _TTTLinearFused.apply(q, k, v, eta, ln_weight.contiguous(), ln_bias.contiguous(),
                                 w0.float().contiguous(), None if p0 is None else p0.float().contiguous(),
                                 coeffs.contiguous(), mini_batch_size)
