"""Triton forward of RWKV-7's chunkwise form (rwkv7.py's module docstring has the math), in four launches:

1. `_rwkv7_chunk_prep`, one program per (chunk, sequence, head), all chunks at once: the pairwise-decayed
   products A_ab, A_ak, P_rb, P_rk `[C, C]`, the unit lower-triangular solve for W `[C, K]` and U `[C, V]`
   (I - A_ab inverted as a product of log2(C) factors, then two dots), the queries q~ = r e^{Gc} + P_rb W, the
   intra-chunk output P_rb U + P_rk v, the keys decayed to the chunk's end b e^{Gc_C - Gc}, k e^{Gc_C - Gc}
   and the chunk's total decay e^{Gc_C}; float32 buffers. Two launches (`_chunk_products`: factored products
   for mild decays, the exact pairwise ones otherwise).
2. `_rwkv7_super_map`, one program per (super-chunk of SUB chunks, sequence, head), all at once: the
   super-chunk's affine map h -> M h + c (M `[K, K]`, c `[K, V]`), composed from the chunk steps
   h <- e^{Gc_C} h + (b e^{Gc_C - Gc})^T (W h + U) + (k e^{Gc_C - Gc})^T v.
3. `_rwkv7_super_scan`, one program per (value block, sequence, head): h <- M h + c over the super-chunks in
   order (a quarter of the sequential steps, one dot each), storing h at each super-chunk's start.
4. `_rwkv7_chunk_scan`, one program per (value block, super-chunk, sequence, head), all at once: from h at its
   super-chunk's start, its chunks in order, o = scale (q~ h + intra) and the chunk step.

Decays are only ever taken pairwise inside a chunk (exponents masked before exp, or factored about half the
chunk's total where that total is above e^-MILD), as in the PyTorch form, so any log decay w <= 0 is safe.
Under autograd the last scan also stores the state at every chunk's start, and rwkv7_chunk_bwd.py gives the
backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from .._triton_mode import interpreting
from ..hardware._flash_common import cdiv, dot_precision, next_pow2

# chunks whose every channel decays by less than e^-MILD take the factored products (_chunk_products)
MILD = tl.constexpr(40.0)
SUB = 4  # chunks per super-chunk of the sequential state passes
SLICE = 16  # key channels per step of the exact pairwise products: [C, C, SLICE] temporaries (sm_90a, K = V = 64,
# C = 16: the prep at 8 warps compiles to 255 (factored) / 213 (exact) registers without spills)


@triton.jit
def _rows(ptr, t0, T, ch, C: tl.constexpr, W: tl.constexpr, D, stride_t):
    """Rows t0 .. t0 + C of a `[T, D]` view (token stride stride_t), columns ch .. ch + W, zero outside, in
    float32."""
    return _stored_rows(ptr, t0, T, ch, C, W, D, stride_t).to(tl.float32)


@triton.jit
def _stored_rows(ptr, t0, T, ch, C: tl.constexpr, W: tl.constexpr, D, stride_t):
    """`_rows` in the stored dtype: a load one step ahead of use converts at the use, so that nothing in the
    step that issues it waits for it."""
    ot = t0 + tl.arange(0, C)
    oc = ch + tl.arange(0, W)
    m = (ot[:, None] < T) & (oc[None, :] < D)
    return tl.load(ptr + ot[:, None] * stride_t + oc[None, :], mask=m, other=0.0)


@triton.jit
def _state_block(h0, bh, K, N, col0, BK: tl.constexpr, BN: tl.constexpr, USE_H0: tl.constexpr):
    """Columns col0 .. col0 + BN of sequence-head bh's `[K, N]` state, from h0 (`[B H, K, N]` float32) or
    zeros; returns (block `[BK, BN]` float32, its offsets, its in-bounds mask) for the final store."""
    ok = tl.arange(0, BK)
    on = col0 + tl.arange(0, BN)
    mask = (ok[:, None] < K) & (on[None, :] < N)
    offs = (bh * K + ok[:, None]) * N + on[None, :]
    state = tl.zeros([BK, BN], tl.float32)
    if USE_H0:
        state += tl.load(h0 + offs, mask=mask, other=0.0)
    return state, offs, mask


@triton.jit
def _decayed(x, gx, gy, keep):
    """x_id e^{gx_id - gy_jd} `[C, C, SL]` over one channel slice, for (i, j) in keep `[C, C]`, else 0; summed
    against y_jd over d it gives the pairwise-decayed product of rows x_i and y_j."""
    return x[:, None, :] * tl.exp(tl.where(keep[:, :, None], gx[:, None, :] - gy[None, :, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(N, C: tl.constexpr, DOT_PREC: tl.constexpr):
    """(I - N)^{-1} `[C, C]` of a strictly lower N: N^C = 0, so it is (I + N)(I + N^2)(I + N^4)... with log2(C)
    factors, 2 log2(C) - 2 dots and no row-by-row substitution (whose C steps each reduce across warps)."""
    rows = tl.arange(0, C)
    X = N + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    P = N
    for j in tl.static_range(1, 12):  # P = N^(2^j) while 2^j < C (chunks up to 4096 rows)
        if (1 << j) < C:
            P = tl.dot(P, P, input_precision=DOT_PREC)
            X = tl.dot(X, P, X, input_precision=DOT_PREC)
    return X


@triton.jit
def _mild(last):
    """Whether a chunk takes the factored products: every channel's total log decay Gc_C `[BK]` above -MILD."""
    return tl.min(last, 0) > -MILD


@triton.jit
def _chunk_products(r, w, k, a, b, wf, gcf, lastf, base_k, t0, T, K, sk, C: tl.constexpr, BK: tl.constexpr,
                    SL: tl.constexpr, FACTORED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk's pairwise-decayed products A_ab, A_ak (x_i y_j e^{Gp_i - Gc_j}, j < i) and P_rb, P_rk
    (e^{Gc_i - Gc_j}, j <= i) `[C, C]`; wf, gcf `[C, BK]`, lastf `[BK]`: the chunk's log decays, their
    cumulative sums and total. FACTORED (chunks whose every channel decays by less than e^-MILD, `_mild`):
    one dot each on full-width rows, the decays split about half the chunk's total, x e^{G - Gc_C / 2} and
    y e^{Gc_C / 2 - Gc} (every factor within e^{MILD / 2}); else channel slices of SL with the decays taken
    pairwise, exponents masked before exp, exact for any decay."""
    rows = tl.arange(0, C)
    strict = rows[:, None] > rows[None, :]
    causal = rows[:, None] >= rows[None, :]
    if FACTORED:
        ref = 0.5 * lastf[None, :]
        a_q = _rows(a + base_k, t0, T, 0, C, BK, K, sk) * tl.exp(gcf - wf - ref)
        r_q = _rows(r + base_k, t0, T, 0, C, BK, K, sk) * tl.exp(gcf - ref)
        b_q = tl.trans(_rows(b + base_k, t0, T, 0, C, BK, K, sk) * tl.exp(ref - gcf))
        k_q = tl.trans(_rows(k + base_k, t0, T, 0, C, BK, K, sk) * tl.exp(ref - gcf))
        A_ab = tl.where(strict, tl.dot(a_q, b_q, input_precision=DOT_PREC), 0.0)
        A_ak = tl.where(strict, tl.dot(a_q, k_q, input_precision=DOT_PREC), 0.0)
        P_rb = tl.where(causal, tl.dot(r_q, b_q, input_precision=DOT_PREC), 0.0)
        P_rk = tl.where(causal, tl.dot(r_q, k_q, input_precision=DOT_PREC), 0.0)
    else:
        A_ab = tl.zeros([C, C], tl.float32)
        A_ak = tl.zeros([C, C], tl.float32)
        P_rb = tl.zeros([C, C], tl.float32)
        P_rk = tl.zeros([C, C], tl.float32)
        for ch in tl.static_range(0, BK, SL):
            ws = _rows(w + base_k, t0, T, ch, C, SL, K, sk)
            gc = tl.cumsum(ws, 0)
            a_d = _decayed(_rows(a + base_k, t0, T, ch, C, SL, K, sk), gc - ws, gc, strict)  # serves two products
            b_s = _rows(b + base_k, t0, T, ch, C, SL, K, sk)
            k_s = _rows(k + base_k, t0, T, ch, C, SL, K, sk)
            A_ab += tl.sum(a_d * b_s[None, :, :], 2)
            A_ak += tl.sum(a_d * k_s[None, :, :], 2)
            r_d = _decayed(_rows(r + base_k, t0, T, ch, C, SL, K, sk), gc, gc, causal)
            P_rb += tl.sum(r_d * b_s[None, :, :], 2)
            P_rk += tl.sum(r_d * k_s[None, :, :], 2)
    return A_ab, A_ak, P_rb, P_rk


@triton.jit
def _rwkv7_chunk_prep(r, w, k, v, a, b, Wb, Ub, Qb, Ib, Bb, Kb, Lb, T, H, K, V, NT,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SL: tl.constexpr,
                      FACTORED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk's buffers (module docstring); launched twice, FACTORED and not, each program doing its chunk
    only in the launch that matches `_mild` (so each variant compiles with its own registers)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    bb, h = bh // H, bh % H
    t0 = n * C
    sk, sv = H * K, H * V  # token strides of [B, T, H, K] and [B, T, H, V]
    base_k = bb * T * sk + h * K
    base_v = bb * T * sv + h * V
    rows = tl.arange(0, C)
    wf = _rows(w + base_k, t0, T, 0, C, BK, K, sk)
    gc = tl.cumsum(wf, 0)
    last = tl.sum(tl.where(rows[:, None] == C - 1, gc, 0.0), 0)  # Gc_C `[BK]`
    if _mild(last) == FACTORED:
        A_ab, A_ak, P_rb, P_rk = _chunk_products(r, w, k, a, b, wf, gc, last, base_k, t0, T, K, sk, C, BK, SL,
                                                 FACTORED, DOT_PREC)
        af = _rows(a + base_k, t0, T, 0, C, BK, K, sk)
        vf = _rows(v + base_v, t0, T, 0, C, BV, V, sv)
        # (I - A_ab) [W, U] = [a e^{Gp}, A_ak v], A_ab strictly lower
        solve = _unit_lower_inverse(A_ab, C, DOT_PREC)
        Wm = tl.dot(solve, af * tl.exp(gc - wf), input_precision=DOT_PREC)  # a e^{Gp}
        Um = tl.dot(solve, tl.dot(A_ak, vf, input_precision=DOT_PREC), input_precision=DOT_PREC)
        rf = _rows(r + base_k, t0, T, 0, C, BK, K, sk)
        q_t = rf * tl.exp(gc) + tl.dot(P_rb, Wm, input_precision=DOT_PREC)
        intra = tl.dot(P_rb, Um, input_precision=DOT_PREC) + tl.dot(P_rk, vf, input_precision=DOT_PREC)
        to_end = tl.exp(last[None, :] - gc)
        bd = _rows(b + base_k, t0, T, 0, C, BK, K, sk) * to_end
        kd = _rows(k + base_k, t0, T, 0, C, BK, K, sk) * to_end
        ok = tl.arange(0, BK)
        ov = tl.arange(0, BV)
        chunk = bh * NT + n  # buffers: [B H, NT, C, BK | BV], [B H, NT, BK]
        pk = (chunk * C + rows[:, None]) * BK + ok[None, :]
        pv = (chunk * C + rows[:, None]) * BV + ov[None, :]
        tl.store(Wb + pk, Wm)
        tl.store(Qb + pk, q_t)
        tl.store(Bb + pk, bd)
        tl.store(Kb + pk, kd)
        tl.store(Ub + pv, Um)
        tl.store(Ib + pv, intra)
        tl.store(Lb + chunk * BK + ok, tl.exp(last))


@triton.jit
def _chunk_step(state, Wb, Ub, Bb, Kb, Lb, v, chunk, n, base_v, T, H, V, ov, C: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk of the recurrence on a `[BK, SV]` state block (value columns ov): u = W h + U, then
    h <- e^{Gc_C} h + (b e^{Gc_C - Gc})^T u + (k e^{Gc_C - Gc})^T v; returns (h, the buffers' row offsets)."""
    rows = tl.arange(0, C)
    ok = tl.arange(0, BK)
    pk = (chunk * C + rows[:, None]) * BK + ok[None, :]
    pv = (chunk * C + rows[:, None]) * BV + ov[None, :]
    t = n * C + rows
    vt = tl.load(v + base_v + t[:, None] * (H * V) + ov[None, :], mask=(t[:, None] < T) & (ov[None, :] < V),
                 other=0.0).to(tl.float32)
    u = tl.dot(tl.load(Wb + pk), state, input_precision=DOT_PREC) + tl.load(Ub + pv)
    new = tl.load(Lb + chunk * BK + ok)[:, None] * state
    new = tl.dot(tl.trans(tl.load(Bb + pk)), u, new, input_precision=DOT_PREC)
    return tl.dot(tl.trans(tl.load(Kb + pk)), vt, new, input_precision=DOT_PREC), pk, pv


@triton.jit
def _rwkv7_super_map(v, Mb, Cb, Wb, Ub, Bb, Kb, Lb, T, H, K, V, NT, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, SUB: tl.constexpr, DOT_PREC: tl.constexpr):
    """One super-chunk's (SUB chunks') affine map h -> M h + c, one program per (super-chunk, sequence-head), all
    at once: M `[K, K]` = the product of the chunks' diag(e^{Gc_C}) + (b e^{Gc_C - Gc})^T W, c `[K, V]` the
    state at its end from h = 0; into Mb `[NS, B H, K, K]`, Cb `[NS, B H, K, V]`."""
    ns, bh = tl.program_id(0), tl.program_id(1)
    bb, h = bh // H, bh % H
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    M = tl.where(ok[:, None] == ok[None, :], 1.0, 0.0)
    c = tl.zeros([BK, BV], tl.float32)
    base_v = bb * T * H * V + h * V
    for n in range(ns * SUB, tl.minimum(ns * SUB + SUB, NT)):
        chunk = bh * NT + n
        c, pk, pv = _chunk_step(c, Wb, Ub, Bb, Kb, Lb, v, chunk, n, base_v, T, H, V, ov, C, BK, BV, DOT_PREC)
        WM = tl.dot(tl.load(Wb + pk), M, input_precision=DOT_PREC)  # [C, K]
        M = tl.dot(tl.trans(tl.load(Bb + pk)), WM, tl.load(Lb + chunk * BK + ok)[:, None] * M,
                   input_precision=DOT_PREC)
    sp = tl.cast(ns, tl.int64) * tl.num_programs(1) + bh
    tl.store(Mb + (sp * K + ok[:, None]) * K + ok[None, :], M, mask=(ok[:, None] < K) & (ok[None, :] < K))
    tl.store(Cb + (sp * K + ok[:, None]) * V + ov[None, :], c, mask=(ok[:, None] < K) & (ov[None, :] < V))


@triton.jit
def _rwkv7_super_scan(h0, ht, HB, SS, Mb, Cb, K, V, NS, BK: tl.constexpr, SV: tl.constexpr, USE_H0: tl.constexpr,
                      REVERSE: tl.constexpr, DOT_PREC: tl.constexpr):
    """The sequential pass over super-chunks, one program per (value block, sequence-head), a `[BK, SV]` block
    in registers. Forward: h <- M h + c, storing h at each super-chunk's start (HB `[NS, B H, K, V]`, SS =
    B H K V) and the final state (ht). REVERSE (the backward): dh <- M^T dh + g (Cb holding g, the gradient at
    the super-chunk's start from its outputs alone), last super-chunk first, storing dh after each; ht gets
    the initial state's gradient."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    ok = tl.arange(0, BK)
    state, p_state, m_kv = _state_block(h0, bh, K, V, iv * SV, BK, SV, USE_H0)
    for i in range(NS):
        if REVERSE:
            s = NS - 1 - i
        else:
            s = i
        sp = tl.cast(s, tl.int64) * tl.num_programs(1) + bh
        tl.store(HB + tl.cast(s, tl.int64) * SS + p_state, state, mask=m_kv)
        m_kk = (ok[:, None] < K) & (ok[None, :] < K)
        M = tl.load(Mb + (sp * K + ok[:, None]) * K + ok[None, :], mask=m_kk, other=0.0)
        if REVERSE:
            M = tl.trans(M)
        state = tl.dot(M, state, tl.load(Cb + sp * K * V + p_state - bh * K * V, mask=m_kv, other=0.0),
                       input_precision=DOT_PREC)
    tl.store(ht + p_state, state, mask=m_kv)


@triton.jit
def _rwkv7_chunk_scan(v, o, HB, HS, SS, Wb, Ub, Qb, Ib, Bb, Kb, Lb, T, H, K, V, NT, scale,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SV: tl.constexpr, SUB: tl.constexpr,
                      STORE_STATES: tl.constexpr, DOT_PREC: tl.constexpr):
    """One super-chunk's SUB chunks in order, one program per (value block, super-chunk, sequence-head), from h
    at its start (HB): o = scale (q~ h + intra), then the chunk's step; (STORE_STATES) h at every chunk's start
    into HS `[NT, B H, K, V]`."""
    iv, ns, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h = bh // H, bh % H
    rows = tl.arange(0, C)
    ov = iv * SV + tl.arange(0, SV)  # this program's value columns (SV of the buffers' BV)
    state, p_state, m_kv = _state_block(HB + tl.cast(ns, tl.int64) * SS, bh, K, V, iv * SV, BK, SV, True)
    base_v = bb * T * H * V + h * V
    for n in range(ns * SUB, tl.minimum(ns * SUB + SUB, NT)):
        chunk = bh * NT + n
        if STORE_STATES:  # the state at the chunk's start, for the backward
            tl.store(HS + tl.cast(n, tl.int64) * SS + p_state, state, mask=m_kv)
        new, pk, pv = _chunk_step(state, Wb, Ub, Bb, Kb, Lb, v, chunk, n, base_v, T, H, V, ov, C, BK, BV, DOT_PREC)
        out = tl.dot(tl.load(Qb + pk), state, input_precision=DOT_PREC) + tl.load(Ib + pv)
        t = n * C + rows
        tl.store(o + base_v + t[:, None] * (H * V) + ov[None, :], (scale * out).to(o.dtype.element_ty),
                 mask=(t[:, None] < T) & (ov[None, :] < V))
        state = new


def buffer_dot_precision(dtype: torch.dtype):
    """Dot precision on the float32 buffers: float32 inputs get float32-accurate products (three tf32 passes on
    the GPU); 16-bit inputs one tf32 pass (relative error ~2^-11 a product, under their own 2^-8; a third of the
    tensor-core work, and fewer registers: the backward's chunk kernel spilled 4.2 KB at tf32x3 and 0.8 KB at
    tf32, sm_90a, K = V = 64). The interpreter computes every dot in float32 either way."""
    return dot_precision(torch.float32) if dtype == torch.float32 or interpreting() else "tf32"


def block(d: int) -> int:
    """The power-of-two tile width (at least 16, for tl.dot) that covers d channels."""
    return max(16, next_pow2(d))


def chunk_buffers(n_bh: int, NT: int, C: int, widths, device) -> list[torch.Tensor]:
    """Float32 per-chunk buffers `[n_bh, NT, C, width]`, one per width, that a prep kernel fills entirely."""
    return [torch.empty(n_bh, NT, C, w, dtype=torch.float32, device=device) for w in widths]


def float32_state(h0):
    """An initial state (or its gradient) as the scans read it: contiguous float32, or None."""
    return None if h0 is None else h0.to(torch.float32).contiguous()


def rwkv7_chunk_forward(r, w, k, v, a, b, scale: float, initial_state, chunk_size: int, store_states=False):
    """o `[B, T, H, V]` in v's dtype and the final state `[B, H, K, V]` float32 (inputs checked by `rwkv7`;
    chunk_size a power of two >= 16). With `store_states` also what the backward reads: the states at every
    chunk's start `[NT, B H, K, V]` and the prep's buffers (W, q~, b e^{Gc_C - Gc}, e^{Gc_C})."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    NT = cdiv(T, C)
    BK, BV = block(K), block(V)
    Wb, Qb, Bb, Kb, Ub, Ib = chunk_buffers(B * H, NT, C, (BK,) * 4 + (BV,) * 2, r.device)
    Lb = torch.empty(B * H, NT, BK, dtype=torch.float32, device=r.device)
    r, w, k, v, a, b = (t.contiguous() for t in (r, w, k, v, a, b))
    prec = buffer_dot_precision(r.dtype)
    for factored in (True, False):  # each chunk is written by one of the two
        _rwkv7_chunk_prep[(NT, B * H)](r, w, k, v, a, b, Wb, Ub, Qb, Ib, Bb, Kb, Lb, T, H, K, V, NT, C=C, BK=BK,
                                       BV=BV, SL=min(SLICE, BK), FACTORED=factored, DOT_PREC=prec, num_warps=8)
    o = empty_output((B, T, H, V), v.dtype, v.device)
    ht = empty_output((B, H, K, V), torch.float32, v.device)
    SV = min(BV, 32)  # sm_90a, K = V = 64, C = 16: no spills at 32 value columns and 4 warps (255 registers at 64)
    h0 = float32_state(initial_state)
    # the sequential pass over super-chunks of SUB chunks, then every super-chunk's chunks at once
    NS = cdiv(NT, SUB)
    Mb = torch.empty(NS, B * H, K, K, dtype=torch.float32, device=r.device)
    Cb = torch.empty(NS, B * H, K, V, dtype=torch.float32, device=r.device)
    _rwkv7_super_map[(NS, B * H)](v, Mb, Cb, Wb, Ub, Bb, Kb, Lb, T, H, K, V, NT, C=C, BK=BK, BV=BV, SUB=SUB,
                                  DOT_PREC=prec, num_warps=8)
    hb = torch.empty(NS, B * H, K, V, dtype=torch.float32, device=r.device)
    _rwkv7_super_scan[(cdiv(V, SV), B * H)](h0, ht, hb, B * H * K * V, Mb, Cb, K, V, NS, BK=BK, SV=SV,
                                            USE_H0=h0 is not None, REVERSE=False, DOT_PREC=prec, num_warps=4,
                                            num_stages=2)
    hs = torch.empty(NT, B * H, K, V, dtype=torch.float32, device=r.device) if store_states else None
    _rwkv7_chunk_scan[(cdiv(V, SV), NS, B * H)](v, o, hb, hs, B * H * K * V, Wb, Ub, Qb, Ib, Bb, Kb, Lb, T, H, K, V,
                                                NT, float(scale), C=C, BK=BK, BV=BV, SV=SV, SUB=SUB,
                                                STORE_STATES=store_states, DOT_PREC=prec, num_warps=4, num_stages=2)
    return (o, ht, hs, (Wb, Qb, Bb, Lb, Mb)) if store_states else (o, ht)
