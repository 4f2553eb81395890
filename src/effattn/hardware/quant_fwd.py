"""Quantized flash forward in Triton: INT8 or FP8 Q K^T, 16-bit or FP8 P V (SageAttention 1/2, FA-3 FP8).

The flash forward's schedule (one program per query block, masked / full / masked key stages) and its
online-softmax step (`_softmax_step`) are shared; what changes is the tile's arithmetic:
    s_ij  = (q_i . k_j)_int32|fp32 * sq_i * sk_j          (scales per token; log2(e) * scale folded in sq)
    PV16: acc = alpha acc + P_half V                       (P in V's dtype, fp32 accumulation)
    PV8:  acc = alpha acc + e4m3(448 P) @ V_e4m3            (448 rides in the exponent of P, and l sums 448 P;
          V's scale is per channel, constant along the keys, so o = sv * acc / l)
The FP8 P V product of each tile is accumulated on its own, then added to acc in float32 (one FFMA with the
rescale): Hopper's FP8 MMA accumulates in fewer than 32 bits (SageAttention2's two-level accumulation).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from .._triton_mode import interpreting
from ._flash_common import (LOG2E, NO_LIMIT, Config, KernelLaunch, _dot, _kv_stages, _lazy_softmax_step,
                            _load_tile, _softmax_step, _visible, block_d, cdiv, dot_precision, pick_config,
                            remember_plan, seqlen_bucket, tuner_env)
from .quantize import V_PAD

LOG2_P_SCALE: tl.constexpr = tl.constexpr(8.807354922057604)  # log2(448): P V in FP8 stores 448 P (e4m3 range)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _to_e4m3(x, GRID_ROUND: tl.constexpr):
    """x (float32, |x| <= 448) -> float8 e4m3. GRID_ROUND (interpreter): Triton 3.6's interpreter drops the
    carry when rounding crosses a power of two (31.6 -> 16), so round onto the e4m3 grid (3 mantissa bits,
    subnormal step 2^-9, ties to even like the hardware's cvt.rn) in float32 first; the cast of a grid
    value is then exact."""
    if GRID_ROUND:
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # exact exponent of |x|
        step = tl.exp2((tl.maximum(e, -6) - 3).to(tl.float32))
        t = tl.abs(x) / step
        r = tl.floor(t + 0.5)
        r = tl.where((r - t == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)  # ties to even
        x = tl.where(x < 0, -1.0, 1.0) * r * step
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_scores(q, Kb, KSb, sk_t, n0, seqlen_k, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAD_D: tl.constexpr, MASK: tl.constexpr, K_SCALAR: tl.constexpr):
    """Raw quantized scores Q K^T `[BLOCK_M, BLOCK_N]` (int32 or float32) of the key block [n0, n0 + BLOCK_N)
    and its K scale: one value (K_SCALAR) or one per key. The scale is loaded here, with the tile: loaded
    with the softmax, it came through shared memory after the wait for the tensor cores (a shared-memory read
    does not pass a wgmma wait), which held the exponentials back."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(Kb + offs_n[:, None] * sk_t + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_DIM, MASK, PAD_D)
    if K_SCALAR:
        sk = tl.load(KSb + n0)
    elif MASK:
        sk = tl.load(KSb + offs_n, mask=offs_n < seqlen_k, other=0.0)
    else:
        sk = tl.load(KSb + offs_n)
    return tl.dot(q, tl.trans(k)), sk


@triton.jit
def _quant_update(qk, sk, acc, l_i, m_i, sq, Vb, sv_t, sv_d, n0, pos, seqlen_k, LEFT, RIGHT, offs_dv,
                  HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PAD_DV: tl.constexpr, MASK: tl.constexpr,
                  PV_FP8: tl.constexpr, DOT_PREC: tl.constexpr, GRID_ROUND: tl.constexpr, K_SCALAR: tl.constexpr,
                  QK_INT: tl.constexpr, LAZY: tl.constexpr = False):
    """Online-softmax step of the key block [n0, n0 + BLOCK_N) from its raw scores qk. Returns (acc, l, m).
    LAZY (unmasked tiles, 16-bit P V): acc and l are rescaled only when the running max moves
    (`_lazy_softmax_step`).

    K_SCALAR (the tile lies inside one K scale group): the scores are qk * r_i with the row factor
    r_i = sq_i * sk, so the row max is max(qk) * r_i (r_i > 0) and p = exp2(qk * r_i - m_i) is one FMA per
    score; the INT32 dot products become float32 through the exponent trick (2^23 + 2^22 + x is exact for
    |x| < 2^22, which holds for D <= 256 int8 products), an integer add instead of a quarter-rate convert.
    On the FP8 P V path p carries the factor 448 (the e4m3 range) through the exponent, l as well."""
    # every key block starts on a multiple of BLOCK_N (_kv_stages); told so, the compiler loads V^T in 16-byte vectors
    offs_n = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)
    if K_SCALAR:
        if QK_INT:
            qk = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # exact: 12582912 = 2^23 + 2^22
        r = sq * sk
        if MASK:
            qk = tl.where(_visible(pos[:, None], offs_n[None, :], seqlen_k, LEFT, RIGHT, 0), qk, float("-inf"))
        x, c_row, c_tile = qk, r, r[:, None]
    else:
        s = qk.to(tl.float32) * sq[:, None] * sk[None, :]
        if MASK:
            s = tl.where(_visible(pos[:, None], offs_n[None, :], seqlen_k, LEFT, RIGHT, 0), s, float("-inf"))
        x, c_row, c_tile = s, 1.0, 1.0
    if LAZY and not MASK and not PV_FP8:  # (e4m3 P, scaled to 448, has no room for a kept max's 2^8)
        p, acc, l_i, m_new = _lazy_softmax_step(x, c_row, c_tile, acc, l_i, m_i)
    else:
        p, alpha, l_i, m_new = _softmax_step(x, c_row, c_tile, LOG2_P_SCALE if PV_FP8 else 0.0, m_i, l_i, MASK)
    if PV_FP8:
        # V^T `[Dv, S_pad]` loaded as stored (token rows contiguous) and transposed in shared memory, as K is:
        # FP8 wgmma wants V K-major. No mask on tokens: S_pad is a multiple of V_PAD (and BLOCK_N), zero past S
        # (p is 0 there). A mask varying along the rows, or a [BLOCK_N, Dv] load, left the tile to 1-byte
        # synchronous loads outside the software pipeline on sm_90a (benchmarks/quant_compile.py).
        vt = _load_tile(Vb + offs_dv[:, None] * sv_d + offs_n[None, :] * sv_t, offs_dv, HEAD_DIM_V, offs_n, seqlen_k,
                        PAD_DV, False)
        pv = tl.dot(_to_e4m3(p, GRID_ROUND), tl.trans(vt))
        acc = acc * alpha[:, None] + pv
    else:
        v = _load_tile(Vb + offs_n[:, None] * sv_t + offs_dv[None, :] * sv_d, offs_n, seqlen_k, offs_dv, HEAD_DIM_V,
                       MASK, PAD_DV)
        lazy: tl.constexpr = LAZY and not MASK  # acc rescaled already, where the max moved
        acc = _dot(p.to(v.dtype), v, acc if lazy else acc * alpha[:, None], DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _quant_tile(acc, l_i, m_i, q, sq, Kb, KSb, Vb, sk_t, sv_t, sv_d, n0, pos, seqlen_k, LEFT, RIGHT,
                offs_d, offs_dv, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                PAD_D: tl.constexpr, PAD_DV: tl.constexpr, MASK: tl.constexpr, PV_FP8: tl.constexpr,
                DOT_PREC: tl.constexpr, GRID_ROUND: tl.constexpr, K_SCALAR: tl.constexpr, QK_INT: tl.constexpr,
                LAZY: tl.constexpr = False):
    """One online-softmax step over the key block [n0, n0 + BLOCK_N) with quantized operands."""
    qk, sk = _quant_scores(q, Kb, KSb, sk_t, n0, seqlen_k, offs_d, HEAD_DIM, BLOCK_N, PAD_D, MASK, K_SCALAR)
    return _quant_update(qk, sk, acc, l_i, m_i, sq, Vb, sv_t, sv_d, n0, pos, seqlen_k, LEFT, RIGHT, offs_dv,
                         HEAD_DIM_V, BLOCK_N, PAD_DV, MASK, PV_FP8, DOT_PREC, GRID_ROUND, K_SCALAR, QK_INT, LAZY)


@triton.jit
def _quant_fwd_kernel(
        Q, K, V, QS, KS, VS, O, qk_scale,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sv_d, so_b, so_t, so_h,
        sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, T, S, H, GROUP, LEFT, RIGHT,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, REVERSE: tl.constexpr,
        DOT_PREC: tl.constexpr, GRID_ROUND: tl.constexpr, K_SCALAR: tl.constexpr, QK_INT: tl.constexpr,
        WS: tl.constexpr, AHEAD: tl.constexpr, LAZY: tl.constexpr):
    pid_m = tl.program_id(0)
    if REVERSE:  # causal: longest rows first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    off = S - T
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = offs_m + off
    q = _load_tile(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], offs_m, T, offs_d,
                   HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    sq = tl.load(QS + b * sqs_b + h * sqs_h + offs_m, mask=offs_m < T, other=1.0) * qk_scale  # > 0: no 0 * inf
    Kb = K + b * sk_b + hk * sk_h
    KSb = KS + b * sks_b + hk * sks_h
    Vb = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, a, c, hi = _kv_stages(m0, T, S, off, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    for n0 in range(lo, a, BLOCK_N):
        acc, l_i, m_i = _quant_tile(acc, l_i, m_i, q, sq, Kb, KSb, Vb, sk_t, sv_t, sv_d, n0, pos, S,
                                    LEFT, RIGHT, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D != HEAD_DIM,
                                    BLOCK_DV != HEAD_DIM_V, True, PV_FP8, DOT_PREC, GRID_ROUND, K_SCALAR, QK_INT)
    if AHEAD:  # each block's Q K^T issued before the previous block's softmax (see flash_fwd)
        if a < c:
            qk, sk = _quant_scores(q, Kb, KSb, sk_t, a, S, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D != HEAD_DIM, False,
                                   K_SCALAR)
            for n0 in range(a, c - BLOCK_N, BLOCK_N):
                qk_next, sk_next = _quant_scores(q, Kb, KSb, sk_t, n0 + BLOCK_N, S, offs_d, HEAD_DIM, BLOCK_N,
                                                 BLOCK_D != HEAD_DIM, False, K_SCALAR)
                acc, l_i, m_i = _quant_update(qk, sk, acc, l_i, m_i, sq, Vb, sv_t, sv_d, n0, pos, S, LEFT, RIGHT,
                                              offs_dv, HEAD_DIM_V, BLOCK_N, BLOCK_DV != HEAD_DIM_V, False, PV_FP8,
                                              DOT_PREC, GRID_ROUND, K_SCALAR, QK_INT, LAZY)
                qk = qk_next
                sk = sk_next
            acc, l_i, m_i = _quant_update(qk, sk, acc, l_i, m_i, sq, Vb, sv_t, sv_d, c - BLOCK_N, pos, S, LEFT, RIGHT,
                                          offs_dv, HEAD_DIM_V, BLOCK_N, BLOCK_DV != HEAD_DIM_V, False, PV_FP8, DOT_PREC,
                                          GRID_ROUND, K_SCALAR, QK_INT, LAZY)
    else:
        for n0 in tl.range(a, c, BLOCK_N, warp_specialize=WS):
            acc, l_i, m_i = _quant_tile(acc, l_i, m_i, q, sq, Kb, KSb, Vb, sk_t, sv_t, sv_d, n0, pos, S,
                                        LEFT, RIGHT, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                                        BLOCK_D != HEAD_DIM, BLOCK_DV != HEAD_DIM_V, False, PV_FP8, DOT_PREC,
                                        GRID_ROUND, K_SCALAR, QK_INT, LAZY)
    for n0 in tl.range(c, hi, BLOCK_N, num_stages=1 if AHEAD else None):  # unpipelined after look-ahead: flash_fwd
        acc, l_i, m_i = _quant_tile(acc, l_i, m_i, q, sq, Kb, KSb, Vb, sk_t, sv_t, sv_d, n0, pos, S,
                                    LEFT, RIGHT, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D != HEAD_DIM,
                                    BLOCK_DV != HEAD_DIM_V, True, PV_FP8, DOT_PREC, GRID_ROUND, K_SCALAR, QK_INT)
    empty = l_i == 0.0  # rows that see no key output 0, like the reference
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if PV_FP8:
        o *= tl.load(VS + b * svs_b + hk * svs_h + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0)[None, :]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & (offs_dv[None, :] < HEAD_DIM_V))


# ---------------------------------------------------------------------------------------------- launcher
def quant_configs(D: int, pv_fp8: bool, dtype: torch.dtype) -> list[Config]:
    """Candidate tiles (H100). On the FP8-PV path BLOCK_N divides V_PAD (V^T loads unmasked)."""
    if pv_fp8:
        if interpreting():
            return [Config(32, 64, 4, 1)]
        return [Config(128, 64, 4, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 3),
                Config(128, 64, 8, 3, ahead=1)] + ([Config(64, 64, 4, 3, ahead=1)] if D <= 128 else [])
    if interpreting():
        return [Config(32, 32, 4, 1)]
    if dtype == torch.float32:
        return [Config(64, 32, 4, 2), Config(64, 64, 4, 2)]
    # BLOCK_N = 64 keeps a tile inside one K scale block ("block" / "warp" granularity: scalar-scale path;
    # H100, 2026-11-23: 4 warps won every int8 cell). 128 x 128 takes the per-token path at 64-token K blocks
    # but issues 16% fewer instructions per key on sm_90a at D = 128 (benchmarks/quant_compile.py); untimed.
    # ptxas serializes the wgmma of every one of those (C7515: `mov`s write wgmma accumulator registers inside
    # a pipeline stage; benchmarks/quant_compile.py); the look-ahead loop (ahead=1) is not serialized and
    # overlaps its exponentials with Q K^T.
    # H100, 2026-12-05: the 8-warp look-ahead loop won at D = 128 (both P V paths; two stages lost by 12-36%).
    # At D = 64 the one-warpgroup 64-row look-ahead tile is the unserialized, unspilled 4-warp candidate. At
    # D = 128 it fits two programs per SM (239 registers, 88 KB shared on sm_90a; the 8-warp tile fits one):
    # the bf16 forward's winner on short programs (flash_tiles_2026-12-06_h100.md); untimed here.
    # The lazy rescale (flash_fwd._LAZY_CANDIDATES) on the two leading loops. With them, sage_int8 at D = 64 ran as
    # before on the H100 (2026-12-07 19:10: 320 / 395 TFLOP/s non-causal at 4k / 16k against 317 / 386 on 12-06).
    return [Config(128, 64, 4, 3), Config(128, 64, 4, 4), Config(128, 64, 8, 3), Config(128, 128, 8, 3),
            Config(128, 64, 8, 3, ahead=1), Config(128, 64, 4, 3, lazy=1), Config(128, 64, 8, 3, ahead=1, lazy=1)
            ] + ([Config(64, 64, 4, 3, ahead=1)] if D <= 128 else [])


# Launch plans keyed by shapes, strides, dtypes, alignment and options (see flash_fwd._PLANS).
_PLANS: dict = {}


def quant_fwd(q, k, v, q_scale, k_scale, v_scale, *, softmax_scale: float, causal: bool, out_dtype,
              k_group: int | None = 1) -> torch.Tensor:
    """Launch the quantized forward.

    q `[B, T, H, D]` and k `[B, S, Hkv, D]` int8 or float8_e4m3fn; q_scale `[B, H, T]` and k_scale
    `[B, Hkv, S]` float32 (the kernel folds softmax_scale * log2 e into q_scale). v: `[B, S, Hkv, Dv]` in
    16/32-bit with v_scale None, or float8 `[B, Hkv, Dv, S_pad]` (S_pad a multiple of V_PAD, zeros past S)
    with v_scale `[B, Hkv, Dv]` (per channel).
    k_group: tokens sharing one K scale (None: the whole head); tiles inside one group take the scalar-scale
    path (`_quant_tile`). Returns o `[B, T, H, Dv]` in out_dtype."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    pv_fp8 = v_scale is not None
    if pv_fp8 and v.shape[3] % V_PAD:
        raise ValueError(f"quant_fwd: FP8 V^T must be padded to a multiple of {V_PAD} tokens, got {v.shape[3]}")
    if pv_fp8:
        Dv = v.shape[2]
        sv = (v.stride(0), v.stride(3), v.stride(1), v.stride(2))  # (b, token, head, channel)
        vs = v_scale
        vs_strides = (vs.stride(0), vs.stride(1))
    else:
        Dv = v.shape[3]
        sv = (v.stride(0), v.stride(1), v.stride(2), 1)
        vs = k_scale  # unused
        vs_strides = (0, 0)
    o = empty_output((B, T, H, Dv), out_dtype, q.device)
    qk_scale = softmax_scale * LOG2E  # a launch argument, not part of the cached plan
    scalar_ok = os.environ.get("EFFATTN_QUANT_SCALAR", "1") != "0"  # 0: per-token scale path (benchmarks)
    sig = (tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16) for t in (q, k, v, q_scale, k_scale, vs)),
           q.device, causal, out_dtype, k_group, scalar_ok, tuner_env())
    plan = _PLANS.get(sig)
    if plan is None:
        static = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *sv, o.stride(0),
                  o.stride(1), o.stride(2), q_scale.stride(0), q_scale.stride(1), k_scale.stride(0),
                  k_scale.stride(1), *vs_strides, T, S, H, H // Hkv, NO_LIMIT, 0 if causal else NO_LIMIT)

        def plan_of(cfg: Config) -> tuple:
            bm, bn, _, _, _tma, ws, ahead, _, lazy = cfg  # the quantized loop loads through pointers only
            k_scalar = scalar_ok and (k_group is None or k_group % bn == 0)
            return static, KernelLaunch(_quant_fwd_kernel, (cdiv(T, bm), B * H), dict(
                HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv), BLOCK_M=bm, BLOCK_N=bn,
                PV_FP8=pv_fp8, REVERSE=causal, DOT_PREC=None if pv_fp8 else dot_precision(v.dtype),
                GRID_ROUND=interpreting(), K_SCALAR=k_scalar, QK_INT=q.dtype == torch.int8, WS=bool(ws),
                AHEAD=bool(ahead), LAZY=bool(lazy) and not pv_fp8, **cfg.options()))

        def run(p) -> None:
            p[1](q, k, v, q_scale, k_scale, vs, o, qk_scale, *p[0])

        key = ("quant", D, Dv, q.dtype, v.dtype, causal, k_group, scalar_ok, seqlen_bucket(T))
        cfg = pick_config(key, quant_configs(max(D, Dv), pv_fp8, v.dtype), lambda c: run(plan_of(c)))
        plan = remember_plan(_PLANS, sig, plan_of(cfg))
    plan[1](q, k, v, q_scale, k_scale, vs, o, qk_scale, *plan[0])
    return o

