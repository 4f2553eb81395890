"""FlashAttention-2 forward in Triton (Dao 2023, Alg. 1): one program per (query block, batch, head).

Q stays in registers, K/V tiles stream through shared memory, the row max m and row sum l are updated
online, and O and the natural-log LSE are written once. Dense problems visit the keys of their window in
three stages (masked, unmasked, masked) so that only boundary tiles pay for the mask; block-sparse
problems visit the full and the partial KV blocks of the BlockMask's index lists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._memory import empty_output

from ._flash_split import (_split_program, _store_part, _walk_ranges, combine, extra_rows, mask_split, part_buffer,
                           sparse_signature, split_args)
from ._flash_common import (Config, _dot, _kv_stages, _lazy_softmax_step, _load_tile, _scores, _sequence,
                            _softmax_step, _tile_bits, _visible, KernelLaunch, block_d, cdiv, dot_precision,
                            pick_config, remember_plan, seqlen_bucket, tuner_env, window_bucket)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_scores(q, Kb, sk_t, n0, seqlen_k, offs_d, bb, kcol, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                PAD_D: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """Raw scores Q K^T `[BLOCK_M, BLOCK_N]` of the key block [n0, n0 + BLOCK_N). With TMA, Kb is a tensor
    descriptor over [B, S, Hkv * D] (the copy engine zero-fills rows past S), else a pointer."""
    if TMA:
        k = Kb.load([bb, n0, kcol]).reshape([BLOCK_N, HEAD_DIM])
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(Kb + offs_n[:, None] * sk_t + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_DIM, MASK,
                       PAD_D)
    return _dot(q, tl.trans(k), None, DOT_PREC)


@triton.jit
def _fwd_update(qk, acc, l_i, m_i, Vb, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS,
                tile, r0, c0, offs_dv, bb, vcol, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PAD_DV: tl.constexpr, MASK: tl.constexpr, USE_BITS: tl.constexpr,
                MASK_M: tl.constexpr, WORDS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                TMA: tl.constexpr, LAZY: tl.constexpr = False):
    """Online-softmax step of the key block [n0, n0 + BLOCK_N) from its raw scores qk: mask, rescale,
    acc += P V. With USE_BITS the tile is rows r0.., columns c0.. of partial tile `tile` of the block mask
    (MASK_M rows a tile). LAZY (unmasked tiles): acc is rescaled only when the running max moved
    (`_lazy_softmax_step`). Returns (acc, l, m)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if SOFTCAP:
        s, _ = _scores(qk, qk_scale, cap_in, cap_out, SOFTCAP)
        c = 1.0
    else:  # the scale is folded into the softmax step's FMA
        s = qk
        c = qk_scale
    if MASK:
        keep = _visible(pos[:, None], offs_n[None, :], seqlen_k, LEFT, RIGHT, SINKS)
        if USE_BITS:
            keep &= _tile_bits(BITS, tile, r0 + tl.arange(0, BLOCK_M)[:, None], c0 + tl.arange(0, BLOCK_N)[None, :],
                               MASK_M, WORDS)
        s = tl.where(keep, s, float("-inf"))
    if LAZY and not MASK:
        p, acc, l_i, m_new = _lazy_softmax_step(s, c, c, acc, l_i, m_i)
    else:
        p, alpha, l_i, m_new = _softmax_step(s, c, c, 0.0, m_i, l_i, MASK)
        acc = acc * alpha[:, None]
    if TMA:
        v = Vb.load([bb, n0, vcol]).reshape([BLOCK_N, HEAD_DIM_V])
    else:
        v = _load_tile(Vb + offs_n[:, None] * sv_t + offs_dv[None, :], offs_n, seqlen_k, offs_dv, HEAD_DIM_V,
                       MASK, PAD_DV)
    acc = _dot(p.to(v.dtype), v, acc, DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT,
              SINKS, BITS, tile, r0, c0, offs_d, offs_dv, bb, kcol, vcol, HEAD_DIM: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr,
              PAD_DV: tl.constexpr, MASK: tl.constexpr, USE_BITS: tl.constexpr, MASK_M: tl.constexpr,
              WORDS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
              LAZY: tl.constexpr = False):
    """One online-softmax step over the key block [n0, n0 + BLOCK_N): scores, then the update."""
    qk = _fwd_scores(q, Kb, sk_t, n0, seqlen_k, offs_d, bb, kcol, HEAD_DIM, BLOCK_N, PAD_D, MASK, DOT_PREC, TMA)
    return _fwd_update(qk, acc, l_i, m_i, Vb, sv_t, n0, pos, seqlen_k, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS,
                       BITS, tile, r0, c0, offs_dv, bb, vcol, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_DV, MASK, USE_BITS,
                       MASK_M, WORDS, SOFTCAP, DOT_PREC, TMA, LAZY)


@triton.jit
def _flash_fwd_kernel(
        Q, K, V, O, LSE, CU,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, slse_b, slse_h,
        T, S, H, GROUP, qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS,
        KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, TILE_MAP, BITS, MB_B, MB_H, HM, NQB, NKB,
        FLAGS, PARTS, NPARTS, NBH, O_PART, LSE_PART,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, SPARSE: tl.constexpr,
        ARITH: tl.constexpr, WORDS: tl.constexpr, SOFTCAP: tl.constexpr, REVERSE: tl.constexpr,
        DOT_PREC: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, AHEAD: tl.constexpr, MASK_M: tl.constexpr,
        MASK_N: tl.constexpr, SPLIT: tl.constexpr, LAZY: tl.constexpr):
    """O and LSE of one query block. Block-sparse, the program covers BLOCK_M of its mask block's MASK_M rows
    and walks each listed key block (MASK_N keys) BLOCK_N keys at a time: the mask's 128-row blocks may run as
    two one-warpgroup programs of 64 rows, which share an SM (the dense kernel's winner on short programs).

    SPLIT (block-sparse): the long walks are cut into parts (`_flash_split`), each a program on the grid's
    second axis past the first NBH rows, which walks units [u0, u1) of its block's list and stores its rows'
    normalised float32 output and LSE to O_PART `[NPARTS, MASK_M, Dv]` / LSE_PART `[NPARTS, MASK_M]`."""
    pid_m = tl.program_id(0)
    if REVERSE:  # causal: start the longest rows first so the last wave is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    u0 = 0
    u1 = 0
    if SPLIT:
        b, h, pid_m, u0, u1, slot, skip = _split_program(FLAGS, PARTS, NPARTS, NBH, H, NQB, MASK_M // BLOCK_M)
        if skip:
            return
    q0, seqlen_q, seqlen_k, bb = _sequence(CU, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = offs_m + off
    kcol = (h // GROUP) * HEAD_DIM
    vcol = (h // GROUP) * HEAD_DIM_V
    if TMA:  # dense, unpadded, [B, T, H * D] layouts only (the launcher checks)
        Kb = K
        Vb = V
        q = Q.load([bb, m0, h * HEAD_DIM]).reshape([BLOCK_M, HEAD_DIM])
    else:
        Kb = K + bb * sk_b + q0 * sk_t + (h // GROUP) * sk_h
        Vb = V + bb * sv_b + q0 * sv_t + (h // GROUP) * sv_h
        q = _load_tile(Q + bb * sq_b + q0 * sq_t + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], offs_m,
                       seqlen_q, offs_d, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    PAD_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V
    if SPARSE:
        SUB_M: tl.constexpr = MASK_M // BLOCK_M
        SUB_N: tl.constexpr = MASK_N // BLOCK_N
        row = ((b * MB_B) * HM + h * MB_H) * NQB + pid_m // SUB_M
        r0 = (pid_m % SUB_M) * BLOCK_M
        f_lo, f_hi, p_lo, p_hi = _walk_ranges(FULL_NUM, KV_NUM, row, u0, u1, SPLIT)
        for j in range(f_lo * SUB_N, f_hi * SUB_N):  # (listed block, key step) in one loop
            n0 = tl.load(FULL_IDX + row * NKB + j // SUB_N) * MASK_N + (j % SUB_N) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in,
                                      cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_d, offs_dv, bb, kcol, vcol,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, ARITH, False, MASK_M,
                                      WORDS, SOFTCAP, DOT_PREC, TMA)
        for j in range(p_lo * SUB_N, p_hi * SUB_N):
            kb, c0 = tl.load(KV_IDX + row * NKB + j // SUB_N), (j % SUB_N) * BLOCK_N
            tile = tl.load(TILE_MAP + row * NKB + kb)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, kb * MASK_N + c0, pos, seqlen_k,
                                      qk_scale, cap_in, cap_out, LEFT, RIGHT, SINKS, BITS, tile, r0, c0, offs_d,
                                      offs_dv, bb, kcol, vcol, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV,
                                      True, True, MASK_M, WORDS, SOFTCAP, DOT_PREC, TMA)
    else:
        lo, a, c, hi = _kv_stages(m0, seqlen_q, seqlen_k, off, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        for n0 in range(0, tl.minimum(tl.cdiv(SINKS, BLOCK_N) * BLOCK_N, lo), BLOCK_N):  # masked: sinks left of it
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in,
                                      cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_d, offs_dv, bb, kcol, vcol,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, True, False, MASK_M,
                                      WORDS, SOFTCAP, DOT_PREC, TMA)
        for n0 in range(lo, a, BLOCK_N):  # masked: left window edge
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in,
                                      cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_d, offs_dv, bb, kcol, vcol,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, True, False, MASK_M,
                                      WORDS, SOFTCAP, DOT_PREC, TMA)
        if AHEAD:  # unmasked, each block's Q K^T issued before the previous block's softmax (overlap)
            if a < c:
                qk = _fwd_scores(q, Kb, sk_t, a, seqlen_k, offs_d, bb, kcol, HEAD_DIM, BLOCK_N, PAD_D, False,
                                 DOT_PREC, TMA)
                for n0 in range(a, c - BLOCK_N, BLOCK_N):
                    qk_next = _fwd_scores(q, Kb, sk_t, n0 + BLOCK_N, seqlen_k, offs_d, bb, kcol, HEAD_DIM, BLOCK_N,
                                          PAD_D, False, DOT_PREC, TMA)
                    acc, l_i, m_i = _fwd_update(qk, acc, l_i, m_i, Vb, sv_t, n0, pos, seqlen_k, qk_scale, cap_in,
                                                cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_dv, bb, vcol,
                                                HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_DV, False, False, MASK_M, WORDS,
                                                SOFTCAP, DOT_PREC, TMA)
                    qk = qk_next
                acc, l_i, m_i = _fwd_update(qk, acc, l_i, m_i, Vb, sv_t, c - BLOCK_N, pos, seqlen_k, qk_scale, cap_in,
                                            cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_dv, bb, vcol, HEAD_DIM_V,
                                            BLOCK_M, BLOCK_N, PAD_DV, False, False, MASK_M, WORDS, SOFTCAP, DOT_PREC,
                                            TMA)
        else:
            for n0 in tl.range(a, c, BLOCK_N, warp_specialize=WS):  # unmasked
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in,
                                          cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_d, offs_dv, bb, kcol, vcol,
                                          HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, False, False,
                                          MASK_M, WORDS, SOFTCAP, DOT_PREC, TMA, LAZY)
        # masked: diagonal / right window edge / end of the keys. After the look-ahead loop, unpipelined: its
        # pipelined copy took ptxas to 255 registers, which then issued the look-ahead loop's exponentials after
        # the wait for Q K^T, not beside it (benchmarks/flash_compile.py, loop_mufu_in_flight 34 -> 0)
        for n0 in tl.range(c, hi, BLOCK_N, num_stages=1 if AHEAD else None):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kb, Vb, sk_t, sv_t, n0, pos, seqlen_k, qk_scale, cap_in,
                                      cap_out, LEFT, RIGHT, SINKS, BITS, 0, 0, 0, offs_d, offs_dv, bb, kcol, vcol,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, PAD_D, PAD_DV, True, False, MASK_M,
                                      WORDS, SOFTCAP, DOT_PREC, TMA)
    # Rows that see no key at all output 0 and LSE -inf, like the reference.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_m < seqlen_q
    to_part: tl.constexpr = False
    if SPLIT:
        to_part = slot >= 0
    if to_part:  # a part's rows: every row of the mask block (the combine reads them all)
        r0 = (pid_m % (MASK_M // BLOCK_M)) * BLOCK_M
        _store_part(O_PART, slot, r0, o, offs_dv, MASK_M, HEAD_DIM_V)
        tl.store(LSE_PART + slot * MASK_M + r0 + tl.arange(0, BLOCK_M), lse)
    else:
        if TMA:  # the copy engine clips rows past T
            O.store([bb, m0, h * HEAD_DIM_V], o.to(q.dtype).reshape([1, BLOCK_M, HEAD_DIM_V]))
        else:
            o_ptrs = O + bb * so_b + q0 * so_t + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :]
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
        tl.store(LSE + bb * slse_b + h * slse_h + q0 + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------- launcher
def fwd_configs(D: int, dtype: torch.dtype, fixed: tuple[int, int] | None) -> list[Config]:
    """Candidate tiles for the forward (H100): larger D or fp32 need smaller tiles to fit shared memory."""
    from .._triton_mode import interpreting

    if fixed is not None:  # block-sparse: the BlockMask's blocks, or (one-warpgroup programs, as the dense winner
        # on short programs) half its query rows in key steps of up to 64
        bm, bn = fixed
        cands = [Config(bm, bn, 4, 3), Config(bm, bn, 8, 3), Config(bm, bn, 8, 3, 1), Config(bm, bn, 4, 3, 1)]
        if bm >= 32 and dtype != torch.float32:
            cands += [Config(bm // 2, min(bn, 64), 4, 3, 1), Config(bm // 2, min(bn, 64), 4, 3)]
        return cands[:1] if interpreting() else cands
    if interpreting():
        return [Config(32, 32, 4, 1)]
    if dtype == torch.float32:
        return [Config(64, 32, 4, 2)]
    # 64 x 64 TMA tiles (one warpgroup, two programs per SM) win where programs are short: N = 1k, causal 4k at
    # D = 64, 1024-key windows (+4-20% over the 128-row tiles on the H100, flash_tiles_2026-12-06_h100.md)
    if D <= 64:  # measured on the H100 (benchmarks/results): 256-row tiles and 8 warps never won (the 8-warp
        # look-ahead loop neither: 1.20-1.26x the best, lookahead_2026-12-05_h100.md). The 64 x 64 TMA tile in two
        # stages: 41 KB of shared memory instead of 57 and 107 registers on sm_90a, so four programs share an SM
        # instead of three; picked at causal N = 1k (-2.4%), 0.3-12% slower elsewhere (session_2026-12-07d_h100.md)
        return [Config(128, 64, 4, 3), Config(128, 128, 4, 3), Config(128, 64, 4, 3, 1), Config(128, 64, 4, 4, 1),
                Config(64, 64, 4, 3, 1), Config(64, 64, 4, 2, 1), *_LAZY_CANDIDATES]
    # Not used: Q (and, in the backward, dO, K, V) kept in registers for wgmma's register-A form through an opaque
    # move: +1-3% for the 64 x 64 forward, -8% for the 128 x 128 causal one, -15% for the window's backward, -7-11% for
    # the FP8 forwards (H100, flash_a_regs_2026-12-07_h100.md).
    if D <= 128:  # the look-ahead loop (sm_90a overlaps its exponentials with the next Q K^T only at 8 warps and
        # 64-key tiles) came within 2-14% of the 128 x 128 TMA tile on the H100, 2026-12-05. Not listed: the 64 x 64
        # TMA tile unpipelined (one stage: 32 KB of shared memory, 133 registers, three programs an SM instead of
        # two) lost in every cell, N = 1k to 16k and the 1024-key window, by 7-45% (session_2026-12-07d_h100.md).
        # Nor the 128 x 64 TMA tile in two stages capped at 128 registers (98 KB of shared memory, no spills on
        # sm_90a, two 8-warp programs an SM whose warpgroups share K / V: half the L2 reads of the 64-row tiles;
        # ptxas serializes its wgmma at that cap): at N = 1k the fastest 128-row tile (0.330 / 0.225 ms against
        # 0.353 / 0.256 non-causal / causal) but 5-6% behind the 64 x 64 one; 6-12% behind at 4k, 4-6% on the
        # window (H100, session_2026-12-07e_h100.md)
        return [Config(128, 128, 8, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 2), Config(128, 128, 8, 3, 1),
                Config(128, 64, 8, 3, 1), Config(128, 128, 8, 2, 1), Config(128, 64, 8, 3, ahead=1),
                Config(64, 64, 4, 3, 1)]
    return [Config(64, 64, 4, 2), Config(128, 64, 8, 2)]


# The lazy rescale (LAZY) on the leading D <= 64 tiles: compiled for sm_90a its unmasked loop skips 88 of 553
# instructions per tile (128 x 64, 4 warps: 465 against the eager loop's 514; with TMA 455 against 511) when no
# row's max grew past the threshold, for a program-wide max (a shared-memory reduction and two barriers per tile;
# `flash_compile.py --lazy`, loop_skippable). The forward at D = 64 issues ~8 instructions per score, as many as
# its exp units and tensor cores allow (16 scores per cycle and SM each). H100, 2026-12-07
# (session_2026-12-07c_h100.md): picked at D = 64 non-causal 16k (-2.4% against the same tile eager), 3% slower at
# 4k and causal. At D = 128 the two lazy tiles (128 x 128, 8 warps, with and without TMA) lost in all four cells
# (+3-5%): not listed.
_LAZY_CANDIDATES = [Config(128, 64, 4, 3, lazy=1), Config(128, 64, 4, 3, 1, lazy=1)]


def no_sparse_args(t: torch.Tensor) -> tuple:
    """The block-sparse and split arguments of a dense launch (unread placeholders)."""
    return (t,) * 6 + (0, 0, 1, 1, 1) + (t, t, 0, 1, t, t)


def _sparse_args(sparse, split, lse, Dv: int):
    """A forward launch's block-mask and split arguments, and the split walks' float32 buffers (o `[parts, rows,
    Dv]`, LSE `[parts, rows]`, merged into o and lse after the launch) or None."""
    if sparse is None:
        return no_sparse_args(lse), None
    o_part, lse_part = part_buffer(split, sparse.block[0], Dv, lse), part_buffer(split, sparse.block[0], None, lse)
    B, H = lse.shape[:2]
    args = sparse.kernel_args() + split_args(split, B * H, lse) + (o_part, lse_part)
    return args, None if split is None else (o_part, lse_part)


def _tma_ok(q, k, v, varlen: bool) -> bool:
    """TMA descriptors cover [B, N, H * D] views: fixed-length batches, unpadded head dims, rows of whole
    heads (o is allocated that way), 16-byte aligned bases. Block-sparse problems qualify too: a KV block
    from the index list is a descriptor load at its row offset, like a dense one."""
    def rows_of_heads(t):
        return (t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(1) == t.shape[2] * t.shape[3]
                and t.data_ptr() % 16 == 0)

    return (not varlen and q.dtype != torch.float32
            and all(block_d(t.shape[3]) == t.shape[3] and rows_of_heads(t) for t in (q, k, v)))


def _descriptor(t, block_rows: int):
    """Host TMA descriptor over the [B, N, H * D] view of t. Built without TensorDescriptor's checks, which
    cost more than the launch on short sequences: `_tma_ok` has checked alignment and layout."""
    B, N, H, D = t.shape
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = t, [B, N, H * D], [t.stride(0), t.stride(1), 1]
    desc.block_shape, desc.padding = [1, block_rows, D], "zero"
    return desc


# Launch plans of fixed-length problems (dense, or block-sparse keyed by the mask's geometry), keyed by everything
# but the data (and by what the kernel specialises on: shapes, strides, dtypes, pointer alignment): a repeated
# call skips tuning lookups, argument building and the JIT's launch path (KernelLaunch). Block-sparse calls went
# through that path on every call: on the H100 (2026-12-07) BigBird's fwd+bwd at 8k took 1.33 ms of wall time
# for 0.81 ms of kernels.
_PLANS: dict = {}


def _plan(cfg: Config, grid, args, meta):
    bm, bn, _, _, tma, ws, ahead, _, lazy = cfg
    return cfg, args, KernelLaunch(_flash_fwd_kernel, grid, dict(meta, TMA=bool(tma), WS=bool(ws), AHEAD=bool(ahead),
                                                                 LAZY=bool(lazy), BLOCK_M=bm, BLOCK_N=bn,
                                                                 **cfg.options()))


def _launch(plan, q, k, v, o, lse, cu, sp) -> None:
    (bm, bn, _, _, tma, _, _, _, _), args, launch = plan
    ts = (_descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(o, bm)) if tma else (q, k, v, o)
    launch(*ts, lse, cu, *args, *sp)


def flash_fwd(q, k, v, *, scale, causal, window, sinks, softcap, cu_seqlens, max_seqlen, sparse):
    """Launch the forward. q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` -> (o, lse `[B, H, T]`).

    `window` is a normalized (left, right) pair or None, `sinks` the number of attention-sink keys (0 for
    none; with a window only); `sparse` is a BlockMask (on q's device) or None;
    `max_seqlen` the longest packed sequence when `cu_seqlens` is given."""
    from ._flash_common import LOG2E, NO_LIMIT

    B, T, H, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    o = empty_output((B, T, H, Dv), q.dtype, q.device)
    lse = empty_output((B, H, T), torch.float32, q.device)
    varlen = cu_seqlens is not None
    tma_ok = _tma_ok(q, k, v, varlen)
    split = mask_split(sparse, False, B, H, 1) if sparse is not None else None
    sig = None
    if not varlen:  # dense or block-sparse (the mask by its geometry): a launch plan per signature
        sig = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, scale, causal,
               window, sinks, softcap, tma_ok, q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, tuner_env(),
               sparse_signature(sparse, (split,)))
        plan = _PLANS.get(sig)
        if plan is not None:
            sp, parts = _sparse_args(sparse, split, lse, Dv)
            _launch(plan, q, k, v, o, lse, lse, sp)
            if parts is not None:
                combine(split, parts[0], o, parts[1], lse)
            return o, lse
    left, right = window if window is not None else (NO_LIMIT, NO_LIMIT)
    if causal:
        right = 0
    n_bh = (cu_seqlens.numel() - 1 if varlen else B) * H
    rows = max_seqlen if varlen else T
    cap_in = scale / softcap if softcap else 1.0
    cap_out = softcap * LOG2E if softcap else 1.0
    sp, parts = _sparse_args(sparse, split, lse, Dv)
    cu = cu_seqlens if varlen else lse
    arith = causal or window is not None
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), T, S, H, H // Hkv,
            scale * LOG2E, cap_in, cap_out, left, right, sinks)
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), VARLEN=varlen,
                SPARSE=sparse is not None, ARITH=arith, WORDS=sparse.words if sparse is not None else 1,
                SOFTCAP=bool(softcap), REVERSE=causal and sparse is None, DOT_PREC=dot_precision(q.dtype))

    fixed = sparse.block if sparse is not None else None

    def plan_of(cfg: Config):
        cfg = cfg if tma_ok or not cfg[4] else Config(*cfg[:4], 0, *cfg[5:])  # a pinned TMA config, non-TMA inputs
        bm, bn = cfg[:2]
        if fixed is None:
            return _plan(cfg, (cdiv(rows, bm), n_bh), args, dict(meta, MASK_M=bm, MASK_N=bn, SPLIT=False))
        if fixed[0] % bm or fixed[1] % bn:
            raise ValueError(f"a block-sparse forward configuration must split the block mask's blocks evenly: "
                             f"mask block {fixed}, got BLOCK_M={bm}, BLOCK_N={bn}")
        sub = fixed[0] // bm
        extra = extra_rows(split, sparse.num_q_blocks * sub, sub)
        return _plan(cfg, (sparse.num_q_blocks * sub, n_bh + extra), args,
                     dict(meta, MASK_M=fixed[0], MASK_N=fixed[1], SPLIT=split is not None))

    key = ("fwd", D, Dv, q.dtype, arith, bool(softcap), sparse.tuning_class if sparse is not None else None, varlen,
           seqlen_bucket(rows), window_bucket(window, left, right, max_seqlen if varlen else S))
    configs = [c for c in fwd_configs(max(D, Dv), q.dtype, fixed) if tma_ok or not c[4]]
    plan = plan_of(pick_config(key, configs, lambda c: _launch(plan_of(c), q, k, v, o, lse, cu, sp)))
    if sig is not None:
        remember_plan(_PLANS, sig, plan)
    _launch(plan, q, k, v, o, lse, cu, sp)
    if parts is not None:
        combine(split, parts[0], o, parts[1], lse)
    return o, lse
