"""Split-KV decoding (FlashDecoding, Dao et al. 2023; survey Table 2 "decoding" rows): Triton kernels.

A few query tokens (q `[B, Tq, H, D]`) against long KV caches. The cache is cut into splits along the
sequence; one program per (split, sequence, KV head, row block) runs online softmax over its split and
writes a partial output plus its log-sum-exp; a merge kernel combines the splits:

    o = sum_s exp(lse_s - lse) o_s,   lse = log sum_s exp(lse_s).

GQA: the `g = H / Hkv` query heads of one group and the Tq query tokens form the rows of one program's
tile (row r = t * g + j), so every KV element is read once per group, not once per query head.

One kernel family covers every cache: a KV *segment* is read either directly (contiguous `[B, S, Hkv, D]`)
or through a block table (paged `[num_blocks, page, Hkv, D]`), and its elements are either stored as is or
as packed 2/4/8-bit codes with a scale and a zero point (KIVI-style quantization), dequantised in the tile
loader. These are constexpr switches of the same inner loop. A cache may consist of several segments (a
quantized body and a full-precision residual window): their splits land in one buffer and one merge.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ._flash_common import cdiv
from .._triton_mode import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_SPLITS = 256  # per segment: the merge kernel holds all splits of a row in one tile


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _unpack(p, BITS: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    # Byte i holds elements i * (8 // BITS) + j at bits [j * BITS, (j + 1) * BITS): join + reshape
    # interleaves the extracted fields back into element order without a gather.
    if BITS == 8:
        x = p
    elif BITS == 4:
        x = tl.reshape(tl.join(p & 15, p >> 4), [N, D])
    else:
        c0 = p & 3
        c1 = (p >> 2) & 3
        c2 = (p >> 4) & 3
        c3 = (p >> 6) & 3
        x = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [N, D])
    return x


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton 3.6's interpreter miscomputes 16-bit dots: there the rounded operands are multiplied in fp32,
    # which is what the tensor cores do with fp32 accumulation.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_tile(X, row_off, n0, end, S, Z, s_base, s_row, OI, OV, o_base, s_on, BLOCK_N: tl.constexpr,
               D: tl.constexpr, BITS: tl.constexpr, GN: tl.constexpr, GD: tl.constexpr, NO: tl.constexpr,
               ROLL: tl.constexpr):
    """Tile `[BLOCK_N, D]` of keys or values for tokens n0 .. n0 + BLOCK_N (rows `row_off`, element
    offsets; tokens >= end read as 0). BITS > 0 dequantises codes with the scale/zero of (token group
    n // GN, channel group d // GD); GN and GD are powers of two and n0 a multiple of BLOCK_N. NO > 0
    overwrites each token's NO sparse outliers (channel index OI, value OV; dense-and-sparse). ROLL
    returns column (d + D/2) % D in column d: the partner that rotary embeddings pair with d."""
    n = n0 + tl.arange(0, BLOCK_N)
    mask_n = n < end
    d = tl.arange(0, D)
    src = (d + D // 2) % D if ROLL else d  # channel held in each tile column
    if BITS == 0:
        x = tl.load(X + row_off[:, None] + src[None, :], mask=mask_n[:, None], other=0.0)
    else:
        DP: tl.constexpr = D // (8 // BITS)
        dp = tl.arange(0, DP)
        dp = (dp + DP // 2) % DP if ROLL else dp  # D/2 is a whole number of bytes: fields keep their slot
        p = tl.load(X + row_off[:, None] + dp[None, :], mask=mask_n[:, None], other=0)
        # Dequantised in float32: measured on the H100 it is faster than bf16 arithmetic (which Triton
        # routes through float32 conversions) and keeps int8 codes exact.
        codes = _unpack(p, BITS, BLOCK_N, D).to(tl.float32)
        # Load each (token group, channel group) scale once and broadcast it over its group, rather
        # than gathering one scale per element (8x the code bytes through L1 at 4 bits).
        TN: tl.constexpr = BLOCK_N if BLOCK_N < GN else GN  # tokens sharing a scale inside the tile
        R: tl.constexpr = BLOCK_N // TN
        CD: tl.constexpr = D // GD
        tok = n0 + tl.arange(0, R) * TN
        c = tl.arange(0, CD)
        c = (c + CD // 2) % CD if ROLL else c
        s_off = s_base + (tok // GN).to(tl.int64)[:, None] * s_row + c[None, :]
        s_mask = (tok < end)[:, None]
        scale = tl.load(S + s_off, mask=s_mask, other=0.0).to(tl.float32)
        zero = tl.load(Z + s_off, mask=s_mask, other=0.0).to(tl.float32)
        x = tl.reshape(codes, [R, TN, CD, GD]) * scale[:, None, :, None] + zero[:, None, :, None]
        x = tl.reshape(x, [BLOCK_N, D])
    for j in tl.static_range(NO):
        o_off = o_base + n.to(tl.int64) * s_on + j
        idx = tl.load(OI + o_off, mask=mask_n, other=-1)
        val = tl.load(OV + o_off, mask=mask_n, other=0.0)
        x = tl.where(src[None, :] == idx[:, None], val[:, None].to(x.dtype), x)
    return x


@triton.jit
def _rope(x, partner, pos, D: tl.constexpr, log2_base):
    # Rotary embedding, "rotate half" pairs (i, i + D/2) at angle pos * base^(-2i/D) (effattn.nn.rotary):
    # x_i cos - x_{i+D/2} sin for i < D/2, x_i cos + x_{i-D/2} sin above.
    d = tl.arange(0, D)
    inv_freq = tl.exp2(-((2 * (d % (D // 2))).to(tl.float32) / D) * log2_base)
    angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    sign = tl.where(d < D // 2, -1.0, 1.0)
    return x.to(tl.float32) * tl.cos(angle) + sign[None, :] * partner.to(tl.float32) * tl.sin(angle)


@triton.jit
def _decode_split_kernel(
        Q, K, V, KS, KZ, VS, VZ, OI, OV, BT, LENS, OFFS, TOTALS, PO, PL, O, LSE,
        s_qb, s_qt, s_qh, s_ob, s_ot, s_oh, H, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh,
        s_ksb, s_ksr, s_ksh, s_vsb, s_vsr, s_vsh, s_oib, s_oin, s_oih, s_btb,
        Tq, Hkv, M, split_len, split_base, n_splits_total, qk_scale, rope_log2_base,
        G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
        K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GN: tl.constexpr, K_GD: tl.constexpr,
        V_GN: tl.constexpr, V_GD: tl.constexpr, K_NO: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        DIRECT: tl.constexpr, WRITE_LSE: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    t = rows // G  # query token of each row; j = rows % G its head inside the group
    head = kvh * G + rows % G
    d = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * s_qb + t[:, None] * s_qt + head[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    seg_len = tl.load(LENS + b)
    # Bottom-right causal alignment over the whole cache: query t sits at total - Tq + t, key n of this
    # segment at offset + n.
    q_pos = tl.load(TOTALS + b) - Tq + t
    k_pos0 = tl.load(OFFS + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seg_len)

    k_base = kvh.to(tl.int64) * s_kh
    v_base = kvh.to(tl.int64) * s_vh
    ks_base = b.to(tl.int64) * s_ksb + kvh * s_ksh
    vs_base = b.to(tl.int64) * s_vsb + kvh * s_vsh
    o_base = b.to(tl.int64) * s_oib + kvh * s_oih
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask_n = n < end
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * s_btb + n // PAGE, mask=mask_n, other=0).to(tl.int64)
            k_row = page * s_kb + (n % PAGE) * s_kn
            v_row = page * s_vb + (n % PAGE) * s_vn
        else:
            k_row = b.to(tl.int64) * s_kb + n.to(tl.int64) * s_kn
            v_row = b.to(tl.int64) * s_vb + n.to(tl.int64) * s_vn
        k = _load_tile(K + k_base, k_row, n0, end, KS, KZ, ks_base, s_ksr, OI, OV, o_base, s_oin,
                       BLOCK_N, D, K_BITS, K_GN, K_GD, K_NO, False)
        if ROPE:  # keys stored before RoPE (KVQuant): rotate at their positions after dequantising
            kp = _load_tile(K + k_base, k_row, n0, end, KS, KZ, ks_base, s_ksr, OI, OV, o_base, s_oin,
                            BLOCK_N, D, K_BITS, K_GN, K_GD, K_NO, True)
            k = _rope(k, kp, k_pos0 + n, D, rope_log2_base)
        qk = _dot(q, tl.trans(k.to(q.dtype)), PRECISION, UPCAST) * qk_scale  # log2 units
        keep = mask_n[None, :]
        if CAUSAL:
            keep = keep & ((k_pos0 + n)[None, :] <= q_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V + v_base, v_row, n0, end, VS, VZ, vs_base, s_vsr, OI, OV, o_base, s_oin,
                       BLOCK_N, DV, V_BITS, V_GN, V_GD, 0, False)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), PRECISION, UPCAST)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    dv = tl.arange(0, DV)
    if DIRECT:  # the only split: final output, no merge
        tl.store(O + b.to(tl.int64) * s_ob + t[:, None] * s_ot + head[:, None] * s_oh + dv[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(LSE + (b.to(tl.int64) * H + head) * Tq + t, lse * 0.6931471805599453, mask=row_ok)
    else:
        slot = (bh.to(tl.int64) * n_splits_total + split_base + split) * M + rows
        tl.store(PO + slot[:, None] * DV + dv[None, :], o, mask=row_ok[:, None])
        tl.store(PL + slot, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(PO, PL, O, LSE, s_ob, s_ot, s_oh, Tq, Hkv, H, M, n_splits,
                         G: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
                         WRITE_LSE: tl.constexpr):
    # One program per output row and channel block, all splits in one tile: a loop over splits would
    # serialise one memory round trip per split, which dominated short caches.
    pid = tl.program_id(0)
    bh = pid // M
    row = pid % M
    b = bh // Hkv
    t = row // G
    head = (bh % Hkv) * G + row % G
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    slot = (bh.to(tl.int64) * n_splits + s) * M + row
    lse_s = tl.load(PL + slot, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)  # 0 for empty splits
    l = tl.sum(w, 0)
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    o_s = tl.load(PO + slot[:, None] * DV + dv[None, :], mask=s_ok[:, None] & (dv < DV)[None, :], other=0.0)
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(l > 0, l, 1.0)
    tl.store(O + b.to(tl.int64) * s_ob + t * s_ot + head * s_oh + dv, o.to(O.dtype.element_ty), mask=dv < DV)
    if WRITE_LSE:
        lse = tl.where(l > 0, (m_safe + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + (b.to(tl.int64) * H + head) * Tq + t, lse, mask=tl.program_id(1) == 0)


# --------------------------------------------------------------------------------------------- launcher
@dataclass
class Quant:
    """Packed codes of one of K/V: x ~= code * scale + zero with (scale, zero) indexed by
    (token // group_tokens, channel // group_channels); scale/zero are `[B, rows, Hkv, cols]`."""

    bits: int
    scale: torch.Tensor
    zero: torch.Tensor
    group_tokens: int
    group_channels: int
    outlier_index: torch.Tensor | None = None  # [B, S, Hkv, n] int32 channel of each sparse outlier
    outlier_value: torch.Tensor | None = None  # [B, S, Hkv, n] its full-precision value


@dataclass
class KVSegment:
    """One stretch of a cache as the kernel reads it.

    k `[B, S, Hkv, D]` / v `[B, S, Hkv, Dv]` (contiguous), or `[num_blocks, page, Hkv, .]` with
    `block_table` `[B, max_pages]` int32 (paged). Quantized: k/v hold uint8 codes `[..., D * bits / 8]` and
    `k_quant`/`v_quant` their scales. `lengths` `[B]` int32 tokens of each sequence in this segment,
    `offsets` `[B]` int32 position of the segment's first token in the sequence (for the causal mask).
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    max_len: int
    block_table: torch.Tensor | None = None
    k_quant: Quant | None = None
    v_quant: Quant | None = None
    rope_base: float | None = None  # keys stored before RoPE: rotate them at offset + n in the kernel


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_config(q: torch.Tensor, segments, n_rows: int) -> dict:
    """Tile sizes, warps and the number of KV splits (enough programs to fill the GPU); few on the CPU."""
    B, Tq, H, D = q.shape
    Hkv = segments[0].k.shape[2]
    block_m = min(64, max(16, _pow2(n_rows)))
    programs = B * Hkv * cdiv(n_rows, block_m)
    if q.is_cuda:
        # From the H100 sweeps (benchmarks/results/decode.md). Contiguous caches are memory-bound: the
        # most splits that keep all programs in one wave (a partial second wave costs a tail). Paged
        # caches wait on a block-table load before each tile and want about two waves in flight when the
        # batch alone does not fill the GPU. Dequantising caches want about five waves.
        quant = any(s.k_quant is not None or s.v_quant is not None for s in segments)
        paged = any(s.block_table is not None for s in segments)
        sms = _num_sms(q.device)
        if quant:
            target, min_split, block_n, stages = 5 * sms // programs, 1024, 64, 3
        elif paged and programs >= sms:
            target, min_split, block_n, stages = 1, 256, 64, 2
        elif paged:
            target, min_split, block_n, stages = cdiv(2 * sms, programs), 256, 128, 2
        else:
            target, min_split, block_n, stages = sms // programs, 256, 128, 3
        if q.element_size() > 2:  # fp32 tiles of 128 rows overflow shared memory
            block_n, stages = 64, 2
    else:
        target, min_split, block_n, stages = 1, 16, 16, 1
    longest = max(s.max_len for s in segments)
    splits = max(1, min(target, cdiv(longest, min_split), MAX_SPLITS))
    return dict(block_m=block_m, block_n=block_n, num_splits=splits, num_warps=4 if q.is_cuda else 1,
                num_stages=stages)


def flash_decode(q: torch.Tensor, segments: list[KVSegment], totals: torch.Tensor, *, scale: float,
                 causal: bool = True, return_lse: bool = False, **config):
    """Launch the split kernel once per segment into one partial buffer, then the merge kernel (or, when
    the whole cache is one split, let that split write the output directly).

    q `[B, Tq, H, D]`; `totals` `[B]` int32 cache length of each sequence (sum over segments). Returns o
    `[B, Tq, H, Dv]` (and LSE `[B, H, Tq]` float32, natural log). `config` overrides `default_config`.
    """
    B, Tq, H, D = q.shape
    Hkv = segments[0].k.shape[2]
    G = H // Hkv
    Dv = segments[0].v.shape[3] * (8 // segments[0].v_quant.bits if segments[0].v_quant else 1)
    M = G * Tq
    cfg = {**default_config(q, segments, M), **{k: v for k, v in config.items() if v is not None}}
    BLOCK_M, BLOCK_N = cfg["block_m"], cfg["block_n"]
    splits = []
    for seg in segments:
        split_len = cdiv(max(1, cdiv(seg.max_len, cfg["num_splits"])), BLOCK_N) * BLOCK_N
        splits.append((split_len, max(1, cdiv(seg.max_len, split_len))))
    n_total = sum(n for _, n in splits)
    direct = n_total == 1
    o = empty_output((B, Tq, H, Dv), q.dtype, q.device)
    lse = empty_output((B, H, Tq), torch.float32, q.device) if return_lse else o
    rows = 1 if direct else B * Hkv * n_total * M  # partials unused when direct
    po = torch.empty((rows, Dv), dtype=torch.float32, device=q.device)
    pl = torch.empty((rows,), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    base = 0
    for seg, (split_len, n) in zip(segments, splits):
        kq, vq = seg.k_quant, seg.v_quant
        ks = kq.scale if kq else seg.k  # dummies when unquantized: never read
        vs = vq.scale if vq else seg.v
        bt = seg.block_table if seg.block_table is not None else seg.lengths
        n_out = kq.outlier_index.shape[-1] if kq is not None and kq.outlier_index is not None else 0
        oi, ov = (kq.outlier_index, kq.outlier_value) if n_out else (ks, ks)
        grid = (n, B * Hkv, cdiv(M, BLOCK_M))
        _decode_split_kernel[grid](
            q, seg.k, seg.v, ks, kq.zero if kq else ks, vs, vq.zero if vq else vs, oi, ov, bt,
            seg.lengths, seg.offsets, totals, po, pl, o, lse,
            q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), H,
            seg.k.stride(0), seg.k.stride(1), seg.k.stride(2), seg.v.stride(0), seg.v.stride(1), seg.v.stride(2),
            ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
            oi.stride(0), oi.stride(1), oi.stride(2), bt.stride(0), Tq, Hkv, M, split_len, base, n_total,
            scale * LOG2E, math.log2(seg.rope_base) if seg.rope_base else 0.0,
            G=G, D=D, DV=Dv, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal,
            PAGED=seg.block_table is not None, PAGE=seg.k.shape[1] if seg.block_table is not None else 1,
            K_BITS=kq.bits if kq else 0, V_BITS=vq.bits if vq else 0,
            K_GN=kq.group_tokens if kq else 1, K_GD=kq.group_channels if kq else 1,
            V_GN=vq.group_tokens if vq else 1, V_GD=vq.group_channels if vq else 1, K_NO=n_out,
            ROPE=seg.rope_base is not None,
            PRECISION=precision, UPCAST=interpreting() and q.dtype != torch.float32, DIRECT=direct,
            WRITE_LSE=return_lse, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        base += n
    if direct:
        return (o, lse) if return_lse else o
    block_s = _pow2(n_total)
    block_dv = max(16, min(Dv, 8192 // block_s))
    _decode_merge_kernel[(B * Hkv * M, cdiv(Dv, block_dv))](
        po, pl, o, lse, o.stride(0), o.stride(1), o.stride(2), Tq, Hkv, H, M, n_total,
        G=G, DV=Dv, BLOCK_S=block_s, BLOCK_DV=block_dv, WRITE_LSE=return_lse, num_warps=4 if q.is_cuda else 1)
    return (o, lse) if return_lse else o
