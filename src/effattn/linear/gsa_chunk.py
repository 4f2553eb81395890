"""Triton forward and backward of gated slot attention's pass 1 (gsa.py's module docstring has the math): the
recurrence hk_t = hk_{t-1} Diag(e^{g_t}) + k_t^T s_t, o'_t = scale * q_t hk_t, read through the softmax over the
slots p_t = softmax(o'_t), whose gate acts on the slot (value-side) columns, which the engine's kernels do not
gate. Tokens go in chunks of C = 16 (the intra-chunk products) grouped in super-chunks of S = 64, 128 or 256 tokens (the
sequential state passes; `fwd_configs`, timed per shape). The forward is three launches:

1. `_gsa_pass1_prep`, one program per (super-chunk, sequence-head), all at once: from G, the gates summed from the
   super-chunk's start, the writes decayed to its end s e^{G_S - G} `[S, M]` and its decay e^{G_S} `[M]`.
2. `_gsa_pass1_states`, one program per (slot block, key block, sequence-head): super-chunks in order with a
   `[32, 32]` block of hk in registers, hk <- hk e^{G_S} + k^T (s e^{G_S - G}), one dot on the prep's rows a step
   (no gate arithmetic in the sequential loop); stores hk at every super-chunk's start and the final state.
3. `_gsa_pass1_scan`, one program per (super-chunk, sequence-head), all super-chunks at once: from hk at its
   super-chunk's start `[K, M]`, its chunks in order, o' = scale ((q hk) e^{Gc} + intra) with the
   intra-chunk sum_{j<=i} (q_i . k_j) s_j e^{Gc_i - Gc_j} in registers (`_intra_output`), p = softmax(o') stored
   in the inputs' dtype (o' itself in float32 only for the backward), hk <- hk e^{Gc_C} + k^T (s e^{Gc_C - Gc}).

The backward (`_GsaPass1`) mirrors it: the slots' softmax backward (`_slot_softmax_bwd`, o' -> do'), the prep's
e^{G} and `_gsa_pass1_states` in reverse for the state gradient after every super-chunk (and the initial
state's); then two walks, one program per (super-chunk, sequence-head), with the state `[K, M]` in registers:
`_gsa_pass1_bwd_dq` forward from hk at the super-chunk's start for dq, and `_gsa_pass1_bwd` in reverse from the
state gradient after it for dk, ds and each chunk's part of the gate's gradient (its reverse cumsum within the
chunk; the later chunks' sums are added after). No per-chunk state is stored, forward or backward: 4 GB less
traffic at T = 64k, H = 16, than the backward of 9eeaa87 (hk and dhk at every chunk, written and read back).
Pass 1's chunk is its own (16 tokens: `[C, C]` products), whatever chunk pass 2 runs with.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import pick_config, seqlen_bucket
from .rwkv7_chunk import _mild, _rows, _state_block, _stored_rows, block, buffer_dot_precision, float32_state

CHUNK = 16
# The forward's candidates (tokens per super-chunk, the scan's warps), timed per shape by `pick_config`; the
# first of `fwd_configs` is the interpreter's (128 tokens; float32: 64). The state passes are latency-bound (64
# programs at K = M = 64, H = 16; 1.4 ms for 1024 steps of 64 tokens at T = 64k on the H100, 2026-12-07, when each
# step composed its decays from per-chunk buffers: 4 barriers a step at 64 tokens, 32 at 128). Each step is now one
# dot on the prep's rows (sm_90a: 171 / 290 / 573 loop instructions at 64 / 128 / 256 tokens, 3 barriers); longer
# super-chunks take fewer steps and store fewer states. The backward runs with the forward's super-chunks.
FWD_CONFIGS = ((128, 8), (64, 8), (128, 4), (64, 4), (256, 8))


def fwd_configs(dtype: torch.dtype) -> tuple:
    """The forward's candidates for inputs of this dtype: float32 inputs (three-pass tf32 dots) take 64-token
    super-chunks only, where the state passes do not spill (sm_90a at 128 / 256 tokens: 456 B / 6.5 KB)."""
    return FWD_CONFIGS if dtype != torch.float32 else tuple(c for c in FWD_CONFIGS if c[0] == 64)


@triton.jit
def _gsa_pass1_prep(g, s, X, Lb, T, H, M, S: tl.constexpr, BM: tl.constexpr, FORWARD: tl.constexpr):
    """One (super-chunk of S tokens, sequence-head)'s buffers for the state pass, from G, the gates summed from the
    super-chunk's start (inclusive; rows past T and slots past M: g = s = 0): its decay Lb = e^{G_S}
    `[B H, NS, BM]` and the rows X `[B H, NS, S, BM]`, forward s e^{G_S - G} (the exponent summed over the later
    rows of the super-chunk, not a difference of two long sums, which would cancel), else (the reverse pass) e^{G}."""
    n, bh = tl.program_id(0), tl.program_id(1)
    NS = tl.num_programs(0)
    bb, h = bh // H, bh % H
    base_m = bb * T * H * M + h * M
    rows, om = tl.arange(0, S), tl.arange(0, BM)
    g_rows = _rows(g + base_m, n * S, T, 0, S, BM, M, H * M)
    tl.store(Lb + (bh * NS + n) * BM + om, tl.exp(tl.sum(g_rows, 0)))
    p = ((bh * NS + n) * S + rows[:, None]) * BM + om[None, :]
    if FORWARD:
        after = tl.where(rows[:, None] < S - 1, _rows(g + base_m, n * S + 1, T, 0, S, BM, M, H * M), 0.0)  # g_{j+1}
        tl.store(X + p, _rows(s + base_m, n * S, T, 0, S, BM, M, H * M) * tl.exp(tl.cumsum(after, 0, reverse=True)))
    else:
        tl.store(X + p, tl.exp(tl.cumsum(g_rows, 0)))


@triton.jit
def _gsa_pass1_states(a, b, X, Lb, h0, ht, HB, SS, T, H, K, M, NS, scale, S: tl.constexpr, BKS: tl.constexpr,
                      SM: tl.constexpr, BM: tl.constexpr, USE_H0: tl.constexpr, REVERSE: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """The state over NS super-chunks of S tokens, one block `[BKS, SM]` of it per program (keys split: no output
    here), from h0 `[B H, K, M]` (or zeros); stores it before each super-chunk (HB, `[NS, B H, K, M]`, SS =
    B H K M) and its last value (ht). The prep's buffers (X `[B H, NS, S, BM]`, Lb = e^{G_S} `[B H, NS, BM]`)
    hold every decay, so the sequential loop does one dot and one scaling a step.
    Forward (a = k, X = s e^{G_S - G}): in order, hk <- hk e^{G_S} + k^T X. HB holds hk at each super-chunk's
    start, ht the final state.
    Reverse (a = q, b = do' float32, X = e^{G}): dhk <- dhk e^{G_S} + scale q^T (do' X), last super-chunk first.
    HB holds dhk after each super-chunk, ht the initial state's gradient."""
    im, ik, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bb, h = bh // H, bh % H
    base_k, base_m = bb * T * H * K + h * K, bb * T * H * M + h * M
    ok, om = ik * BKS + tl.arange(0, BKS), im * SM + tl.arange(0, SM)
    m_km = (ok[:, None] < K) & (om[None, :] < M)
    p_state = (bh * K + ok[:, None]) * M + om[None, :]
    hk = tl.zeros([BKS, SM], tl.float32)
    if USE_H0:
        hk += tl.load(h0 + p_state, mask=m_km, other=0.0)
    rows = tl.arange(0, S)
    # a's rows and the super-chunk's decay one step ahead of use (the compiler's pipelining leaves these loads in
    # the loop, where the step's product would wait for them); the last step reloads its own
    first = NS - 1 if REVERSE else 0
    a_next = _stored_rows(a + base_k, first * S, T, ik * BKS, S, BKS, K, H * K)
    l_next = tl.load(Lb + (bh * NS + first) * BM + om)
    for i in range(NS):
        if REVERSE:
            n = NS - 1 - i
            ahead = tl.maximum(n - 1, 0)
        else:
            n = i
            ahead = tl.minimum(n + 1, NS - 1)
        an, ln = a_next.to(tl.float32), l_next
        a_next = _stored_rows(a + base_k, ahead * S, T, ik * BKS, S, BKS, K, H * K)
        l_next = tl.load(Lb + (bh * NS + ahead) * BM + om)
        tl.store(HB + tl.cast(n, tl.int64) * SS + p_state, hk, mask=m_km)
        xn = tl.load(X + ((bh * NS + n) * S + rows[:, None]) * BM + om[None, :])
        if REVERSE:
            xn = scale * xn * _rows(b + base_m, n * S, T, im * SM, S, SM, M, H * M)
        hk = tl.dot(tl.trans(an), xn, hk * ln[None, :], input_precision=DOT_PREC)
    tl.store(ht + p_state, hk, mask=m_km)


@triton.jit
def _local_start(HB, SS, T, H, K, M, NT, BK: tl.constexpr, BM: tl.constexpr, SUB: tl.constexpr):
    """A per-super-chunk program's share, one (super-chunk, sequence-head) with every slot (the local scan and the
    backward walks): bh, the slot columns `[BM]`, the state `[BK, BM]` at that super-chunk from HB
    (`[NS, B H, K, M]`, a state pass's stores), the row bases of `[B, T, H, K]` and `[B, T, H, M]` tensors, and its
    chunks n0 .. n1."""
    ns, bh = tl.program_id(0), tl.program_id(1)
    bb, h = bh // H, bh % H
    state, _, _ = _state_block(HB + tl.cast(ns, tl.int64) * SS, bh, K, M, 0, BK, BM, True)
    return (bh, tl.arange(0, BM), state, bb * T * H * K + h * K, bb * T * H * M + h * M, ns * SUB,
            tl.minimum(ns * SUB + SUB, NT))


@triton.jit
def _intra_output(qk, ss, gc, last, rows, C: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk's intra-chunk output sum_{j<=i} A_ij s_jm e^{Gc_im - Gc_jm} `[C, BM]` from A = q k^T (causal,
    `[C, C]`): where every slot's decay over the chunk is mild (`_mild`), one dot e^{Gc - r} (A (s e^{r - Gc}))
    with r = Gc_C / 2 (every factor within e^{MILD / 2}); else row by row, each row's decays masked before exp
    (any g <= 0 is safe)."""
    if _mild(last):
        ref = 0.5 * last[None, :]
        intra = tl.exp(gc - ref) * tl.dot(qk, ss * tl.exp(ref - gc), input_precision=DOT_PREC)
    else:
        intra = tl.zeros_like(ss)
        for i in range(C):  # a loop, not unrolled: its temporaries stay few
            row = rows[:, None] == i
            gci = tl.sum(tl.where(row, gc, 0.0), 0)  # row i of Gc `[BM]`, of A `[C]` (over j)
            ai = tl.sum(tl.where(row, qk, 0.0), 0)
            dec = tl.exp(tl.where(rows[:, None] <= i, gci[None, :] - gc, float("-inf")))  # e^{Gc_i - Gc_j} `[j, m]`
            intra += tl.where(row, tl.sum(ai[:, None] * ss * dec, 0)[None, :], 0.0)
    return intra


@triton.jit
def _chunk_rows(k, s, g, base_k, base_m, n, T, H, K, M, C: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    """Chunk n's rows of k `[C, BK]` and of s, g `[C, BM]`, in their stored dtypes."""
    return (_stored_rows(k + base_k, n * C, T, 0, C, BK, K, H * K),
            _stored_rows(s + base_m, n * C, T, 0, C, BM, M, H * M),
            _stored_rows(g + base_m, n * C, T, 0, C, BM, M, H * M))


@triton.jit
def _gsa_pass1_scan(q, k, s, g, o, p, HB, SS, T, H, K, M, NT, scale, C: tl.constexpr, BK: tl.constexpr,
                    BM: tl.constexpr, SUB: tl.constexpr, STORE_O: tl.constexpr, DOT_PREC: tl.constexpr):
    """One super-chunk's SUB chunks in order from hk at its start (HB `[NS, B H, K, M]`) `[K, M]`: p = softmax(o')
    over the slots `[B, T, H, M]` in p's dtype, and with STORE_O o' itself (float32)."""
    _, om, hk, base_k, base_m, n0, n1 = _local_start(HB, SS, T, H, K, M, NT, BK, BM, SUB)
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    nxt = _chunk_rows(k, s, g, base_k, base_m, n0, T, H, K, M, C, BK, BM)  # one chunk ahead of use
    q_nxt = _stored_rows(q + base_k, n0 * C, T, 0, C, BK, K, H * K)
    for n in range(n0, n1):
        t = n * C + rows
        qn, kn, ss, g_rows = q_nxt.to(tl.float32), nxt[0].to(tl.float32), nxt[1].to(tl.float32), nxt[2].to(tl.float32)
        ahead = tl.minimum(n + 1, n1 - 1)
        nxt = _chunk_rows(k, s, g, base_k, base_m, ahead, T, H, K, M, C, BK, BM)
        q_nxt = _stored_rows(q + base_k, ahead * C, T, 0, C, BK, K, H * K)
        gc = tl.cumsum(g_rows, 0)
        last = tl.sum(tl.where(rows[:, None] == C - 1, gc, 0.0), 0)
        qk = tl.where(causal, tl.dot(qn, tl.trans(kn), input_precision=DOT_PREC), 0.0)
        out = scale * (tl.dot(qn, hk, input_precision=DOT_PREC) * tl.exp(gc)
                       + _intra_output(qk, ss, gc, last, rows, C, DOT_PREC))
        m_tm = (t[:, None] < T) & (om[None, :] < M)
        offs = base_m + t[:, None] * (H * M) + om[None, :]
        if STORE_O:
            tl.store(o + offs, out, mask=m_tm)
        logits = tl.where(om[None, :] < M, out, float("-inf"))
        e = tl.exp(logits - tl.max(logits, 1)[:, None])
        tl.store(p + offs, (e / tl.sum(e, 1)[:, None]).to(p.dtype.element_ty), mask=m_tm)
        hk = tl.dot(tl.trans(kn), ss * tl.exp(last[None, :] - gc), hk * tl.exp(last)[None, :],
                    input_precision=DOT_PREC)


@triton.jit
def _slot_softmax_bwd(o, dp, do, R, M, BR: tl.constexpr, BM: tl.constexpr):
    """The slots' softmax backward on BR rows of the `[R, M]` views: do' = p (dp - sum_m p dp), p = softmax(o')
    recomputed from o' (float32)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    om = tl.arange(0, BM)
    m = (r[:, None] < R) & (om[None, :] < M)
    offs = r[:, None] * M + om[None, :]
    logits = tl.where(om[None, :] < M, tl.load(o + offs, mask=m, other=0.0), float("-inf"))
    e = tl.exp(logits - tl.max(logits, 1)[:, None])
    pr = e / tl.sum(e, 1)[:, None]
    d = tl.load(dp + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(do + offs, pr * (d - tl.sum(pr * d, 1)[:, None]), mask=m)


@triton.jit
def _intra_grads(A, dos, ss, gc, last, rows, causal, C: tl.constexpr, WANT_DS: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """One chunk's pairwise sums of the backward, full width `[C, BM]`: D_ij = sum_m do'_im s_jm e^{Gc_im - Gc_jm}
    (j <= i, `[C, C]`) and ds'_jm = sum_{i>=j} A_ij do'_im e^{Gc_im - Gc_jm}, with A = q k^T (causal). Where every
    slot's decay over the chunk is mild (`_mild`), as dots on do' e^{Gc - r} and s e^{r - Gc}, r = Gc_C / 2;
    else row by row, each row's decays masked before exp (any g <= 0 is safe). Without WANT_DS, ds' is 0 (A
    unused)."""
    dsi = tl.zeros_like(dos)
    if _mild(last):
        ref = 0.5 * last[None, :]
        do_e = dos * tl.exp(gc - ref)
        D = tl.dot(do_e, tl.trans(ss * tl.exp(ref - gc)), input_precision=DOT_PREC)
        if WANT_DS:
            dsi = tl.exp(ref - gc) * tl.dot(tl.trans(A), do_e, input_precision=DOT_PREC)
    else:
        D = tl.zeros([C, C], tl.float32)
        for i in range(C):  # a loop, not unrolled: its temporaries stay few
            row = rows[:, None] == i
            gci = tl.sum(tl.where(row, gc, 0.0), 0)  # row i of Gc, do'
            doi = tl.sum(tl.where(row, dos, 0.0), 0)
            dec = tl.exp(tl.where(rows[:, None] <= i, gci[None, :] - gc, float("-inf")))  # e^{Gc_i - Gc_j} `[j, m]`
            D += tl.where(row, tl.sum(doi[None, :] * ss * dec, 1)[None, :], 0.0)
            if WANT_DS:
                dsi += tl.sum(tl.where(row, A, 0.0), 0)[:, None] * doi[None, :] * dec  # A_ij do'_im e^{..}
    return tl.where(causal, D, 0.0), dsi


@triton.jit
def _gsa_pass1_bwd_dq(k, s, g, do, dq, HB, SS, T, H, K, M, NT, scale, C: tl.constexpr, SUB: tl.constexpr,
                      BK: tl.constexpr, BM: tl.constexpr, DOT_PREC: tl.constexpr):
    """One super-chunk's SUB chunks in order from hk at its start (HB `[NS, B H, K, M]`, the forward state pass),
    with hk `[K, M]` in registers: dq_i = scale [hk (do'_i e^{Gc_i}) + sum_{j<=i} D_ij k_j] (D: `_intra_grads`),
    then hk <- hk e^{Gc_C} + k^T (s e^{Gc_C - Gc})."""
    _, _, hk, base_k, base_m, n0, n1 = _local_start(HB, SS, T, H, K, M, NT, BK, BM, SUB)
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    ok = tl.arange(0, BK)
    # each chunk's rows loaded one chunk ahead of use (the last step reloads its own): no step waits on a load
    # issued in it (sm_90a, benchmarks/walk_compile.py: 3 synchronous loads per step otherwise)
    nxt = _chunk_rows(k, s, g, base_k, base_m, n0, T, H, K, M, C, BK, BM)
    do_nxt = _stored_rows(do + base_m, n0 * C, T, 0, C, BM, M, H * M)
    for n in range(n0, n1):
        t = n * C + rows
        kn, ss, g_rows, dos = nxt[0].to(tl.float32), nxt[1].to(tl.float32), nxt[2].to(tl.float32), do_nxt
        ahead = tl.minimum(n + 1, n1 - 1)
        nxt = _chunk_rows(k, s, g, base_k, base_m, ahead, T, H, K, M, C, BK, BM)
        do_nxt = _stored_rows(do + base_m, ahead * C, T, 0, C, BM, M, H * M)
        gc = tl.cumsum(g_rows, 0)
        last = tl.sum(tl.where(rows[:, None] == C - 1, gc, 0.0), 0)
        D = _intra_grads(None, dos, ss, gc, last, rows, causal, C, False, DOT_PREC)[0]
        dq_n = tl.dot(D, kn, tl.dot(dos * tl.exp(gc), tl.trans(hk), input_precision=DOT_PREC), input_precision=DOT_PREC)
        tl.store(dq + base_k + t[:, None] * (H * K) + ok[None, :], scale * dq_n,
                 mask=(t[:, None] < T) & (ok[None, :] < K))
        hk = tl.dot(tl.trans(kn), ss * tl.exp(last[None, :] - gc), hk * tl.exp(last)[None, :],
                    input_precision=DOT_PREC)


@triton.jit
def _gsa_pass1_bwd(q, k, s, g, o, do, dk, ds, dg, dg_sum, DHB, SS, T, H, K, M, NT, scale, C: tl.constexpr,
                   SUB: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, DOT_PREC: tl.constexpr):
    """One super-chunk's SUB chunks in reverse, from dhk after it (DHB `[NS, B H, K, M]`, the reverse state pass),
    with dhk `[K, M]` in registers: for each chunk
    dk_j = scale sum_{i>=j} D_ij q_i + dhk (s_j e^{Gc_C - Gc_j});
    ds_jm = scale ds'_jm + (k_j dhk)_m e^{Gc_Cm - Gc_jm} (D, ds': `_intra_grads`);
    the chunk's share of the gate's gradient, x = o' do' - s ds: its reverse cumsum within the chunk into dg
    (float32 `[B, NT C, H, M]`, every row) and its sum into dg_sum (`[B, NT, H, M]`), which the caller carries
    over the later chunks; then dhk <- dhk e^{Gc_C} + scale q^T (do' e^{Gc}), the state gradient after the
    chunk before."""
    bh, om, dhk, base_k, base_m, n0, n1 = _local_start(DHB, SS, T, H, K, M, NT, BK, BM, SUB)
    bb, h = bh // H, bh % H
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    ok = tl.arange(0, BK)
    # each chunk's rows (q, k, s, g, do', o') loaded one chunk ahead of use, as in `_gsa_pass1_bwd_dq` (sm_90a: 234
    # registers and 1092 loop instructions, against 252 and 1367 with 5 synchronous loads per step)
    nxt = _chunk_rows(k, s, g, base_k, base_m, n1 - 1, T, H, K, M, C, BK, BM)
    q_nxt = _stored_rows(q + base_k, (n1 - 1) * C, T, 0, C, BK, K, H * K)
    o_nxt = _stored_rows(o + base_m, (n1 - 1) * C, T, 0, C, BM, M, H * M)
    do_nxt = _stored_rows(do + base_m, (n1 - 1) * C, T, 0, C, BM, M, H * M)
    for i in range(n1 - n0):
        n = n1 - 1 - i
        t = n * C + rows
        m_tm = (t[:, None] < T) & (om[None, :] < M)
        qn, kn, ss, g_rows, dos, o_n = (q_nxt.to(tl.float32), nxt[0].to(tl.float32), nxt[1].to(tl.float32),
                                        nxt[2].to(tl.float32), do_nxt, o_nxt)
        ahead = tl.maximum(n - 1, n0)
        nxt = _chunk_rows(k, s, g, base_k, base_m, ahead, T, H, K, M, C, BK, BM)
        q_nxt = _stored_rows(q + base_k, ahead * C, T, 0, C, BK, K, H * K)
        o_nxt = _stored_rows(o + base_m, ahead * C, T, 0, C, BM, M, H * M)
        do_nxt = _stored_rows(do + base_m, ahead * C, T, 0, C, BM, M, H * M)
        gc = tl.cumsum(g_rows, 0)
        last = tl.sum(tl.where(rows[:, None] == C - 1, gc, 0.0), 0)
        A = tl.where(causal, tl.dot(qn, tl.trans(kn), input_precision=DOT_PREC), 0.0)  # q_i . k_j, j <= i
        D, dsi = _intra_grads(A, dos, ss, gc, last, rows, causal, C, True, DOT_PREC)
        to_end = tl.exp(last[None, :] - gc)
        tl.store(dk + base_k + t[:, None] * (H * K) + ok[None, :],
                 tl.dot(ss * to_end, tl.trans(dhk), scale * tl.dot(tl.trans(D), qn, input_precision=DOT_PREC),
                        input_precision=DOT_PREC), mask=(t[:, None] < T) & (ok[None, :] < K))
        ds_n = scale * dsi + tl.dot(kn, dhk, input_precision=DOT_PREC) * to_end
        tl.store(ds + base_m + t[:, None] * (H * M) + om[None, :], ds_n, mask=m_tm)
        x = o_n * dos - ss * ds_n
        base_g = bb * NT * C * H * M + h * M  # dg's rows: NT C per sequence
        tl.store(dg + base_g + t[:, None] * (H * M) + om[None, :], tl.cumsum(x, 0, reverse=True),
                 mask=om[None, :] < M)
        tl.store(dg_sum + (bb * NT + n) * H * M + h * M + om, tl.sum(x, 0), mask=om < M)
        dhk = tl.dot(tl.trans(qn), scale * dos * tl.exp(gc), dhk * tl.exp(last)[None, :], input_precision=DOT_PREC)


def _dims(q, s):
    """(B, T, H, K, M, NT, BK, BM) of pass 1 on q `[B, T, H, K]`, s `[B, T, H, M]`."""
    B, T, H, K = q.shape
    M = s.shape[-1]
    return B, T, H, K, M, triton.cdiv(T, CHUNK), block(K), block(M)


def _states(a, b, X, Lb, h0, scale: float, reverse: bool):
    """The state pass over the prep's super-chunks (X `[B H, NS, S, BM]`, Lb `[B H, NS, BM]`) on contiguous a
    `[B, T, H, K]`, b `[B, T, H, M]` (reverse only): (the state before each super-chunk, or after it in reverse,
    `[NS, B H, K, M]`, and its last value `[B, H, K, M]`), float32."""
    B, T, H, K = a.shape
    M = b.shape[-1]
    NS, S, BM = X.shape[1:]
    BKS, SM = min(block(K), 32), min(BM, 32)
    hb = torch.empty(NS, B * H, K, M, dtype=torch.float32, device=a.device)
    last = empty_output((B, H, K, M), torch.float32, a.device)
    # sm_90a, K = M = 64, tf32, 8 warps, no spills: 64 / 80 / 80 registers forward, 128 / 178 / 255 in reverse, at
    # 64 / 128 / 256 tokens a step
    _gsa_pass1_states[(triton.cdiv(M, SM), triton.cdiv(K, BKS), B * H)](
        a, b, X, Lb, h0, last, hb, B * H * K * M, T, H, K, M, NS, float(scale), S=S, BKS=BKS, SM=SM, BM=BM,
        USE_H0=h0 is not None, REVERSE=reverse, DOT_PREC=buffer_dot_precision(a.dtype), num_warps=8, num_stages=2)
    return hb, last


def _prep(g, s, forward: bool, sup: int):
    """The state pass's buffers over super-chunks of `sup` tokens on contiguous g, s `[B, T, H, M]`: (X `[B H, NS,
    sup, BM]`: s e^{G_S - G} forward, else e^{G}; e^{G_S} `[B H, NS, BM]`), float32."""
    B, T, H, M = g.shape
    NS, BM = triton.cdiv(T, sup), block(M)
    x = torch.empty(B * H, NS, sup, BM, dtype=torch.float32, device=g.device)
    decay = torch.empty(B * H, NS, BM, dtype=torch.float32, device=g.device)
    # sm_90a, BM = 64, forward: 64 / 113 registers at 64 / 128 tokens and 8 warps; at 256, 255 at 8 warps, 116 at 16
    _gsa_pass1_prep[(NS, B * H)](g, s, x, decay, T, H, M, S=sup, BM=BM, FORWARD=forward, num_warps=max(8, sup // 16))
    return x, decay


def _pass1(q, k, s, g, scale: float, h0, store_o: bool):
    """Launch the prep, the state pass and the local scan on contiguous q, k, s, g: (p = softmax(o') `[B, T, H, M]`
    in q's dtype, o' float32 (with `store_o`, else None), final hk `[B, H, K, M]`, the states at the
    super-chunks' starts `[NS, B H, K, M]`, the last two float32; the super-chunk's tokens)."""
    B, T, H, K, M, NT, BK, BM = _dims(q, s)
    h0 = float32_state(h0)
    p = empty_output((B, T, H, M), q.dtype, q.device)
    o = empty_output((B, T, H, M), torch.float32, q.device) if store_o else p
    out = {}

    def launch(cfg):  # the prep, the state pass and the scan (idempotent: the tuner times it)
        sup, warps = cfg
        hb, ht = _states(k, s, *_prep(g, s, forward=True, sup=sup), h0, 1.0, reverse=False)
        out.update(hb=hb, ht=ht)
        # sm_90a, K = M = 64, bf16 (tf32), 2 stages, no spills, no synchronous load per step: 169 registers at 8
        # warps, 237 at 4
        _gsa_pass1_scan[(hb.shape[0], B * H)](
            q, k, s, g, o, p, hb, B * H * K * M, T, H, K, M, NT, float(scale), C=CHUNK, BK=BK, BM=BM,
            SUB=sup // CHUNK, STORE_O=store_o, DOT_PREC=buffer_dot_precision(q.dtype), num_warps=warps, num_stages=2)
    cfg = pick_config(("gsa_fwd", K, M, q.dtype, B * H, seqlen_bucket(T)), fwd_configs(q.dtype), launch)
    launch(cfg)
    return p, o if store_o else None, out["ht"], out["hb"], cfg[0]


class _GsaPass1(torch.autograd.Function):
    """Pass 1 with its Triton backward: the slots' softmax backward, the reverse state pass for dhk after every
    super-chunk, then two walks over each super-chunk's chunks, forward from its start state for dq and in reverse
    from dhk after it for dk, ds, and dg = reverse cumsum over T of (o' do' - s ds) plus sum_k hk_T dhk_T (every
    term of o'_t carries e^{G_t}, every use of s_j e^{-G_j}, the final state e^{G_T})."""

    @staticmethod
    def forward(ctx, q, k, s, g, h0, scale):
        q, k, s, g = (t.contiguous() for t in (q, k, s, g))
        p, o, ht, hb, sup = _pass1(q, k, s, g, scale, h0, store_o=True)
        ctx.save_for_backward(q, k, s, g, o, ht, hb)
        ctx.scale, ctx.has_h0, ctx.sup = scale, h0 is not None, sup
        return p, ht

    @staticmethod
    def backward(ctx, dp, dht):
        q, k, s, g, o, ht, hb = ctx.saved_tensors
        B, T, H, K, M, NT, BK, BM = _dims(q, s)
        C = CHUNK
        prec = buffer_dot_precision(q.dtype)
        if dp is None:
            do = torch.zeros_like(o)
        else:  # do' `[B, T, H, M]` float32
            do = empty_output(o.shape, torch.float32, o.device)
            rows = B * T * H
            _slot_softmax_bwd[(triton.cdiv(rows, 32),)](o, dp.contiguous(), do, rows, M, BR=32, BM=BM, num_warps=4)
        dht = float32_state(dht)
        dhb, dh0 = _states(q, do, *_prep(g, s, forward=False, sup=ctx.sup), dht, ctx.scale, reverse=True)
        dq = empty_output((B, T, H, K), q.dtype, q.device)  # complete in the kernel: stored in the inputs' dtype
        dk = empty_output((B, T, H, K), k.dtype, q.device)
        ds = empty_output((B, T, H, M), s.dtype, q.device)
        dg = empty_output((B, NT * C, H, M), torch.float32, q.device)
        dg_sum = empty_output((B, NT, H, M), torch.float32, q.device)
        # sm_90a, K = M = 64, bf16 (tf32), 2 stages, no spills: the dq walk at 4 warps (238 registers, two programs
        # per SM; 1.03x fwd+bwd at 16k / 64k on the H100 against 8 warps), the other at 8 (234 registers)
        _gsa_pass1_bwd_dq[(hb.shape[0], B * H)](k, s, g, do, dq, hb, B * H * K * M, T, H, K, M, NT, float(ctx.scale),
                                             C=C, SUB=ctx.sup // C, BK=BK, BM=BM, DOT_PREC=prec, num_warps=4,
                                             num_stages=2)
        _gsa_pass1_bwd[(dhb.shape[0], B * H)](q, k, s, g, o, do, dk, ds, dg, dg_sum, dhb, B * H * K * M, T, H, K, M,
                                           NT, float(ctx.scale), C=C, SUB=ctx.sup // C, BK=BK, BM=BM, DOT_PREC=prec,
                                           num_warps=8, num_stages=2)
        # dg_t = sum_{u >= t} x_u: the kernel's reverse cumsum within t's chunk plus the later chunks' sums. The
        # cumsum runs over the chunks as the last, contiguous dimension: over dim 1 of [B, NT, H, M] PyTorch's
        # outer-dimension scan walks the NT chunks one by one (1.0 ms at T = 64k, H = 16 on the H100)
        total = dg_sum.permute(0, 2, 3, 1).contiguous()  # [B, H, M, NT]
        later = (total.flip(-1).cumsum(-1).flip(-1) - total).permute(0, 3, 1, 2)  # chunks after each: [B, NT, H, M]
        if dht is not None:
            later = later + (ht * dht).sum(2).unsqueeze(1)  # the final state carries e^{G_T}: [B, 1, H, M]
        dg_out = torch.empty((B, NT, C, H, M), dtype=g.dtype, device=g.device)
        torch.add(dg.view(B, NT, C, H, M), later.unsqueeze(2), out=dg_out)  # one pass, stored in g's dtype
        return dq, dk, ds, dg_out.view(B, NT * C, H, M)[:, :T], dh0 if ctx.has_h0 else None, None


def gsa_pass1_forward(q, k, s, g, scale: float, initial_state_k):
    """The slot weights p = softmax(o') `[B, T, H, M]` in q's dtype and the final hk `[B, H, K, M]` float32 (inputs
    checked by `gsa`); differentiable in q, k, s, g and the initial state through the Triton backward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, s, g, initial_state_k)):
        return _GsaPass1.apply(q, k, s, g, initial_state_k, float(scale))
    q, k, s, g = (t.contiguous() for t in (q, k, s, g))
    p, _, ht, _, _ = _pass1(q, k, s, g, scale, initial_state_k, store_o=False)
    return p, ht
