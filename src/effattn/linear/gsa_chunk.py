"""Triton forward of gated slot attention's pass 1 (gsa.py's module docstring has the math): the recurrence
hk_t = hk_{t-1} Diag(e^{g_t}) + k_t^T s_t, o'_t = scale * q_t hk_t, whose gate acts on the slot (value-side)
columns, which the engine's kernels do not gate. Two launches:

1. `_gsa_pass1_prep`, one program per (chunk, sequence, head), all chunks at once: the intra-chunk output
   sum_{j<=i} (q_i . k_j) s_j e^{Gc_i - Gc_j} `[C, M]` (pairwise decays, masked before exp, over slices of the
   slots), e^{Gc} `[C, M]`, the writes decayed to the chunk's end s e^{Gc_C - Gc} and e^{Gc_C} `[M]`.
2. `_gsa_pass1_scan`, one program per (slot block, sequence, head), chunks in order with hk `[K, BM]` in
   registers: o' = scale ((q hk) e^{Gc} + intra), hk <- hk e^{Gc_C} + k^T (s e^{Gc_C - Gc}).

Pass 1's chunk is its own (16 tokens: `[C, C, 16]` temporaries), whatever chunk pass 2 runs with. Forward only:
`gsa` uses it where no gradient is needed and differentiates the PyTorch chunk form otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import dot_precision
from .rwkv7_chunk import _rows, _state_block

CHUNK = 16
SLICE = 16  # slots per step of the pairwise products (sm_90a, K = M = 64: prep 126, scan 210 registers, no spills)


@triton.jit
def _gsa_pass1_prep(q, k, s, g, Ib, Eb, Sb, Lb, T, H, K, M, NT, C: tl.constexpr, BK: tl.constexpr,
                    BM: tl.constexpr, SL: tl.constexpr, DOT_PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    bb, h = bh // H, bh % H
    t0 = n * C
    base_k = bb * T * H * K + h * K
    base_m = bb * T * H * M + h * M
    rows = tl.arange(0, C)
    causal = rows[:, None] >= rows[None, :]
    qk = tl.dot(_rows(q + base_k, t0, T, 0, C, BK, K, H * K),
                tl.trans(_rows(k + base_k, t0, T, 0, C, BK, K, H * K)), input_precision=DOT_PREC)
    qk = tl.where(causal, qk, 0.0)
    chunk = bh * NT + n  # buffers: [B H, NT, C, BM], [B H, NT, BM]
    for ch in tl.static_range(0, BM, SL):
        gc = tl.cumsum(_rows(g + base_m, t0, T, ch, C, SL, M, H * M), 0)
        ss = _rows(s + base_m, t0, T, ch, C, SL, M, H * M)
        e = tl.where(causal[:, :, None], gc[:, None, :] - gc[None, :, :], float("-inf"))
        intra = tl.sum(qk[:, :, None] * ss[None, :, :] * tl.exp(e), 1)  # [C, SL]
        last = tl.sum(tl.where(rows[:, None] == C - 1, gc, 0.0), 0)
        om = ch + tl.arange(0, SL)
        p = (chunk * C + rows[:, None]) * BM + om[None, :]
        tl.store(Ib + p, intra)
        tl.store(Eb + p, tl.exp(gc))
        tl.store(Sb + p, ss * tl.exp(last[None, :] - gc))
        tl.store(Lb + chunk * BM + om, tl.exp(last))


@triton.jit
def _gsa_pass1_scan(q, k, o, h0, ht, Ib, Eb, Sb, Lb, T, H, K, M, NT, scale, C: tl.constexpr, BK: tl.constexpr,
                    BM: tl.constexpr, SM: tl.constexpr, USE_H0: tl.constexpr, DOT_PREC: tl.constexpr):
    im, bh = tl.program_id(0), tl.program_id(1)
    bb, h = bh // H, bh % H
    rows = tl.arange(0, C)
    om = im * SM + tl.arange(0, SM)
    hk, p_state, m_km = _state_block(h0, bh, K, M, im * SM, BK, SM, USE_H0)
    base_k = bb * T * H * K + h * K
    base_m = bb * T * H * M + h * M
    for n in range(NT):
        chunk = bh * NT + n
        p = (chunk * C + rows[:, None]) * BM + om[None, :]
        t = n * C + rows
        qn = _rows(q + base_k, n * C, T, 0, C, BK, K, H * K)
        kn = _rows(k + base_k, n * C, T, 0, C, BK, K, H * K)
        out = tl.dot(qn, hk, input_precision=DOT_PREC) * tl.load(Eb + p) + tl.load(Ib + p)
        tl.store(o + base_m + t[:, None] * (H * M) + om[None, :], scale * out,
                 mask=(t[:, None] < T) & (om[None, :] < M))
        hk = tl.dot(tl.trans(kn), tl.load(Sb + p), hk * tl.load(Lb + chunk * BM + om)[None, :],
                    input_precision=DOT_PREC)
    tl.store(ht + p_state, hk, mask=m_km)


def gsa_pass1_forward(q, k, s, g, scale: float, initial_state_k):
    """o' `[B, T, H, M]` float32 and the final hk `[B, H, K, M]` float32 (inputs checked by `gsa`)."""
    B, T, H, K = q.shape
    M = s.shape[-1]
    C = CHUNK
    NT = triton.cdiv(T, C)
    BK, BM = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(M))
    f32 = dict(dtype=torch.float32, device=q.device)
    Ib, Eb, Sb = (torch.empty(B * H, NT, C, BM, **f32) for _ in range(3))  # fully written by the prep
    Lb = torch.empty(B * H, NT, BM, **f32)
    q, k, s, g = (t.contiguous() for t in (q, k, s, g))
    prec = dot_precision(torch.float32)
    _gsa_pass1_prep[(NT, B * H)](q, k, s, g, Ib, Eb, Sb, Lb, T, H, K, M, NT, C=C, BK=BK, BM=BM, SL=min(SLICE, BM),
                                 DOT_PREC=prec, num_warps=4)
    o = empty_output((B, T, H, M), torch.float32, q.device)
    ht = empty_output((B, H, K, M), torch.float32, q.device)
    SM = min(BM, 32)
    h0 = None if initial_state_k is None else initial_state_k.to(torch.float32).contiguous()
    _gsa_pass1_scan[(triton.cdiv(M, SM), B * H)](q, k, o, h0, ht, Ib, Eb, Sb, Lb, T, H, K, M, NT, float(scale), C=C,
                                                  BK=BK, BM=BM, SM=SM, USE_H0=h0 is not None, DOT_PREC=prec,
                                                  num_warps=4, num_stages=2)
    return o, ht
