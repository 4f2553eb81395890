"""Triton backward kernels of the chunkwise gated recurrence (forward and notation: chunk.py, chunk_torch.py).

Per chunk, with x the forward's values (beta v, or U - W h_c for delta rules), A = tril(q k^T * D) the
forward's scores, h = h_c and dh = dL/dh_{c+1}:
- `_state_bwd`: the reverse scan over chunks, dh_c = e^{Gc_last} dh_{c+1} + scale (q e^{Gc})^T do
  [- W^T dx for delta rules, where it completes dx = dx_intra + (k e^{Gc_last - Gc}) dh_{c+1}].
- `_bwd_dx`: dA = scale tril(do x^T) (stored) and dx = scale A^T do [+ (k e^{Gc_last - Gc}) dh]; without the
  delta rule dv = beta dx and dbeta = sum(dx v).
- `_bwd_dqk`: dq = scale (do h^T) e^{Gc} + (dA * D) k, dk = (x dh^T) e^{Gc_last - Gc} + (dA * D)^T q,
  [dW = -dx h^T], and the gradient of the cumulative gates dGc = q dq - k dk per row, plus a per-chunk part
  e^{Gc_last} sum_v(h dh) + sum_j k_j (dk_state)_j that the chunk's last gate hands to every row.
  Vector gates work in 16-row blocks, relative to reference rows as in the forward (`_diag_acc` on the diagonal).
- `_wy_bwd` (delta rules): through W = A (beta k e^{Gc}), U = A (beta v), A = (I + L)^{-1}:
  dL = -A^T dA A^T (strictly lower), L_ij = beta_i (k_i . k_j) e^{Gc_i - Gc_j}.
Finally `_chunk_cumsum` (reversed, plus the per-chunk part) turns dGc into dg: gates stay in log space.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..hardware._flash_common import _dot
from .chunk import _decay_state, _gate_last, _gate_rows, _mild, _put, _row, _tile, _to_end


@triton.jit
def _diag_acc(b_m, b_g, live, p, gc, r0, t1, i_h, ok, H: tl.constexpr, K: tl.constexpr, BQ: tl.constexpr,
              LOWER: tl.constexpr):
    """On a diagonal block of a vector gate, one row of p at a time (exponents <= 0 whatever the decay):
    LOWER: sum_{j<=i} m_ij p_j e^{Gc_i - Gc_j} (dq from dA and k); else sum_{i>=j} m_ij p_i e^{Gc_i - Gc_j}
    (dk from dA and q), for the block's rows."""
    ci = tl.arange(0, BQ)
    acc = tl.zeros_like(b_g)
    for jj in range(0, BQ):
        b_p, b_gj = _row(p, r0 + jj, t1, i_h, ok, H, K), _row(gc, r0 + jj, t1, i_h, ok, H, K)
        if LOWER:
            w = tl.sum(tl.where(ci[None, :] == jj, b_m, 0.0), 1)
            e = tl.exp(tl.where((live & (ci >= jj))[:, None], b_g - b_gj[None, :], -float("inf")))
        else:
            w = tl.sum(tl.where(ci[:, None] == jj, b_m, 0.0), 0)
            e = tl.exp(tl.where((live & (ci <= jj))[:, None], b_gj[None, :] - b_g, -float("inf")))
        acc += w[:, None] * b_p[None, :] * e
    return acc


@triton.jit
def _state_bwd(q, k, w, gc, do, dxi, dx, dh, dht, dh0, cu, first, scale, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
               DELTA: tl.constexpr, USE_DHT: tl.constexpr, PREC: tl.constexpr):
    """dh[n] = gradient of the state after chunk n; dh0 = gradient of the initial state."""
    i_kv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # without the delta rule the rows of the state are independent: programs may split Dk too (BK < K)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    bos, eos, n0 = tl.load(cu + i_s), tl.load(cu + i_s + 1), tl.load(first + i_s)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    m_kv = (ok[:, None] < K) & (ov[None, :] < V)
    p_kv = (i_h * K + ok[:, None]) * V + ov[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_s * H * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    # each chunk's last cumulative gate, and with the delta rule its dx part, are loaded one chunk ahead: both
    # are on the loop's sequential path, and the compiler left their loads in the loop (sm_90a: the exp and the
    # add that use them followed them closely)
    last_chunk = tl.cdiv(eos - bos, BT) - 1
    if GATE != 0:
        g_last_next = _gate_last(gc, tl.maximum(eos - 1, 0), i_h, ok, H, K, GATE)
    if DELTA:
        rows_next = bos + last_chunk * BT + tl.arange(0, BT)
        dxi_next = _tile(dxi, rows_next, (rows_next < eos) & (rows_next >= bos), i_h, ov, H, V)
    for i in range(last_chunk, -1, -1):
        rows = bos + i * BT + tl.arange(0, BT)
        live = rows < eos
        if GATE != 0:
            g_last = g_last_next
            g_last_next = _gate_last(gc, tl.maximum(bos + i * BT - 1, bos), i_h, ok, H, K, GATE)  # chunk i - 1's
        if DELTA:
            b_dxi = dxi_next
            rows_next = rows - BT
            dxi_next = _tile(dxi, rows_next, rows_next >= bos, i_h, ov, H, V)
        tl.store(dh + (n0 + i).to(tl.int64) * H * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        b_q = _tile(q, rows, live, i_h, ok, H, K).to(tl.float32)
        b_do = _tile(do, rows, live, i_h, ov, H, V)
        if GATE != 0:
            b_g = _gate_rows(gc, rows, live, i_h, ok, H, K, GATE)
            if GATE == 1:
                b_q = b_q * tl.exp(b_g)[:, None]
            else:
                b_q = b_q * tl.exp(b_g)
        if DELTA:
            b_k = _tile(k, rows, live, i_h, ok, H, K)
            b_w = _tile(w, rows, live, i_h, ok, H, K)
            if GATE != 0:
                b_k = _to_end(b_k.to(tl.float32), b_g, g_last, live, GATE).to(b_w.dtype)
            b_dx = b_dxi + _dot(b_k, b_dh.to(b_k.dtype), None, PREC)
            _put(dx, b_dx, rows, live, i_h, ov, H, V)  # the full dx = dU, for _bwd_dqk and _wy_bwd
        if GATE != 0:
            b_dh = _decay_state(b_dh, g_last, GATE)
        b_dh += _dot(tl.trans((b_q * scale).to(b_do.dtype)), b_do, None, PREC)
        if DELTA:
            b_dh -= _dot(tl.trans(b_w), b_dx.to(b_w.dtype), None, PREC)
    tl.store(dh0 + i_s * H * K * V + p_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


@triton.jit
def _bwd_dx(a, k, v, x, beta, gc, do, dh, dx, da, dbeta, start, end, scale, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
            DELTA: tl.constexpr, USE_BETA: tl.constexpr, PREC: tl.constexpr):
    n, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + n), tl.load(end + n)
    rows = t0 + tl.arange(0, BT)
    live = rows < t1
    r = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    tril = (r[:, None] >= r[None, :]) & live[:, None]
    b_a = tl.load(a + (rows[:, None] * H + i_h) * BT + r[None, :], mask=tril, other=0.0)
    if not DELTA:  # the state part of dx; for delta rules _state_bwd adds it (it needs dx for dh)
        b_k = _tile(k, rows, live, i_h, ok, H, K).to(tl.float32)
        if GATE != 0:
            b_g = _gate_rows(gc, rows, live, i_h, ok, H, K, GATE)
            g_last = _gate_last(gc, t1 - 1, i_h, ok, H, K, GATE)
            b_k = _to_end(b_k, b_g, g_last, live, GATE)
    if USE_BETA:
        b_b = tl.load(beta + rows * H + i_h, mask=live, other=0.0).to(tl.float32)
        b_db = tl.zeros([BT], dtype=tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        b_do = _tile(do, rows, live, i_h, ov, H, V)
        b_da += _dot(b_do, tl.trans(_tile(x, rows, live, i_h, ov, H, V).to(b_do.dtype)), None, PREC)
        b_dx = _dot(tl.trans(b_a).to(b_do.dtype), b_do, None, PREC) * scale
        if DELTA:
            _put(dx, b_dx, rows, live, i_h, ov, H, V)
        else:
            b_dh = tl.load(dh + n.to(tl.int64) * H * K * V + (i_h * K + ok[:, None]) * V + ov[None, :],
                           mask=(ok[:, None] < K) & (ov[None, :] < V), other=0.0)
            b_dx += _dot(b_k, b_dh, None, PREC)
            if USE_BETA:  # x = beta v
                b_db += tl.sum(b_dx * _tile(v, rows, live, i_h, ov, H, V).to(tl.float32), 1)
                b_dx = b_dx * b_b[:, None]
            _put(dx, b_dx, rows, live, i_h, ov, H, V)  # dv
    _put(da, tl.where(tril, b_da * scale, 0.0), rows, live, i_h, r, H, BT)
    if USE_BETA:
        tl.store(dbeta + rows * H + i_h, b_db.to(dbeta.dtype.element_ty), mask=live)


@triton.jit
def _bwd_dqk(q, k, x, gc, h, dh, do, dx, da, dq, dk, dw, dgc, dgl, start, end, scale, H: tl.constexpr,
             K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr, PREC: tl.constexpr):
    # every output is per key channel: programs split Dk (axis 2, BK channels each); the scalar gate's sums
    # over channels are left in NK parts (dgc [T, H, NK], dgl's parts) and added by the caller
    i_nb, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NK = tl.num_programs(2)
    n, b = i_nb // (BT // BQ), i_nb % (BT // BQ)
    t0, t1 = tl.load(start + n), tl.load(end + n)
    ok = i_k * BK + tl.arange(0, BK)
    rb = t0 + b * BQ + tl.arange(0, BQ)
    lb = rb < t1
    b_q = _tile(q, rb, lb, i_h, ok, H, K)
    b_k = _tile(k, rb, lb, i_h, ok, H, K)
    b_dq = tl.zeros([BQ, BK], dtype=tl.float32)
    b_dk = tl.zeros([BQ, BK], dtype=tl.float32)
    b_dw = tl.zeros([BQ, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    p_h = n.to(tl.int64) * H * K * V + (i_h * K + ok[:, None]) * V
    for i_v in range(0, tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        m_kv = (ok[:, None] < K) & (ov[None, :] < V)
        b_h = tl.load(h + p_h + ov[None, :], mask=m_kv, other=0.0).to(tl.float32)
        b_dh = tl.load(dh + p_h + ov[None, :], mask=m_kv, other=0.0)
        b_dq += _dot(_tile(do, rb, lb, i_h, ov, H, V).to(tl.float32), tl.trans(b_h), None, PREC)
        b_dk += _dot(_tile(x, rb, lb, i_h, ov, H, V).to(tl.float32), tl.trans(b_dh), None, PREC)
        if DELTA:  # x = U - W h
            b_dw -= _dot(_tile(dx, rb, lb, i_h, ov, H, V), tl.trans(b_h), None, PREC)
        if GATE != 0:
            b_hdh += tl.sum(b_h * b_dh, 1)
    b_dq *= scale
    if GATE != 0:
        b_g = _gate_rows(gc, rb, lb, i_h, ok, H, K, GATE)
        g_last = _gate_last(gc, t1 - 1, i_h, ok, H, K, GATE)
        if GATE == 1:
            b_dq *= tl.exp(b_g)[:, None]
        else:
            b_dq *= tl.exp(b_g)
        b_dk = _to_end(b_dk, b_g, g_last, lb, GATE)
        b_c = tl.sum(b_k.to(tl.float32) * b_dk, 0) + tl.where(b == 0, tl.exp(g_last) * b_hdh, 0.0)
    if GATE != 2:  # one block of BT rows: the decay is a matrix
        r = tl.arange(0, BT)
        tril = (r[:, None] >= r[None, :]) & lb[:, None]
        b_da = tl.load(da + (rb[:, None] * H + i_h) * BT + r[None, :], mask=tril, other=0.0)
        if GATE == 1:
            b_da *= tl.exp(tl.where(tril, b_g[:, None] - b_g[None, :], -float("inf")))
        b_dq += _dot(b_da, b_k.to(tl.float32), None, PREC)
        b_dk += _dot(tl.trans(b_da), b_q.to(tl.float32), None, PREC)
    else:  # blocks of BQ rows, off-diagonal decays through the key block's last row (both factors <= 1)
        cb = tl.arange(0, BQ)
        for j in range(0, b):
            rj = t0 + j * BQ + cb
            # (rows clamped to the chunk: this program's block may lie past a short last chunk)
            ref = _gate_last(gc, tl.minimum(t0 + j * BQ + BQ, t1) - 1, i_h, ok, H, K, GATE)
            b_kj = _tile(k, rj, rj < t1, i_h, ok, H, K).to(tl.float32)
            b_kj *= tl.exp(ref[None, :] - _gate_rows(gc, rj, rj < t1, i_h, ok, H, K, GATE))
            b_dqj = _dot(_tile(da, rb, lb, i_h, j * BQ + cb, H, BT), b_kj, None, PREC)
            b_dq += b_dqj * tl.exp(tl.where(lb[:, None], b_g - ref[None, :], 0.0))
        ref = _gate_last(gc, tl.minimum(t0 + b * BQ + BQ, t1) - 1, i_h, ok, H, K, GATE)
        b_dki = tl.zeros([BQ, BK], dtype=tl.float32)
        for i in range(b + 1, tl.cdiv(t1 - t0, BQ)):
            ri = t0 + i * BQ + cb
            li = ri < t1
            b_qi = _tile(q, ri, li, i_h, ok, H, K).to(tl.float32)
            b_qi *= tl.exp(tl.where(li[:, None], _gate_rows(gc, ri, li, i_h, ok, H, K, GATE) - ref[None, :], 0.0))
            b_dki += _dot(tl.trans(_tile(da, ri, li, i_h, b * BQ + cb, H, BT)), b_qi, None, PREC)
        b_dk += b_dki * tl.exp(tl.where(lb[:, None], ref[None, :] - b_g, 0.0))
        b_dab = _tile(da, rb, lb, i_h, b * BQ + cb, H, BT)
        if _mild(gc, t0 + b * BQ, t1, i_h, ok, H, K, BQ):  # as the forward: through the block's first row
            ref = _gate_last(gc, tl.minimum(t0 + b * BQ, t1 - 1), i_h, ok, H, K, GATE)
            b_up = tl.exp(tl.where(lb[:, None], b_g - ref[None, :], 0.0))  # <= 1
            b_down = tl.exp(tl.where(lb[:, None], ref[None, :] - b_g, 0.0))  # < e^{60}
            b_dq += b_up * _dot(b_dab, b_k.to(tl.float32) * b_down, None, PREC)
            b_dk += b_down * _dot(tl.trans(b_dab), b_q.to(tl.float32) * b_up, None, PREC)
        else:
            b_dq += _diag_acc(b_dab, b_g, lb, k, gc, t0 + b * BQ, t1, i_h, ok, H, K, BQ, True)
            b_dk += _diag_acc(b_dab, b_g, lb, q, gc, t0 + b * BQ, t1, i_h, ok, H, K, BQ, False)
    _put(dq, b_dq, rb, lb, i_h, ok, H, K)
    _put(dk, b_dk, rb, lb, i_h, ok, H, K)
    if DELTA:
        _put(dw, b_dw, rb, lb, i_h, ok, H, K)
    if GATE != 0:
        b_dg = b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk
        if GATE == 1:
            tl.store(dgc + (rb * H + i_h) * NK + i_k, tl.sum(b_dg, 1), mask=lb)
            tl.store(dgl + ((n * (BT // BQ) + b) * NK + i_k) * H + i_h, tl.sum(b_c, 0))
        else:
            _put(dgc, b_dg, rb, lb, i_h, ok, H, K)
            tl.store(dgl + ((n * (BT // BQ) + b) * H + i_h) * K + ok, b_c, mask=ok < K)


@triton.jit
def _wy_bwd(k, v, beta, gc, aw, dw, dx, dk32, dgc, dk, dv, dbeta, dgw, start, end, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
            PREC: tl.constexpr):
    n, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + n), tl.load(end + n)
    rows = t0 + tl.arange(0, BT)
    live = rows < t1
    r = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    strict = r[:, None] > r[None, :]
    b_A = tl.load(aw + (rows[:, None] * H + i_h) * BT + r[None, :], mask=live[:, None] & (r[:, None] >= r[None, :]),
                  other=0.0).to(tl.float32)
    b_k = _tile(k, rows, live, i_h, ok, H, K).to(tl.float32)
    b_b = tl.load(beta + rows * H + i_h, mask=live, other=0.0).to(tl.float32)
    b_eg = tl.full([BT], 1.0, tl.float32)
    if GATE != 0:
        b_g = _gate_rows(gc, rows, live, i_h, ok, H, K, GATE)
        b_eg = tl.exp(b_g)
    # W = A (beta k e^{Gc})
    b_dW = _tile(dw, rows, live, i_h, ok, H, K)
    b_dkbg = _dot(tl.trans(b_A), b_dW, None, PREC)
    b_dA = _dot(b_dW, tl.trans(b_k * (b_b * b_eg)[:, None]), None, PREC)
    b_db = tl.sum(b_dkbg * b_k, 1) * b_eg
    b_dg = b_db * b_b
    b_dk = b_dkbg * (b_b * b_eg)[:, None]
    # U = A (beta v)
    for i_v in range(0, tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        b_dU = _tile(dx, rows, live, i_h, ov, H, V)
        b_v = _tile(v, rows, live, i_h, ov, H, V).to(tl.float32)
        b_dA += _dot(b_dU, tl.trans(b_v * b_b[:, None]), None, PREC)
        b_dvb = _dot(tl.trans(b_A), b_dU, None, PREC)
        b_db += tl.sum(b_dvb * b_v, 1)
        _put(dv, b_dvb * b_b[:, None], rows, live, i_h, ov, H, V)
    # A = (I + L)^{-1}: dL = -A^T dA A^T on the strictly lower part; L_ij = beta_i (k_i . k_j) e^{Gc_i - Gc_j}
    b_m = -_dot(tl.trans(b_A), _dot(b_dA, tl.trans(b_A), None, PREC), None, PREC)
    if GATE != 0:
        b_m *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], -float("inf")))
    b_m = tl.where(strict, b_m, 0.0)
    b_dk += b_b[:, None] * _dot(b_m, b_k, None, PREC) + _dot(tl.trans(b_m), b_k * b_b[:, None], None, PREC)
    b_mk = b_m * _dot(b_k, tl.trans(b_k), None, PREC)
    b_db += tl.sum(b_mk, 1)
    _put(dk, b_dk + _tile(dk32, rows, live, i_h, ok, H, K), rows, live, i_h, ok, H, K)
    tl.store(dbeta + rows * H + i_h, b_db.to(dbeta.dtype.element_ty), mask=live)
    if GATE != 0:
        b_mk *= b_b[:, None]
        b_dg += tl.sum(b_mk, 1) - tl.sum(b_mk, 0)
        tl.store(dgw + rows * H + i_h, tl.load(dgc + rows * H + i_h, mask=live, other=0.0) + b_dg, mask=live)
