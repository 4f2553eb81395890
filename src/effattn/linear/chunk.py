"""Triton chunkwise kernels of the gated recurrence, shared by every gate type (see chunk_torch.py for the math).

One set of kernels for all gates, selected by constexpr GATE (0 none, 1 scalar per head, 2 vector per key
channel) and DELTA (delta rule, WY representation):
- `_chunk_cumsum`: chunk-local cumulative log gates in float32 (forward) / reversed (their gradient). The
  forward kernels take a scalar gate raw and cumulate it per chunk themselves (`_scalar_cumsum`); only vector
  gates, and the backward, read a precomputed cumsum.
- `_wy_fwd`: delta rules only, W = A (beta k e^{Gc}) and U = A (beta v) per chunk, A by forward substitution
  (A is kept for the backward).
- `_state_fwd`: the one sequential kernel, h_{c+1} = e^{Gc_last} h_c + (k e^{Gc_last - Gc})^T x with
  x = u, or x = U - W h_c (delta); stores every h_c (and x for delta rules).
- `_chunk_output`: o = scale [(q e^{Gc}) h_c + tril(q k^T * D) x]; vector gates go in sub-blocks of 16 rows
  whose decays are taken relative to a row inside the pair of blocks, so no exponent is positive across
  blocks; diagonal blocks relative to their first row while their decay is mild (`_mild`, < e^{60}), else one
  key column at a time with exponents Gc_i - Gc_j <= 0 (`_diag_scores`): no decay, however strong, overflows. With STORE_A it keeps the scores tril(q k^T * D) for the backward.
The backward kernels are in chunk_bwd.py.
Every kernel indexes packed tokens `[T, H, D]` through chunk tables (varlen is the only layout).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..hardware._flash_common import _dot  # a @ b in fp32; PREC "upcast" works around the interpreter's 16-bit dot


@triton.jit
def _gate_rows(gc, rows, live, i_h, ok, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """Cumulative log gates of `rows`: `[R]` (scalar) or `[R, BK]` (vector); 0 for dead rows / no gate."""
    if GATE == 1:
        return tl.load(gc + rows * H + i_h, mask=live, other=0.0)
    else:
        return tl.load(gc + (rows[:, None] * H + i_h) * K + ok[None, :], mask=live[:, None] & (ok[None, :] < K),
                       other=0.0)


@triton.jit
def _scalar_cumsum(g, rows, live, i_h, H: tl.constexpr):
    """Chunk-local cumulative scalar log gates `[BT]` in float32 from the raw gates of a whole chunk's rows
    (the forward kernels fold this in rather than reading a precomputed cumsum: one launch fewer)."""
    return tl.cumsum(tl.load(g + rows * H + i_h, mask=live, other=0.0).to(tl.float32), 0)


@triton.jit
def _gate_last(gc, row, i_h, ok, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """Cumulative log gate of one row, shaped to scale state rows: scalar or `[BK]`."""
    if GATE == 1:
        return tl.load(gc + row * H + i_h)
    else:
        return tl.load(gc + (row * H + i_h) * K + ok, mask=ok < K, other=0.0)


@triton.jit
def _to_end(b_k, b_g, g_last, live, GATE: tl.constexpr):
    """k_j e^{Gc_last - Gc_j}: the weight of key j in the state at the chunk's end (<= 1, never overflows)."""
    if GATE == 1:
        return b_k * tl.exp(tl.where(live, g_last - b_g, 0.0))[:, None]
    else:
        return b_k * tl.exp(tl.where(live[:, None], g_last[None, :] - b_g, 0.0))


@triton.jit
def _decay_state(b_h, g_last, GATE: tl.constexpr):
    if GATE == 1:
        return b_h * tl.exp(g_last)
    else:
        return b_h * tl.exp(g_last)[:, None]

@triton.jit
def _tile(p, rows, live, i_h, oc, H: tl.constexpr, D: tl.constexpr):
    """Rows of packed `[T, H, D]` at head i_h, columns oc (0 outside)."""
    return tl.load(p + (rows[:, None] * H + i_h) * D + oc[None, :], mask=live[:, None] & (oc[None, :] < D), other=0.0)


@triton.jit
def _put(p, val, rows, live, i_h, oc, H: tl.constexpr, D: tl.constexpr):
    tl.store(p + (rows[:, None] * H + i_h) * D + oc[None, :], val.to(p.dtype.element_ty),
             mask=live[:, None] & (oc[None, :] < D))


@triton.jit
def _row(p, r, t1, i_h, ok, H: tl.constexpr, K: tl.constexpr):
    """Row r `[BK]` of packed `[T, H, K]` in float32, 0 past the chunk's end t1."""
    return tl.load(p + (r * H + i_h) * K + ok, mask=(ok < K) & (r < t1), other=0.0).to(tl.float32)


@triton.jit
def _mild(gc, r0, t1, i_h, ok, H: tl.constexpr, K: tl.constexpr, BQ: tl.constexpr):
    """Whether a vector gate decays by less than e^{60} in every channel over the block of rows r0..r0+BQ-1:
    then factors e^{+-(Gc - Gc_r0)} through its first row stay far from float32 (and bf16) overflow."""
    g0 = _row(gc, r0, t1, i_h, ok, H, K)
    g1 = _row(gc, tl.minimum(r0 + BQ, t1) - 1, t1, i_h, ok, H, K)
    return tl.max(g0 - g1, 0) < 60.0


@triton.jit
def _diag_scores(b_q, b_gq, lq, k, gc, r0, t1, i_h, ok, H: tl.constexpr, K: tl.constexpr, BQ: tl.constexpr):
    """sum_d q_id k_jd e^{Gc_id - Gc_jd} (j <= i) on a diagonal block of a vector gate, one key column at a
    time: every exponent is <= 0, whatever the decay (factorised through a reference row it would overflow
    float32 once a block's log decay passes -88)."""
    ci = tl.arange(0, BQ)
    b_a = tl.zeros([BQ, BQ], dtype=tl.float32)
    for jj in range(0, BQ):
        b_kj, b_gj = _row(k, r0 + jj, t1, i_h, ok, H, K), _row(gc, r0 + jj, t1, i_h, ok, H, K)
        e = tl.exp(tl.where((lq & (ci >= jj))[:, None], b_gq - b_gj[None, :], -float("inf")))
        b_a = tl.where(ci[None, :] == jj, tl.sum(b_q * b_kj[None, :] * e, 1)[:, None], b_a)
    return b_a


@triton.jit
def _chunk_cumsum(g, out, bias, start, end, H: tl.constexpr, KG: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr,
                  REVERSE: tl.constexpr, NB: tl.constexpr):
    """out = chunk-local (reverse) cumsum of g, plus the sum of NB per-chunk parts of `bias` `[N, NB, H, KG]`
    (the backward's gradient of the chunk's last cumulative gate, which reaches every row of the chunk)."""
    n, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + n), tl.load(end + n)
    rows = t0 + tl.arange(0, BT)
    cols = tl.arange(0, BG)
    live = (rows[:, None] < t1) & (cols[None, :] < KG)
    ptr = (rows[:, None] * H + i_h) * KG + cols[None, :]
    b_c = tl.cumsum(tl.load(g + ptr, mask=live, other=0.0).to(tl.float32), axis=0, reverse=REVERSE)
    if NB > 0:
        for i in range(0, NB):
            b_c += tl.load(bias + ((n * NB + i) * H + i_h) * KG + cols, mask=cols < KG, other=0.0)[None, :]
    tl.store(out + ptr, b_c.to(out.dtype.element_ty), mask=live)


@triton.jit
def _wy_fwd(k, v, beta, g, w, u, aw, start, end, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, PREC: tl.constexpr):
    n, i_h = tl.program_id(0), tl.program_id(1)
    t0, t1 = tl.load(start + n), tl.load(end + n)
    rows = t0 + tl.arange(0, BT)
    live = rows < t1
    ok = tl.arange(0, BK)
    b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ok[None, :], mask=live[:, None] & (ok[None, :] < K), other=0.0)
    b_b = tl.load(beta + rows * H + i_h, mask=live, other=0.0).to(tl.float32)
    r = tl.arange(0, BT)
    strict = r[:, None] > r[None, :]
    b_L = _dot((b_k.to(tl.float32) * b_b[:, None]).to(b_k.dtype), tl.trans(b_k), None, PREC)  # beta_i k_i . k_j
    b_wk = b_b  # the weight of row i of k in W: beta_i (e^{Gc_i} with a gate)
    if GATE == 1:
        b_g = _scalar_cumsum(g, rows, live, i_h, H)
        b_L = b_L * tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], -float("inf")))
        b_wk = b_b * tl.exp(b_g)
    b_L = tl.where(strict, b_L, 0.0)
    # A = (I + L)^{-1} in two steps (16-row blocks, as FLA's solve_tril): (1) the block-diagonal inverse
    # Ad = (I + Ld)^{-1} by forward substitution on the NB diagonal 16 x 16 blocks of L at once, held in
    # registers as [NB, 16, 16]; (2) I + L = (I + Ld)(I + N) with N = Ad Lo strictly block-lower,
    # N^NB = 0, so A = (I + N)^{-1} Ad = (I - N)(I + N^2)(I + N^4)... Ad: log2(NB) factors, each one dot
    # (and one squaring of N beside it), 3 dots deep at NB = 4 where the series I - N + N^2 - N^3 took 5.
    NB: tl.constexpr = BT // 16
    c = tl.arange(0, 16)
    bi = tl.arange(0, NB)
    diag = bi[:, None, None, None] == bi[None, None, :, None]  # [NB, 1, NB, 1]: row block == column block
    b_Ld = tl.sum(tl.where(diag, tl.reshape(b_L, [NB, 16, NB, 16]), 0.0), 2)  # [NB, 16, 16]
    # rows i of X = (I + Ld)^{-1} - I in order: X_i = a + sum_{j<i} a_j X_j with a = -Ld_i (columns j < i);
    # rows 0 and 1 are -Ld's already
    b_X = -b_Ld
    for i in range(2, 16):
        pick = (c == i)[None, :, None]
        a = tl.where((c < i)[None, :], tl.sum(tl.where(pick, b_X, 0.0), 1), 0.0)  # row i of X is still -Ld_i
        a += tl.sum(a[:, :, None] * b_X, 1)
        b_X = tl.where(pick, a[:, None, :], b_X)
    b_X += tl.where(c[:, None] == c[None, :], 1.0, 0.0)[None, :, :]
    b_Ad = tl.reshape(tl.where(diag, b_X[:, :, None, :], 0.0), [BT, BT])
    b_A = b_Ad
    if NB > 1:
        same = (r // 16)[:, None] == (r // 16)[None, :]
        b_P = _dot(b_Ad, tl.where(same, 0.0, b_L), None, PREC)  # N
        b_A -= _dot(b_P, b_A, None, PREC)
        for j in tl.static_range(1, 7):  # the factors I + N^(2^j) while 2^j < NB (chunks up to 2048 rows)
            if (1 << j) < NB:
                b_P = _dot(b_P, b_P, None, PREC)
                b_A += _dot(b_P, b_A, None, PREC)
    b_A = b_A.to(b_k.dtype)
    _put(aw, b_A, rows, live, i_h, r, H, BT)  # for the backward
    # k loaded again (from L2) rather than held through the solve, in BV-wide column slices as v: fewer
    # registers live at once
    for i_k in range(0, tl.cdiv(K, BV)):
        oc = i_k * BV + tl.arange(0, BV)
        m = live[:, None] & (oc[None, :] < K)
        p_kc = (rows[:, None] * H + i_h) * K + oc[None, :]
        b_kw = (tl.load(k + p_kc, mask=m, other=0.0).to(tl.float32) * b_wk[:, None]).to(b_k.dtype)
        tl.store(w + p_kc, _dot(b_A, b_kw, None, PREC).to(w.dtype.element_ty), mask=m)
    for i_v in range(0, tl.cdiv(V, BV)):
        ov = i_v * BV + tl.arange(0, BV)
        m = live[:, None] & (ov[None, :] < V)
        b_v = tl.load(v + (rows[:, None] * H + i_h) * V + ov[None, :], mask=m, other=0.0)
        b_u = _dot(b_A, (b_v.to(tl.float32) * b_b[:, None]).to(b_v.dtype), None, PREC)
        tl.store(u + (rows[:, None] * H + i_h) * V + ov[None, :], b_u.to(u.dtype.element_ty), mask=m)


@triton.jit
def _state_fwd(k, u, w, g, h, x, h0, ht, cu, first, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr, DELTA: tl.constexpr,
               USE_H0: tl.constexpr, STORE_HT: tl.constexpr, RAW_G: tl.constexpr, PREC: tl.constexpr):
    """Chunk states h_c `[N, H, K, V]` of each sequence in order; a scalar gate g is raw with RAW_G, else
    (and a vector gate always) its chunk-local cumsum."""
    i_kv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # without the delta rule the rows of the state are independent: programs may split Dk too (BK < K)
    i_k, i_v = i_kv // tl.cdiv(V, BV), i_kv % tl.cdiv(V, BV)
    bos, eos, n0 = tl.load(cu + i_s), tl.load(cu + i_s + 1), tl.load(first + i_s)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    m_kv = (ok[:, None] < K) & (ov[None, :] < V)
    p_kv = (i_h * K + ok[:, None]) * V + ov[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_s * H * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    # a loaded gate's value at each chunk's last row is loaded one chunk ahead: it decays the state, the loop's
    # sequential path, and the compiler left its load in the loop
    LOADED_LAST: tl.constexpr = (GATE == 2) | ((GATE == 1) & (not RAW_G))
    if LOADED_LAST:
        g_last_next = _gate_last(g, tl.maximum(tl.minimum(bos + BT, eos) - 1, 0), i_h, ok, H, K, GATE)
    for i in range(0, tl.cdiv(eos - bos, BT)):
        rows = bos + i * BT + tl.arange(0, BT)
        live = rows < eos
        if LOADED_LAST:
            g_last = g_last_next
            g_last_next = _gate_last(g, tl.minimum(bos + i * BT + 2 * BT, eos) - 1, i_h, ok, H, K, GATE)
        tl.store(h + (n0 + i).to(tl.int64) * H * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        m_k = live[:, None] & (ok[None, :] < K)
        m_v = live[:, None] & (ov[None, :] < V)
        b_k = tl.load(k + (rows[:, None] * H + i_h) * K + ok[None, :], mask=m_k, other=0.0)
        b_x = tl.load(u + (rows[:, None] * H + i_h) * V + ov[None, :], mask=m_v, other=0.0).to(tl.float32)
        if DELTA:
            b_w = tl.load(w + (rows[:, None] * H + i_h) * K + ok[None, :], mask=m_k, other=0.0)
            b_x -= _dot(b_w, b_h.to(b_w.dtype), None, PREC)
            tl.store(x + (rows[:, None] * H + i_h) * V + ov[None, :], b_x.to(x.dtype.element_ty), mask=m_v)
        if GATE == 1:  # one weight per row: on x's BV columns, so that k reaches the dot as loaded
            if RAW_G:
                b_g = _scalar_cumsum(g, rows, live, i_h, H)
                g_last = tl.sum(tl.where(rows == tl.minimum(bos + i * BT + BT, eos) - 1, b_g, 0.0))
            else:
                b_g = _gate_rows(g, rows, live, i_h, ok, H, K, GATE)
            b_h = _decay_state(b_h, g_last, GATE)
            b_x = b_x * tl.exp(tl.where(live, g_last - b_g, 0.0))[:, None]
        if GATE == 2:
            b_g = _gate_rows(g, rows, live, i_h, ok, H, K, GATE)
            b_h = _decay_state(b_h, g_last, GATE)
            b_k = _to_end(b_k.to(tl.float32), b_g, g_last, live, GATE).to(b_k.dtype)
        b_h = _dot(tl.trans(b_k), b_x.to(b_k.dtype), b_h, PREC)
    if STORE_HT:
        tl.store(ht + i_s * H * K * V + p_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit
def _chunk_output(q, k, x, g, h, o, a, start, end, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
                  STORE_A: tl.constexpr, PREC: tl.constexpr):
    i_v, i_nq, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i_q = i_nq // (BT // BQ), i_nq % (BT // BQ)
    t0, t1 = tl.load(start + n), tl.load(end + n)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    rq = t0 + i_q * BQ + tl.arange(0, BQ)
    lq = rq < t1
    b_q = _tile(q, rq, lq, i_h, ok, H, K)
    b_h = tl.load(h + n.to(tl.int64) * H * K * V + (i_h * K + ok[:, None]) * V + ov[None, :],
                  mask=(ok[:, None] < K) & (ov[None, :] < V), other=0.0)
    if GATE == 2:
        b_gq = _gate_rows(g, rq, lq, i_h, ok, H, K, GATE)
        b_o = _dot((b_q.to(tl.float32) * tl.exp(b_gq)).to(b_q.dtype), b_h.to(b_q.dtype), None, PREC)
    else:
        b_o = _dot(b_q, b_h.to(b_q.dtype), None, PREC)
        if GATE == 1:  # a row scale commutes with the dot: q reaches it as loaded; BQ = BT, one chunk
            tl.static_assert(BQ == BT, "a scalar gate is cumulated over the whole chunk: BQ must equal BT")
            b_gq = _scalar_cumsum(g, rq, lq, i_h, H)
            b_o *= tl.exp(b_gq)[:, None]
    for j in range(0, i_q + 1):
        rk = t0 + j * BQ + tl.arange(0, BQ)
        lk = rk < t1
        b_k = _tile(k, rk, lk, i_h, ok, H, K)
        b_x = _tile(x, rk, lk, i_h, ov, H, V)
        if GATE == 2:
            # off the diagonal, decays relative to the key block's last row: both factors <= 1; on it, relative
            # to its first row while the block's decay is mild, else exactly, one key column at a time
            if (j < i_q) | _mild(g, t0 + j * BQ, t1, i_h, ok, H, K, BQ):
                # (clamped to the chunk: a dead sub-block past a short last chunk has no live row to refer to)
                ref_row = tl.minimum(tl.where(j < i_q, t0 + j * BQ + BQ - 1, t0 + j * BQ), t1 - 1)
                ref = _gate_last(g, ref_row, i_h, ok, H, K, GATE)
                b_gk = _gate_rows(g, rk, lk, i_h, ok, H, K, GATE)
                qa = b_q.to(tl.float32) * tl.exp(tl.where(lq[:, None], b_gq - ref[None, :], 0.0))
                ka = b_k.to(tl.float32) * tl.exp(tl.where(lk[:, None], ref[None, :] - b_gk, 0.0))
                b_a = _dot(qa.to(b_q.dtype), tl.trans(ka.to(b_k.dtype)), None, PREC)
            else:
                b_a = _diag_scores(b_q.to(tl.float32), b_gq, lq, k, g, t0 + j * BQ, t1, i_h, ok, H, K, BQ)
        else:
            b_a = _dot(b_q, tl.trans(b_k), None, PREC)
            if GATE == 1:  # the one key block is the query block: rk = rq
                b_a *= tl.exp(tl.where(rq[:, None] >= rk[None, :], b_gq[:, None] - b_gq[None, :], -float("inf")))
        b_a = tl.where((rq[:, None] >= rk[None, :]) & lk[None, :], b_a, 0.0).to(b_x.dtype)
        if STORE_A:  # the scores A_ij for the backward (dx = scale A^T do), once per chunk
            if i_v == 0:
                _put(a, b_a, rq, lq, i_h, j * BQ + tl.arange(0, BQ), H, BT)
        b_o += _dot(b_a, b_x, None, PREC)
    _put(o, b_o * scale, rq, lq, i_h, ov, H, V)
