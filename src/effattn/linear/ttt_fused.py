"""TTT-Linear's dual form as one Triton kernel each way (notation: ttt.py).

One program per (batch, head) walks the mini-batches in order with the inner weights W `[D, D]` and bias b `[D]`
in registers (float32). A mini-batch of n <= b tokens, keys X_k, values X_v, queries X_q `[n, D]`, learning
rates eta `[n]`, token weights c `[n]` (its positions' c_i), from W, b at its start:

    Z_k = X_k W + b,   G = LN'(Z_k; X_v - X_k)         (the gradient of 1/2 |LN(Z_k) - (X_v - X_k)|^2 by Z_k)
    A = tril(X_q X_k^T + 1) * eta                      (the bias-augmented x~q . x~k, columns scaled by eta_s)
    Z_q = X_q W + b - c * (A G),        o = X_q + LN(Z_q)
    U = X_k^T (eta G),  u = sum_s eta_s G_s:  W <- W - c_{b-1} U,  b <- b - c_{b-1} u  (a complete mini-batch)

The call starts at a mini-batch boundary with nothing pending (ttt.py runs a call's leading partial mini-batch
in PyTorch first); a trailing partial one leaves its (U, u) as the pending sum of the final state.

The backward walks the mini-batches in reverse from the weights the forward stored at each start, recomputes the
mini-batch, and carries dW, db back through the update. The gradient of G by Z_k is the layer norm's second
derivative: with xhat, r = 1 / std of Z_k's rows, g = (LN(Z_k) - target) * w and m = mean(g * xhat),
G = r P(g) where P(x) = x - mean(x) - xhat mean(x * xhat); for an upstream dG, u = r dG:

    dg = P(u),   dxhat = -m u - mean(u * xhat) g + dg w^2,   dZ_k = r P(dxhat) - r mean(dG * G) xhat.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import _dot, cdiv, next_pow2
from .rwkv7_chunk import buffer_dot_precision

LN_EPS = 1e-6
MAX_HEAD_DIM = 128
MAX_MINI_BATCH = 64


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
def _load_rows(ptr, base, t, live, cols, cm, H: tl.constexpr, D: tl.constexpr):
    return tl.load(ptr + base + (t[:, None] * H) * D + cols[None, :], mask=live[:, None] & cm[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _mini_batch(xq, xk, xv, e, W, bias, lw, lb, cw, rows, live, cm, D: tl.constexpr, EPS: tl.constexpr,
                PREC: tl.constexpr):
    """One mini-batch's forward quantities (module docstring), every one the backward needs again."""
    zk = _dot(xk, W, None, PREC) + bias[None, :]
    xh, r = _layer_norm_rows(zk, cm, D, EPS)
    g = (xh * lw[None, :] + lb[None, :] - (xv - xk)) * lw[None, :]
    G = tl.where(live[:, None], _project(g, xh, cm, D) * r[:, None], 0.0)
    S = _dot(xq, tl.trans(xk), None, PREC) + 1.0
    A = tl.where(rows[:, None] >= rows[None, :], S * e[None, :], 0.0)
    AG = _dot(A, G, None, PREC)
    zq = _dot(xq, W, None, PREC) + bias[None, :] - cw[:, None] * AG
    xhq, rq = _layer_norm_rows(zq, cm, D, EPS)
    return xh, r, g, G, S, A, AG, xhq, rq


@triton.jit
def _ttt_fwd(q, k, v, eta, lw_ptr, lb_ptr, c, w0, o, w_end, pend, ws, T, NB, H: tl.constexpr,
             D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr,
             STORE_WS: tl.constexpr, PREC: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    rows, cols = tl.arange(0, BT), tl.arange(0, BD)
    cm = cols < D
    wm = cm[:, None] & cm[None, :]
    p_w = cols[:, None] * D + cols[None, :]
    bh = (i_b * H + i_h).to(tl.int64)
    W = tl.load(w0 + bh * (D + 1) * D + p_w, mask=wm, other=0.0)
    bias = tl.load(w0 + bh * (D + 1) * D + D * D + cols, mask=cm, other=0.0)
    lw = tl.load(lw_ptr + i_h * D + cols, mask=cm, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + i_h * D + cols, mask=cm, other=0.0).to(tl.float32)
    cw = tl.load(c + rows, mask=rows < MB, other=0.0).to(tl.float32)
    c_last = tl.load(c + MB - 1).to(tl.float32)
    base = i_b.to(tl.int64) * T * H * D + i_h * D
    U = tl.zeros([BD, BD], dtype=tl.float32)
    u = tl.zeros([BD], dtype=tl.float32)
    full = 1.0
    for n in range(0, NB):
        t = n * MB + rows
        live = (rows < MB) & (t < T)
        xq = _load_rows(q, base, t, live, cols, cm, H, D)
        xk = _load_rows(k, base, t, live, cols, cm, H, D)
        xv = _load_rows(v, base, t, live, cols, cm, H, D)
        e = tl.load(eta + i_b.to(tl.int64) * T * H + t * H + i_h, mask=live, other=0.0).to(tl.float32)
        if STORE_WS:  # the weights at the mini-batch's start, for the backward
            p_ws = ws + (bh * NB + n) * (D + 1) * D
            tl.store(p_ws + p_w, W, mask=wm)
            tl.store(p_ws + D * D + cols, bias, mask=cm)
        xh, r, g, G, S, A, AG, xhq, rq = _mini_batch(xq, xk, xv, e, W, bias, lw, lb, cw, rows, live, cm, D, EPS,
                                                     PREC)
        out = xq + xhq * lw[None, :] + lb[None, :]
        tl.store(o + base + (t[:, None] * H) * D + cols[None, :], out.to(o.dtype.element_ty),
                 mask=live[:, None] & cm[None, :])
        eG = e[:, None] * G
        U = _dot(tl.trans(xk), eG, None, PREC)
        u = tl.sum(eG, 0)
        full = ((n + 1) * MB <= T).to(tl.float32)  # a complete mini-batch updates the weights
        W -= (full * c_last) * U
        bias -= (full * c_last) * u
    p_end = bh * (D + 1) * D
    tl.store(w_end + p_end + p_w, W, mask=wm)
    tl.store(w_end + p_end + D * D + cols, bias, mask=cm)
    tl.store(pend + p_end + p_w, (1.0 - full) * U, mask=wm)  # a trailing partial mini-batch's sum
    tl.store(pend + p_end + D * D + cols, (1.0 - full) * u, mask=cm)


@triton.jit
def _ttt_bwd(q, k, v, eta, lw_ptr, lb_ptr, c, ws, do, dw_end, dpend, dq, dk, dv, deta, dw0, dlw, dlb, dc, T, NB,
             H: tl.constexpr, D: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
             EPS: tl.constexpr, PREC: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    rows, cols = tl.arange(0, BT), tl.arange(0, BD)
    cm = cols < D
    wm = cm[:, None] & cm[None, :]
    p_w = cols[:, None] * D + cols[None, :]
    bh = (i_b * H + i_h).to(tl.int64)
    lw = tl.load(lw_ptr + i_h * D + cols, mask=cm, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + i_h * D + cols, mask=cm, other=0.0).to(tl.float32)
    cw = tl.load(c + rows, mask=rows < MB, other=0.0).to(tl.float32)
    c_last = tl.load(c + MB - 1).to(tl.float32)
    base = i_b.to(tl.int64) * T * H * D + i_h * D
    p_end = bh * (D + 1) * D
    dW = tl.load(dw_end + p_end + p_w, mask=wm, other=0.0)  # dL/dW, db at the current mini-batch's end
    db = tl.load(dw_end + p_end + D * D + cols, mask=cm, other=0.0)
    dP = tl.load(dpend + p_end + p_w, mask=wm, other=0.0)
    dp = tl.load(dpend + p_end + D * D + cols, mask=cm, other=0.0)
    dlw_acc = tl.zeros([BD], dtype=tl.float32)
    dlb_acc = tl.zeros([BD], dtype=tl.float32)
    dc_acc = tl.zeros([BT], dtype=tl.float32)
    dc_last = 0.0
    for i in range(0, NB):
        n = NB - 1 - i
        t = n * MB + rows
        live = (rows < MB) & (t < T)
        m2 = live[:, None] & cm[None, :]
        p_rows = base + (t[:, None] * H) * D + cols[None, :]
        xq = _load_rows(q, base, t, live, cols, cm, H, D)
        xk = _load_rows(k, base, t, live, cols, cm, H, D)
        xv = _load_rows(v, base, t, live, cols, cm, H, D)
        p_e = eta + i_b.to(tl.int64) * T * H + t * H + i_h
        e = tl.load(p_e, mask=live, other=0.0).to(tl.float32)
        b_do = _load_rows(do, base, t, live, cols, cm, H, D)
        p_ws = ws + (bh * NB + n) * (D + 1) * D
        W = tl.load(p_ws + p_w, mask=wm, other=0.0)
        bias = tl.load(p_ws + D * D + cols, mask=cm, other=0.0)
        xh, r, g, G, S, A, AG, xhq, rq = _mini_batch(xq, xk, xv, e, W, bias, lw, lb, cw, rows, live, cm, D, EPS,
                                                     PREC)
        # o = X_q + LN(Z_q)
        dlw_acc += tl.sum(b_do * xhq, 0)
        dlb_acc += tl.sum(b_do, 0)
        dzq = _project(b_do * lw[None, :], xhq, cm, D) * rq[:, None]
        # Z_q = X_q W + b - c (A G)
        b_dq = b_do + _dot(dzq, tl.trans(W), None, PREC)
        dW_here = _dot(tl.trans(xq), dzq, None, PREC)
        db_here = tl.sum(dzq, 0)
        dc_acc -= tl.sum(dzq * AG, 1)
        dAG = -cw[:, None] * dzq
        dG = _dot(tl.trans(A), dAG, None, PREC)
        dA = tl.where(rows[:, None] >= rows[None, :], _dot(dAG, tl.trans(G), None, PREC), 0.0)
        b_deta = tl.sum(dA * S, 0)
        dS = dA * e[None, :]
        b_dq += _dot(dS, xk, None, PREC)
        b_dk = _dot(tl.trans(dS), xq, None, PREC)
        # the update (U, u) = (X_k^T eta G, sum eta G): into the weights, or the pending sum of a trailing part
        eG = e[:, None] * G
        full = ((n + 1) * MB <= T).to(tl.float32)
        dU = full * (-c_last) * dW + (1.0 - full) * dP
        du = full * (-c_last) * db + (1.0 - full) * dp
        U = _dot(tl.trans(xk), eG, None, PREC)
        dc_last -= full * (tl.sum(tl.sum(dW * U, 1), 0) + tl.sum(db * tl.sum(eG, 0), 0))
        deG = _dot(xk, dU, None, PREC) + du[None, :]
        b_dk += _dot(eG, tl.trans(dU), None, PREC)
        b_deta += tl.sum(deG * G, 1)
        dG = tl.where(m2, dG + e[:, None] * deG, 0.0)
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
        b_dk += _dot(dzk, tl.trans(W), None, PREC) - dtarget
        dW += dW_here + _dot(tl.trans(xk), dzk, None, PREC)
        db += db_here + tl.sum(dzk, 0)
        tl.store(dq + p_rows, b_dq.to(dq.dtype.element_ty), mask=m2)
        tl.store(dk + p_rows, b_dk.to(dk.dtype.element_ty), mask=m2)
        tl.store(dv + p_rows, dtarget.to(dv.dtype.element_ty), mask=m2)
        tl.store(deta + i_b.to(tl.int64) * T * H + t * H + i_h, b_deta, mask=live)
    tl.store(dw0 + p_end + p_w, dW, mask=wm)
    tl.store(dw0 + p_end + D * D + cols, db, mask=cm)
    tl.store(dlw + bh * D + cols, dlw_acc, mask=cm)
    tl.store(dlb + bh * D + cols, dlb_acc, mask=cm)
    dc_acc += tl.where(rows == MB - 1, dc_last, 0.0)
    tl.store(dc + bh * BT + rows, dc_acc, mask=rows < MB)


def _launch_args(q, eta, mini_batch_size):
    B, T, H, D = q.shape
    BT, BD = max(16, next_pow2(mini_batch_size)), max(16, next_pow2(D))
    return B, T, H, D, cdiv(T, mini_batch_size), BT, BD


class _TTTLinearFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, w0, coeffs, mini_batch_size):
        B, T, H, D, NB, BT, BD = _launch_args(q, eta, mini_batch_size)
        want_grad = any(ctx.needs_input_grad[:8])
        o = empty_output(q.shape, q.dtype, q.device)
        w_end, pend = (torch.empty((B, H, D + 1, D), dtype=torch.float32, device=q.device) for _ in range(2))
        ws = torch.empty((B, H, NB, D + 1, D), dtype=torch.float32, device=q.device) if want_grad else w_end
        prec = buffer_dot_precision(q.dtype)
        _ttt_fwd[(B, H)](q, k, v, eta, ln_weight, ln_bias, coeffs, w0, o, w_end, pend, ws, T, NB, H=H, D=D, MB=mini_batch_size, BT=BT, BD=BD, EPS=LN_EPS, STORE_WS=want_grad,
                         PREC=prec, num_warps=4)
        if want_grad:
            ctx.save_for_backward(q, k, v, eta, ln_weight, ln_bias, coeffs, ws)
        ctx.mini_batch_size = mini_batch_size
        return o, w_end, pend

    @staticmethod
    def backward(ctx, do, dw_end, dpend):
        q, k, v, eta, ln_weight, ln_bias, coeffs, ws = ctx.saved_tensors
        B, T, H, D, NB, BT, BD = _launch_args(q, eta, ctx.mini_batch_size)
        f32 = dict(dtype=torch.float32, device=q.device)
        do = torch.zeros_like(q) if do is None else do.contiguous()
        dw_end = torch.zeros((B, H, D + 1, D), **f32) if dw_end is None else dw_end.float().contiguous()
        dpend = torch.zeros((B, H, D + 1, D), **f32) if dpend is None else dpend.float().contiguous()
        dq, dk, dv = (empty_output(q.shape, q.dtype, q.device) for _ in range(3))
        deta = empty_output((B, T, H), torch.float32, q.device)
        dw0 = empty_output((B, H, D + 1, D), torch.float32, q.device)
        dlw, dlb = (empty_output((B, H, D), torch.float32, q.device) for _ in range(2))
        dc = torch.zeros((B, H, BT), **f32)
        _ttt_bwd[(B, H)](q, k, v, eta, ln_weight, ln_bias, coeffs, ws, do, dw_end, dpend, dq, dk, dv, deta, dw0,
                         dlw, dlb, dc, T, NB, H=H, D=D, MB=ctx.mini_batch_size, BT=BT,
                         BD=BD, EPS=LN_EPS, PREC=buffer_dot_precision(q.dtype), num_warps=8)
        dc = dc.sum((0, 1))[:ctx.mini_batch_size]
        return (dq, dk, dv, deta.to(eta.dtype), dlw.sum(0).to(ln_weight.dtype), dlb.sum(0).to(ln_bias.dtype), dw0,
                dc.to(coeffs.dtype), None)


def ttt_linear_fused(q, k, v, eta, ln_weight, ln_bias, w0, coeffs, mini_batch_size: int):
    """TTT-Linear from a mini-batch boundary with nothing pending, on Triton.

    q, k, v `[B, T, H, D]`, eta `[B, T, H]`, ln_weight, ln_bias `[H, D]`,
    w0: the inner weights with the bias as last row `[B, H, D + 1, D]` float32, coeffs: the token weights c_i
    `[mini_batch_size]`. Returns o `[B, T, H, D]`, the weights after the last complete mini-batch and the pending
    sum of a trailing partial one (zero if none), both `[B, H, D + 1, D]` float32."""
    q, k, v, eta = (t.contiguous() for t in (q, k, v, eta))
    return _TTTLinearFused.apply(q, k, v, eta, ln_weight.contiguous(), ln_bias.contiguous(),
                                 w0.float().contiguous(), coeffs.contiguous(), mini_batch_size)
