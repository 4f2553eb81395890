"""FlashAttention-2 backward in Triton (Dao 2023, Alg. 2), recomputing P from the saved LSE.

Two launches, none atomic: dQ with one program per (query block, batch, head) that walks the KV blocks
like the forward, and first computes its rows' Delta = rowsum(dO * O) (its dO is loaded anyway; a separate
launch re-read O and dO from memory); then dK/dV, reading that Delta, with one program per (KV block,
batch, KV head) that walks the query blocks of every query head of its GQA group (so dK/dV are reduced over
the group in registers, K/V never repeated). With s the natural-log scores and P = exp(s - LSE):
dV = P^T dO, dP = dO V^T, dS = P * (dP - Delta), and d(raw score) = scale * dS (times 1 - tanh^2 with a
softcap); dQ = dS K, dK = dS^T Q.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ._flash_split import (_split_program, _store_part, _walk_ranges, combine, extra_rows, mask_split, part_buffer,
                           sparse_signature, split_args)
from .flash_fwd import _descriptor, _tma_ok
from ._flash_common import (LOG2E, NO_LIMIT, Config, _dot, _kv_stages, _load_tile, _q_stages, _scores, _sequence,
                            _tile_bits, _visible, KernelLaunch, block_d, cdiv, dot_precision, pick_config,
                            remember_plan, seqlen_bucket, tuner_env, window_bucket)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _lse2(LSEb, offs, n, CHECK: tl.constexpr):
    """Saved natural LSE -> log2 domain; an empty row's -inf becomes +inf so that its P is exactly 0."""
    if CHECK:
        lse = tl.load(LSEb + offs, mask=offs < n, other=0.0)
    else:
        lse = tl.load(LSEb + offs)
    lse = lse * 1.4426950408889634
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sq_t, sdo_t, m0, offs_n, off, seqlen_q, seqlen_k,
               qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, tile, r0, offs_d, offs_dv, bb, h,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PAD_D: tl.constexpr, PAD_DV: tl.constexpr, MASK: tl.constexpr, USE_BITS: tl.constexpr,
               MASK_M: tl.constexpr, WORDS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
               EARLY_DP: tl.constexpr, TMA: tl.constexpr):
    """Accumulate the query block [m0, m0 + BLOCK_M) into dK, dV of the key block, transposed: [keys, rows].
    With USE_BITS its rows are rows r0.. of partial tile `tile` of the block mask (MASK_M rows a tile).
    EARLY_DP issues dP^T = V dO^T before the exponentials, so that sm_90a code runs them while the tensor
    cores work (benchmarks/flash_compile.py: loop_mufu_in_flight 0 -> 16-32), at some 8% more instructions.
    With TMA, Qb and DOb are tensor descriptors over [B, T, H * D] (rows past T zero-filled by the copy engine)
    and the tiles of head h of sequence bb are loaded by it; else they are pointers."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if TMA:
        q = Qb.load([bb, m0, h * HEAD_DIM]).reshape([BLOCK_M, HEAD_DIM])
        do = DOb.load([bb, m0, h * HEAD_DIM_V]).reshape([BLOCK_M, HEAD_DIM_V])
    else:
        q = _load_tile(Qb + offs_m[:, None] * sq_t + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, MASK,
                       PAD_D)
        do = _load_tile(DOb + offs_m[:, None] * sdo_t + offs_dv[None, :], offs_m, seqlen_q, offs_dv, HEAD_DIM_V,
                        MASK, PAD_DV)
    lse = _lse2(LSEb, offs_m, seqlen_q, MASK)
    sT, tT = _scores(_dot(k, tl.trans(q), None, DOT_PREC), qk_scale, cap_in, cap_out, SOFTCAP)
    if EARLY_DP:
        dpT = _dot(v, tl.trans(do), None, DOT_PREC)
    if MASK:
        keep = (_visible(offs_m[None, :] + off, offs_n[:, None], seqlen_k, LEFT, RIGHT, SINKS)
                & (offs_m[None, :] < seqlen_q))
        if USE_BITS:
            keep &= _tile_bits(BITS, tile, r0 + tl.arange(0, BLOCK_M)[None, :], tl.arange(0, BLOCK_N)[:, None],
                               MASK_M, WORDS)
        sT = tl.where(keep, sT, float("-inf"))
    pT = tl.exp2(sT - lse[None, :])
    dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC)
    if MASK:
        delta = tl.load(DELTAb + offs_m, mask=offs_m < seqlen_q, other=0.0)
    else:
        delta = tl.load(DELTAb + offs_m)
    if not EARLY_DP:
        dpT = _dot(v, tl.trans(do), None, DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU, SINK_DK, SINK_DV,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, slse_b, slse_h,
        sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
        T, S, HKV, GROUP, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, KV_GRID, SINK_SPLIT, SINK_ROWS,
        Q_NUM, Q_IDX, FULL_NUM, FULL_IDX, TILE_MAP, BITS, MB_B, MB_H, HM, NQB, NKB,
        FLAGS, PARTS, NPARTS, NBH, DK_PART, DV_PART,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, SPARSE: tl.constexpr,
        ARITH: tl.constexpr, MASK_M: tl.constexpr, WORDS: tl.constexpr, SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr, EARLY_DP: tl.constexpr, SINK_PARTS: tl.constexpr, SPLIT: tl.constexpr,
        TMA: tl.constexpr):
    """dK, dV of one key block. Block-sparse, each listed query block (MASK_M rows, the block mask's) is
    walked BLOCK_M rows at a time: a 64-row step at 8 warps compiles for sm_90a without register spills at
    D = 128, the mask's 128-row tile spills 760 bytes (benchmarks/flash_compile.py).

    SINK_PARTS (dense, attention sinks): the rows below the band that see a sink block only through its sinks
    are cut into SINK_SPLIT parts, each walked by one of the programs past the first KV_GRID (so no program walks
    all T rows while the others walk a band); the sink blocks' programs then store float32 partial sums
    `[SINK_SPLIT + 1, B, SINK_ROWS, HKV, D]` (part 0: the band's rows) to SINK_DK / SINK_DV, which the launcher
    adds up into dK / dV.

    SPLIT (block-sparse): the long walks are cut into parts (`_flash_split`), each a program past the first NBH
    rows of the grid's second axis, which walks units [u0, u1) of each of its group's heads' lists and stores
    float32 partial sums to DK_PART `[NPARTS, BLOCK_N, D]` / DV_PART `[NPARTS, BLOCK_N, Dv]`."""
    pid_n = tl.program_id(0)
    part = 0
    if SINK_PARTS:  # programs past KV_GRID: (sink block, part 1..SINK_SPLIT)
        extra = tl.maximum(pid_n - KV_GRID, 0)
        part = tl.where(pid_n >= KV_GRID, 1 + extra % SINK_SPLIT, 0)
        pid_n = tl.where(pid_n >= KV_GRID, extra // SINK_SPLIT, pid_n)
    b = tl.program_id(1) // HKV
    hk = tl.program_id(1) % HKV
    u0 = 0
    u1 = 0
    if SPLIT:
        b, hk, pid_n, u0, u1, slot, skip = _split_program(FLAGS, PARTS, NPARTS, NBH, HKV, NKB, 1)
        if skip:
            return
    q0, seqlen_q, seqlen_k, bb = _sequence(CU, b, T, S, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    PAD_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V
    k = _load_tile(K + bb * sk_b + q0 * sk_t + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], offs_n,
                   seqlen_k, offs_d, HEAD_DIM, True, PAD_D)
    v = _load_tile(V + bb * sv_b + q0 * sv_t + hk * sv_h + offs_n[:, None] * sv_t + offs_dv[None, :], offs_n,
                   seqlen_k, offs_dv, HEAD_DIM_V, True, PAD_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        if TMA:  # fixed-length, unpadded [B, T, H * D] layouts only (the launcher checks)
            Qb = Q
            DOb = DO
        else:
            Qb = Q + bb * sq_b + q0 * sq_t + h * sq_h
            DOb = DO + bb * sdo_b + q0 * sdo_t + h * sdo_h
        LSEb = LSE + bb * slse_b + h * slse_h + q0
        DELTAb = DELTA + bb * slse_b + h * slse_h + q0
        if SPARSE:
            row = ((b * MB_B) * HM + h * MB_H) * NKB + pid_n
            # one loop over (listed block, row step): a single body the compiler pipelines (a static inner
            # loop would unroll it: more live registers, 135 barriers instead of 9)
            SUB: tl.constexpr = MASK_M // BLOCK_M
            f_lo, f_hi, p_lo, p_hi = _walk_ranges(FULL_NUM, Q_NUM, row, u0, u1, SPLIT)
            for j in range(f_lo * SUB, f_hi * SUB):
                m0 = tl.load(FULL_IDX + row * NQB + j // SUB) * MASK_M + (j % SUB) * BLOCK_M
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sq_t, sdo_t, m0, offs_n, off, seqlen_q,
                                    seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d,
                                    offs_dv, bb, h, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, ARITH,
                                    False, MASK_M, WORDS, SOFTCAP, DOT_PREC, EARLY_DP, TMA)
            for j in range(p_lo * SUB, p_hi * SUB):
                qb, r0 = tl.load(Q_IDX + row * NQB + j // SUB), (j % SUB) * BLOCK_M
                tile = tl.load(TILE_MAP + (((b * MB_B) * HM + h * MB_H) * NQB + qb) * NKB + pid_n)
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sq_t, sdo_t, qb * MASK_M + r0, offs_n, off,
                                    seqlen_q, seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, tile, r0,
                                    offs_d, offs_dv, bb, h, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV,
                                    True, True, MASK_M, WORDS, SOFTCAP, DOT_PREC, EARLY_DP, TMA)
        else:
            lo, a, c, hi = _q_stages(n0, seqlen_q, seqlen_k, off, LEFT, RIGHT, BLOCK_M, BLOCK_N)
            # the masked query blocks (both edges of the band, then the rows below a sink block that the band
            # leaves out) in one loop, the unmasked ones in another: two copies of the tile's code, not four
            # (at D = 128 the kernel then spills less; benchmarks/flash_compile.py)
            n1 = tl.cdiv(tl.maximum(a - lo, 0), BLOCK_M)
            n2 = tl.cdiv(tl.maximum(hi - c, 0), BLOCK_M)
            done = tl.maximum(tl.maximum(lo + n1 * BLOCK_M, a + tl.cdiv(tl.maximum(c - a, 0), BLOCK_M) * BLOCK_M),
                              tl.maximum(c + n2 * BLOCK_M, lo))
            n3 = tl.where(n0 < SINKS, tl.cdiv(tl.maximum(seqlen_q - done, 0), BLOCK_M), 0)
            j_lo = 0
            j_hi = n1 + n2 + n3
            c_end = c
            if SINK_PARTS:  # a sink block: part 0 walks the band, part p > 0 its share of the n3 rows below
                per = tl.cdiv(n3, SINK_SPLIT)
                j_lo = tl.where(part > 0, n1 + n2 + (part - 1) * per, 0)
                j_hi = tl.where(n0 < SINKS, tl.where(part > 0, tl.minimum(j_lo + per, j_hi), n1 + n2), j_hi)
                c_end = tl.where(part > 0, a, c)
            for j in range(j_lo, j_hi):
                m0 = tl.where(j < n1, lo + j * BLOCK_M,
                              tl.where(j < n1 + n2, c + (j - n1) * BLOCK_M, done + (j - n1 - n2) * BLOCK_M))
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sq_t, sdo_t, m0, offs_n, off, seqlen_q,
                                    seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d,
                                    offs_dv, bb, h, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, True,
                                    False, MASK_M, WORDS, SOFTCAP, DOT_PREC, EARLY_DP, TMA)
            for m0 in tl.range(a, c_end, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, sq_t, sdo_t, m0, offs_n, off, seqlen_q,
                                    seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d,
                                    offs_dv, bb, h, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, False,
                                    False, MASK_M, WORDS, SOFTCAP, DOT_PREC, EARLY_DP, TMA)
    dk = dk * (qk_scale * 0.6931471805599453)  # d(raw score) = scale * dS; qk_scale carries log2(e)
    to_part: tl.constexpr = False
    if SPLIT:
        to_part = slot >= 0
    if to_part:  # a part's partial sums, added up by the launcher
        _store_part(DK_PART, slot, 0, dk, offs_d, BLOCK_N, HEAD_DIM)
        _store_part(DV_PART, slot, 0, dv, offs_dv, BLOCK_N, HEAD_DIM_V)
    elif SINK_PARTS:
        if n0 < SINKS:  # a partial sum: float32, summed over the parts by the launcher
            rows = ((part * (tl.num_programs(1) // HKV) + b) * SINK_ROWS + offs_n) * HKV + hk
            tl.store(SINK_DK + rows[:, None] * HEAD_DIM + offs_d[None, :], dk, mask=offs_d[None, :] < HEAD_DIM)
            tl.store(SINK_DV + rows[:, None] * HEAD_DIM_V + offs_dv[None, :], dv, mask=offs_dv[None, :] < HEAD_DIM_V)
        else:
            _store_dkdv(dk, dv, DK, DV, bb, q0, hk, offs_n, offs_d, offs_dv, seqlen_k, sdk_b, sdk_t, sdk_h, sdv_b,
                        sdv_t, sdv_h, HEAD_DIM, HEAD_DIM_V)
    else:
        _store_dkdv(dk, dv, DK, DV, bb, q0, hk, offs_n, offs_d, offs_dv, seqlen_k, sdk_b, sdk_t, sdk_h, sdv_b,
                    sdv_t, sdv_h, HEAD_DIM, HEAD_DIM_V)


@triton.jit
def _store_dkdv(dk, dv, DK, DV, bb, q0, hk, offs_n, offs_d, offs_dv, seqlen_k, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t,
                sdv_h, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    row_ok = offs_n < seqlen_k
    dk_ptrs = DK + bb * sdk_b + q0 * sdk_t + hk * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :]
    dv_ptrs = DV + bb * sdv_b + q0 * sdv_t + hk * sdv_h + offs_n[:, None] * sdv_t + offs_dv[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out, LEFT,
             RIGHT, SINKS, BITS, tile, c0, offs_d, offs_dv, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
             MASK: tl.constexpr, USE_BITS: tl.constexpr, WORDS: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """Accumulate the key block [n0, n0 + BLOCK_N) into dQ of the query block. With USE_BITS its columns are
    columns c0.. of partial tile `tile` of the block mask."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(Kb + offs_n[:, None] * sk_t + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_DIM, MASK, PAD_D)
    v = _load_tile(Vb + offs_n[:, None] * sv_t + offs_dv[None, :], offs_n, seqlen_k, offs_dv, HEAD_DIM_V,
                   MASK, PAD_DV)
    s, t = _scores(_dot(q, tl.trans(k), None, DOT_PREC), qk_scale, cap_in, cap_out, SOFTCAP)
    if MASK:
        keep = _visible(pos[:, None], offs_n[None, :], seqlen_k, LEFT, RIGHT, SINKS)
        if USE_BITS:
            keep &= _tile_bits(BITS, tile, tl.arange(0, BLOCK_M)[:, None], c0 + tl.arange(0, BLOCK_N)[None, :],
                               BLOCK_M, WORDS)
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse[:, None])
    ds = p * (_dot(do, tl.trans(v), None, DOT_PREC) - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(ds.to(k.dtype), k, dq, DOT_PREC)


@triton.jit
def _dq_kernel(
        Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, CU,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, slse_b, slse_h,
        so_b, so_t, so_h, sdq_b, sdq_t, sdq_h,
        T, S, H, GROUP, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS,
        KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, TILE_MAP, BITS, MB_B, MB_H, HM, NQB, NKB,
        FLAGS, PARTS, NPARTS, NBH, DQ_PART,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, SPARSE: tl.constexpr,
        ARITH: tl.constexpr, MASK_N: tl.constexpr, WORDS: tl.constexpr, SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr, HAS_DLSE: tl.constexpr, SPLIT: tl.constexpr):
    """dQ of one query block, and its rows' Delta = rowsum(dO * O) - dLSE (an upstream gradient of the LSE
    adds dLSE * P to dS), stored for the dK/dV kernel that runs after this one. Block-sparse, each listed
    key block (MASK_N keys, the block mask's) is walked BLOCK_N keys at a time, as the dense kernel's 64-key
    steps at D = 128 (the mask's 128-key blocks would make [128, 128] score tiles).

    SPLIT (block-sparse): as the forward's, the parts store float32 partial dQ to DQ_PART `[NPARTS, BLOCK_M, D]`;
    the ordinary program of a split block still writes its rows' Delta."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    u0 = 0
    u1 = 0
    if SPLIT:
        b, h, pid_m, u0, u1, slot, skip = _split_program(FLAGS, PARTS, NPARTS, NBH, H, NQB, 1)
        if slot >= NPARTS:
            return
    q0, seqlen_q, seqlen_k, bb = _sequence(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    PAD_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V
    pos = offs_m + off
    Kb = K + bb * sk_b + q0 * sk_t + (h // GROUP) * sk_h
    Vb = V + bb * sv_b + q0 * sv_t + (h // GROUP) * sv_h
    q = _load_tile(Q + bb * sq_b + q0 * sq_t + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], offs_m,
                   seqlen_q, offs_d, HEAD_DIM, True, PAD_D)
    do = _load_tile(DO + bb * sdo_b + q0 * sdo_t + h * sdo_h + offs_m[:, None] * sdo_t + offs_dv[None, :],
                    offs_m, seqlen_q, offs_dv, HEAD_DIM_V, True, PAD_DV)
    lse = _lse2(LSE + bb * slse_b + h * slse_h + q0, offs_m, seqlen_q, True)
    o = _load_tile(O + bb * so_b + q0 * so_t + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :], offs_m,
                   seqlen_q, offs_dv, HEAD_DIM_V, True, PAD_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = bb * slse_b + h * slse_h + q0 + offs_m  # LSE, dLSE and Delta: dense [B, H, T]
    if HAS_DLSE:
        delta -= tl.load(DLSE + stats, mask=offs_m < seqlen_q, other=0.0)
    store_delta = offs_m < seqlen_q
    if SPLIT:
        store_delta &= slot < 0
    tl.store(DELTA + stats, delta, mask=store_delta)
    if SPLIT:
        if skip:
            return
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPARSE:
        row = ((b * MB_B) * HM + h * MB_H) * NQB + pid_m
        SUB: tl.constexpr = MASK_N // BLOCK_N
        f_lo, f_hi, p_lo, p_hi = _walk_ranges(FULL_NUM, KV_NUM, row, u0, u1, SPLIT)
        for j in range(f_lo * SUB, f_hi * SUB):  # (listed block, key step) in one loop, as in dK/dV
            n0 = tl.load(FULL_IDX + row * NKB + j // SUB) * MASK_N + (j % SUB) * BLOCK_N
            dq = _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out,
                          LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                          PAD_D, PAD_DV, ARITH, False, WORDS, SOFTCAP, DOT_PREC)
        for j in range(p_lo * SUB, p_hi * SUB):
            kb, c0 = tl.load(KV_IDX + row * NKB + j // SUB), (j % SUB) * BLOCK_N
            tile = tl.load(TILE_MAP + row * NKB + kb)
            dq = _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, kb * MASK_N + c0, pos, seqlen_k, qk_scale,
                          cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, tile, c0, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V,
                          BLOCK_M, BLOCK_N, PAD_D, PAD_DV, True, True, WORDS, SOFTCAP, DOT_PREC)
    else:
        lo, a, c, hi = _kv_stages(m0, seqlen_q, seqlen_k, off, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        for n0 in range(0, tl.minimum(tl.cdiv(SINKS, BLOCK_N) * BLOCK_N, lo), BLOCK_N):  # sinks left of the window
            dq = _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out,
                          LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                          PAD_D, PAD_DV, True, False, WORDS, SOFTCAP, DOT_PREC)
        for n0 in range(lo, a, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out,
                          LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                          PAD_D, PAD_DV, True, False, WORDS, SOFTCAP, DOT_PREC)
        for n0 in tl.range(a, c, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out,
                          LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                          PAD_D, PAD_DV, False, False, WORDS, SOFTCAP, DOT_PREC)
        for n0 in range(c, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out,
                          LEFT, RIGHT, SINKS, BITS, 0, 0, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                          PAD_D, PAD_DV, True, False, WORDS, SOFTCAP, DOT_PREC)
    dq = dq * (qk_scale * 0.6931471805599453)
    to_part: tl.constexpr = False
    if SPLIT:
        to_part = slot >= 0
    if to_part:  # a part's partial sum, added up by the launcher
        _store_part(DQ_PART, slot, 0, dq, offs_d, BLOCK_M, HEAD_DIM)
    else:
        dq_ptrs = DQ + bb * sdq_b + q0 * sdq_t + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :]
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------- launcher
def bwd_configs(D: int, dtype: torch.dtype, fixed: tuple[int, int] | None, kind: str) -> list[Config]:
    """Candidate (BLOCK_M, BLOCK_N, warps, stages); dK/dV prefers tall key blocks, dQ tall query blocks."""
    from .._triton_mode import interpreting

    if fixed is not None:  # the block mask's tiles; dK/dV may walk its query blocks in halves, dQ its key blocks
        bm, bn = fixed  # (the dense winners below, where the mask's blocks allow them)
        cands = [Config(bm, bn, 4, 2), Config(bm, bn, 8, 2), Config(bm, bn, 8, 3)]
        if kind == "dkdv" and bm >= 32 and dtype != torch.float32:  # spill-free at D = 128 (see _dkdv_kernel)
            cands += [Config(bm // 2, bn, 8, 2), Config(bm // 2, bn, 4, 2)]
            if D > 64:
                cands += [Config(bm // 2, bn, 8, 2, ahead=1), Config(bm // 2, bn, 8, 3, ahead=1)]
        if kind == "dq" and bn >= 32 and dtype != torch.float32:
            warps = 8 if D > 64 else 4
            cands += [Config(bm, bn // 2, warps, 3), Config(bm, bn // 2, warps, 2 if D > 64 else 4)]
        return cands[:1] if interpreting() else cands
    if interpreting():
        return [Config(32, 32, 4, 1)]
    if dtype == torch.float32:
        return [Config(32, 32, 4, 2)]
    if D > 128:
        return [Config(32, 64, 4, 2), Config(64, 32, 4, 2)]
    # Measured on the H100 (benchmarks/results/flash_bwd_profile_2026-12-05_h100_run2.json, N = 16k): the first
    # of each list is the best seen so far. dK/dV at D = 128: the EARLY_DP loop (ahead=1, dP^T issued before
    # the exponentials) won by 4-5% (causal 2 stages, non-causal 3); at D = 64 it lost by 14%.
    # One-warpgroup tiles at D = 128 (dK/dV 64 x 64 in 2 stages, dQ 64 x 32) win where programs are short: N = 1k
    # causal, 1024-key windows (fwd+bwd +7-12%, flash_tiles_2026-12-06_h100.md).
    if kind == "dkdv":
        if D <= 64:
            return [Config(32, 128, 4, 3), Config(32, 64, 4, 3), Config(64, 64, 4, 3)]
        # Not listed: 32-row steps over 128 keys at 8 warps, the one D = 128 tile without spills on sm_90a (the
        # window's 64 x 64 pick spills 580 bytes), lost 10-13% on the window (flash_tiles_2026-12-07_h100.md).
        # Q, dO through TMA descriptors (tma=1): at the window's 64 x 64 tile sm_90a spills 124 bytes instead of
        # 580, none of them in the unmasked loop (38 accesses a tile before), which runs 485 instructions a tile
        # instead of 522 (benchmarks/flash_compile.py --kernel dkdv --tma); timed on the H100 (2026-12-07 19:19
        # and 21:38), it stays within 3% of the pointer tile: 0.4-2.8% slower on the window, -0.3 / +1.6% on
        # dense causal 16k (picked once), so the spills cost little there.
        return [Config(64, 128, 8, 2, ahead=1), Config(64, 128, 8, 3, ahead=1), Config(64, 128, 8, 3),
                Config(64, 64, 4, 2), Config(64, 64, 4, 2, 1), Config(64, 128, 8, 2, 1, ahead=1)]
    if D <= 64:
        return [Config(64, 32, 4, 3), Config(128, 32, 4, 4), Config(128, 32, 4, 3)]
    # Not listed: dQ 64 x 32 in 2 stages capped at 160 registers (Config.regs; three programs an SM instead of two,
    # 16 bytes of spills on sm_90a): the window's fwd+bwd +6% / +3% at 8k / 16k on one H100, -1% / -7% on another
    # (flash_dq_regs_2026-12-07_h100.md), its dQ kernel 0.7-2% slower on a third (2026-12-07 19:20).
    return [Config(128, 64, 8, 3), Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(128, 32, 8, 3),
            Config(64, 32, 4, 3)]


# Launch plans of fixed-length backwards (dense or block-sparse), keyed like the forward's (flash_fwd._PLANS): the
# two launches with their static arguments, replayed on new tensors.
_PLANS: dict = {}


def _run(plan, q, k, v, o, do, lse, dlse, sparse=None, splits=(None, None)):
    """Replay a cached plan (dense or block-sparse, fixed-length batches) on new tensors."""
    kv, (q_static, q_launch) = plan
    dq, dk, dv, delta = _outputs(q, k, v)
    sp_q, sp_kv, parts = _sparse_args(sparse, splits, delta, k.shape[2], k.shape[3], v.shape[3])
    q_launch(q, k, v, o, do, lse, delta if dlse is None else dlse, delta, dq, delta, *q_static, *sp_q)
    if splits[0] is not None:
        combine(splits[0], parts[0], dq)
    _launch_dkdv(kv, (q, k, v, do, lse, delta, dk, dv, delta), sp_kv)
    if splits[1] is not None:
        combine(splits[1], parts[1], dk)
        combine(splits[1], parts[2], dv)
    return dq, dk, dv


def _outputs(q, k, v):
    """Fresh dq, dk, dv and the dQ kernel's Delta `[B, H, T]` (float32)."""
    B, T, H, _ = q.shape
    return (empty_output(q.shape, q.dtype, q.device), empty_output(k.shape, k.dtype, k.device),
            empty_output(v.shape, v.dtype, v.device), empty_output((B, H, T), torch.float32, q.device))


def _sparse_args(sparse, splits, delta, Hkv: int, D: int, Dv: int):
    """(dQ's, dK/dV's) block-mask and split arguments, and the parts' float32 buffers (dq, dk, dv)."""
    if sparse is None:
        return _no_sparse_args(delta, 1), _no_sparse_args(delta, 2), None
    (split_q, split_kv), (B, H, _) = splits, delta.shape
    parts = (part_buffer(split_q, sparse.block[0], D, delta), part_buffer(split_kv, sparse.block[1], D, delta),
             part_buffer(split_kv, sparse.block[1], Dv, delta))
    return (sparse.kernel_args() + split_args(split_q, B * H, delta) + (parts[0],),
            sparse.kernel_args_transposed() + split_args(split_kv, B * Hkv, delta) + tuple(parts[1:]),
            parts)


def _no_sparse_args(t: torch.Tensor, n_part_buffers: int) -> tuple:
    """The block-sparse and split arguments of a dense launch (unread placeholders)."""
    return (t,) * 6 + (0, 0, 1, 1, 1) + (t, t, 0, 1) + (t,) * n_part_buffers


# Attention sinks: the dense dK/dV program of a sink block would walk every query row (each sees the sinks),
# T / BLOCK_M steps while the others walk a band: 256 steps against 17 at N = 16k with a 1024-key window, one
# such program per head. (On the H100, 2026-12-06, StreamingLLM's fwd+bwd there took 0.53 ms more than the
# plain window's.) Its rows below the band are cut into parts of at least SINK_PART_ROWS rows (and the band's
# length), at most MAX_SINK_PARTS parts.
SINK_PART_ROWS = 1024
MAX_SINK_PARTS = 32


def sink_split(sinks: int, T: int, S: int, left: int, right: int, block_n: int) -> tuple[int, int]:
    """(parts, rows) of a dense dK/dV launch with sinks: `parts` programs per sink block walk its rows below
    the band (0: no split, the sink blocks' programs walk them), `rows` = keys of the sink blocks."""
    if not sinks:
        return 0, 0
    band = min(left, T) + min(right, T) + 1
    parts = min(cdiv(T, max(band, SINK_PART_ROWS)) - 1, MAX_SINK_PARTS)
    return (parts, cdiv(min(sinks, S), block_n) * block_n) if parts >= 2 else (0, 0)


def _launch_dkdv(part, tensors, sparse_args) -> None:
    """Run a dK/dV launch `part` = (static args, launch, (sink parts, sink rows), TMA rows) on `tensors` = (q,
    k, v, do, lse, delta, dk, dv, cu); with TMA rows (its BLOCK_M) q and do go as tensor descriptors; with sink
    parts, its float32 partial sums of the sink blocks are added up into dk / dv here (a sum over the parts'
    axis and a copy: a few microseconds)."""
    static, launch, (parts, rows), tma_rows = part
    q, k, v, do, lse, delta, dk, dv, cu = tensors
    if tma_rows:
        q, do = _descriptor(q, tma_rows), _descriptor(do, tma_rows)
    if not parts:
        launch(q, k, v, do, lse, delta, dk, dv, cu, delta, delta, *static, *sparse_args)
        return
    B, S, Hkv, D = k.shape
    sink_dk = torch.empty((parts + 1, B, rows, Hkv, D), dtype=torch.float32, device=k.device)
    sink_dv = torch.empty((parts + 1, B, rows, Hkv, v.shape[3]), dtype=torch.float32, device=k.device)
    launch(q, k, v, do, lse, delta, dk, dv, cu, sink_dk, sink_dv, *static, *sparse_args)
    n = min(rows, S)
    dk[:, :n] = sink_dk.sum(0)[:, :n]
    dv[:, :n] = sink_dv.sum(0)[:, :n]


def flash_bwd(do, dlse, q, k, v, o, lse, *, scale, causal, window, sinks, softcap, cu_seqlens, max_seqlen, sparse):
    """Gradients (dq, dk, dv) of `flash_fwd`'s outputs (dlse, `[B, H, T]` float32, may be None)."""
    B, T, H, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    # The kernels index LSE with its batch/head strides and read dLSE with delta's: both must be dense.
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    varlen = cu_seqlens is not None
    dense = not varlen and sparse is None
    splits = (None, None)
    if sparse is not None:
        splits = (mask_split(sparse, False, B, H, 1), mask_split(sparse, True, B, Hkv, H // Hkv))
    if not varlen:  # dense or block-sparse: a launch plan per signature (the mask's by its geometry)
        ts = (q, k, v, o, do)
        aligned = tuple(t.data_ptr() % 16 for t in ts + (lse,) + (() if dlse is None else (dlse,)))
        sig = (tuple(t.shape for t in ts), tuple(t.stride() for t in ts), aligned, q.dtype, q.device, scale, causal,
               window, sinks, softcap, dlse is None, tuner_env(), sparse_signature(sparse, splits))
        plan = _PLANS.get(sig)
        if plan is not None:
            return _run(plan, q, k, v, o, do, lse, dlse, sparse, splits)
    n_seq = cu_seqlens.numel() - 1 if varlen else B
    left, right = window if window is not None else (NO_LIMIT, NO_LIMIT)
    if causal:
        right = 0
    cap_in = scale / softcap if softcap else 1.0
    cap_out = softcap * LOG2E if softcap else 1.0
    arith = causal or window is not None
    fixed = sparse.block if sparse is not None else None
    split_q, split_kv = splits
    rows = max_seqlen if varlen else T
    cols = max_seqlen if varlen else S
    scal = (scale * LOG2E, cap_in, cap_out, left, right, sinks)
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), VARLEN=varlen,
                SPARSE=sparse is not None, ARITH=arith, WORDS=sparse.words if sparse is not None else 1,
                SOFTCAP=bool(softcap), DOT_PREC=dot_precision(q.dtype))
    # Output and delta strides are those of fresh dense tensors, fixed by the shapes.
    dq_strides = (T * H * D, H * D, D)
    dk_strides, dv_strides = (S * Hkv * D, Hkv * D, D), (S * Hkv * Dv, Hkv * Dv, Dv)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
               v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1))

    tma_ok = _tma_ok(q, do, do, varlen)  # q and do as [B, T, H * D] descriptors for dK/dV (K, V: pointers)

    def dkdv_part(cfg: Config):
        bm, bn = cfg[:2]
        if sparse is not None and (bn != fixed[1] or fixed[0] % bm):
            raise ValueError(f"a block-sparse dK/dV configuration must keep the block mask's key block and split "
                             f"its query block evenly: mask block {fixed}, got BLOCK_M={bm}, BLOCK_N={bn}")
        kv_grid = sparse.num_kv_blocks if sparse is not None else cdiv(cols, bn)
        parts, sink_rows = sink_split(sinks, T, S, left, right, bn) if dense else (0, 0)
        extra = extra_rows(split_kv, kv_grid, 1)
        grid = (kv_grid + parts * sink_rows // bn, n_seq * Hkv + extra)
        tma = bool(cfg[4]) and tma_ok
        return ((*strides, *dk_strides, *dv_strides, T, S, Hkv, H // Hkv, *scal, kv_grid, parts, sink_rows),
                KernelLaunch(_dkdv_kernel, grid, dict(meta, BLOCK_M=bm, BLOCK_N=bn, MASK_M=fixed[0] if fixed else bm,
                                                      EARLY_DP=bool(cfg[6]), SINK_PARTS=parts > 0,
                                                      SPLIT=split_kv is not None, TMA=tma, **cfg.options())),
                (parts, sink_rows), bm if tma else 0)

    def dq_part(cfg: Config):
        bm, bn = cfg[:2]
        if sparse is not None and (bm != fixed[0] or fixed[1] % bn):
            raise ValueError(f"a block-sparse dQ configuration must keep the block mask's query block and split "
                             f"its key block evenly: mask block {fixed}, got BLOCK_M={bm}, BLOCK_N={bn}")
        grid0 = sparse.num_q_blocks if sparse is not None else cdiv(rows, bm)
        grid = (grid0, n_seq * H + extra_rows(split_q, grid0, 1))
        return ((*strides, o.stride(0), o.stride(1), o.stride(2), *dq_strides, T, S, H, H // Hkv, *scal),
                KernelLaunch(_dq_kernel, grid, dict(meta, BLOCK_M=bm, BLOCK_N=bn, MASK_N=fixed[1] if fixed else bn,
                                                    HAS_DLSE=dlse is not None, SPLIT=split_q is not None,
                                                    **cfg.options())))

    # The tuner times each candidate on this call's tensors (cu_seqlens and the sparse index lists included).
    dq, dk, dv, delta = _outputs(q, k, v)  # delta: written by the dQ kernel, read by dK/dV's
    cu = cu_seqlens if varlen else delta
    sp_q, sp_kv, parts = _sparse_args(sparse, splits, delta, Hkv, D, Dv)  # parts: the split walks' sums

    def run_dkdv(part):
        _launch_dkdv(part, (q, k, v, do, lse, delta, dk, dv, cu), sp_kv)

    def run_dq(part):
        part[1](q, k, v, o, do, lse, delta if dlse is None else dlse, delta, dq, cu, *part[0], *sp_q)

    key = (D, Dv, q.dtype, arith, bool(softcap), sparse.tuning_class if sparse is not None else None, varlen,
           seqlen_bucket(max(rows, cols)), window_bucket(window, left, right, cols))
    d = max(D, Dv)
    # dQ first: its launch writes the Delta that dK/dV reads (tuning dQ writes it too, before dK/dV's timing)
    qp = dq_part(pick_config(("dq",) + key, bwd_configs(d, q.dtype, fixed, "dq"), lambda c: run_dq(dq_part(c))))
    run_dq(qp)
    if split_q is not None:
        combine(split_q, parts[0], dq)
    kv = dkdv_part(pick_config(("dkdv",) + key, bwd_configs(d, q.dtype, fixed, "dkdv"),
                               lambda c: run_dkdv(dkdv_part(c))))
    run_dkdv(kv)
    if split_kv is not None:
        combine(split_kv, parts[1], dk)
        combine(split_kv, parts[2], dv)
    if not varlen:
        remember_plan(_PLANS, sig, (kv, qp))
    return dq, dk, dv
