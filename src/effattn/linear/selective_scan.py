"""Triton chunked selective scan (Mamba-1's S6), forward and backward.

Per batch b, channel d and state index n the recurrence is independent:

    h_t[d, n] = a_t[d, n] h_{t-1}[d, n] + u_t[d, n],   a_t = exp(delta_t[d] A[d, n]),  u_t = delta_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n]

with delta = softplus(dt + dt_bias). Two kernel families, picked by tuning (`_configs`, `_bwd_configs`):

- the walk (selective_walk.py): a program owns BD channels, one per thread with its N states, and one chunk of
  TC tokens, walked token by token; chunks are chained by a scan over chunks (forward: end states; backward:
  carries). One exp per state element and token in each walk, nothing across threads but the backward's sums
  over channels.
- the scan (this file): a program owns `[BD, N]` channels x states for the whole sequence and walks it in chunks
  of BT tokens. Inside a chunk the pairs (a_t, u_t) compose associatively ((a1, u1) then (a2, u2) =
  (a1 a2, a2 u1 + u2)), so `tl.associative_scan` gives every h_t of the chunk at once from the carried state.
  Its forward saves the state at each chunk start.

Backward: the adjoint g_t = dL/dh_t obeys the reverse recurrence g_t = a_{t+1} g_{t+1} + C_t[n] dy_t[d],
the same associative pair run with `reverse=True` (a_{t+1} loaded one row ahead). Given g_t and h_t
(recomputed from the saved states):
    dx_t = delta_t sum_n g_t B_t,      dB_t = sum_d g_t delta_t x_t,        dC_t = sum_d dy_t h_t
    ddelta_t = x_t sum_n g_t B_t + sum_n g_t a_t h_{t-1} A,   dA = sum_t g_t a_t h_{t-1} delta_t
where a_t h_{t-1} = h_t - u_t (no division by a small a_t). dB and dC sum over channels of other programs:
each program writes its block's partial sum and the launcher adds them (deterministic, no atomics).
Between chunks the backward carries a_{t0} g_{t0}, what the state before the chunk receives.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from .._triton_mode import interpreting
from ..hardware._flash_common import (KernelLaunch, cdiv, next_pow2, pick_config, remember_plan, seqlen_bucket,
                                      tuner_env)
from .selective_walk import _combine, _pass_states, _softplus, _walk_bwd, _walk_carry, _walk_fwd
from . import _interpret_scan

_interpret_scan.enable()

# `_pass_states`' tile: 128 (n, d) elements a program, the chunks 32 at a time (a [32, 128] float32 scan: 32 values
# per thread per operand at 4 warps); at D N = 32768 that is 256 programs per sequence.
PASS_BLOCK = 128
PASS_TILE = dict(BLOCK=PASS_BLOCK, GROUP=32, num_warps=4)


@triton.jit
def _load_delta(dt, dt_bias, b, t0, T, D, od, md, BT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """delta = softplus(dt + dt_bias) `[BT, BD]` (0 outside the sequence: an identity step), the raw value."""
    ot = t0 + tl.arange(0, BT)
    m2 = (ot < T)[:, None] & md[None, :]
    offs = (b * T + ot)[:, None] * D + od[None, :]
    raw = tl.load(dt + offs, mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dt_bias + od, mask=md, other=0.0)[None, :]
    return tl.where(m2, _softplus(raw), 0.0), raw, m2, offs


@triton.jit
def _load_bc(M, b, t0, T, N, on, mn, BT: tl.constexpr):
    ot = t0 + tl.arange(0, BT)
    m = (ot < T)[:, None] & mn[None, :]
    offs = (b * T + ot)[:, None] * N + on[None, :]
    return tl.load(M + offs, mask=m, other=0.0).to(tl.float32), m, offs


@triton.jit
def _chunk_fwd(x, dt, dt_bias, Bm, Cm, A_, h, y, b, t0, T, D, N, od, md, on, mn, BT: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """One chunk by the associative scan; returns the state after it."""
    delta, _, m2, offs = _load_delta(dt, dt_bias, b, t0, T, D, od, md, BT, HAS_BIAS)
    xt = tl.load(x + offs, mask=m2, other=0.0).to(tl.float32)
    Bt, _, _ = _load_bc(Bm, b, t0, T, N, on, mn, BT)
    Ct, _, _ = _load_bc(Cm, b, t0, T, N, on, mn, BT)
    a = tl.exp(delta[:, :, None] * A_[None, :, :])
    u = (delta * xt)[:, :, None] * Bt[:, None, :]
    ac, uc = tl.associative_scan((a, u), axis=0, combine_fn=_combine)
    hh = ac * h[None, :, :] + uc
    tl.store(y + offs, tl.sum(hh * Ct[:, None, :], axis=2).to(y.dtype.element_ty), mask=m2)
    last = (tl.arange(0, BT) == BT - 1)[:, None, None]
    return tl.sum(tl.where(last, hh, 0.0), axis=0)  # padded rows are identity steps: the last row is h_end


@triton.jit
def _program_tile(A, dt_bias, start, b, pid_d, D, N, BD: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                  USE_START: tl.constexpr):
    """This program's [BD, BN] block of channels x states: offsets, masks, A, the dt bias, and the state it
    starts the walk from (`start[b]`, or zeros): h0 in the forward, dht in the backward."""
    od = pid_d * BD + tl.arange(0, BD)
    on = tl.arange(0, BN)
    md, mn = od < D, on < N
    mdn = md[:, None] & mn[None, :]
    odn = od[:, None] * N + on[None, :]
    A_ = tl.load(A + odn, mask=mdn, other=0.0)
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(dt_bias + od, mask=md, other=0.0)
    state = tl.zeros([BD, BN], dtype=tl.float32)
    if USE_START:
        state += tl.load(start + b * D * N + odn, mask=mdn, other=0.0).to(tl.float32)
    return od, on, md, mn, mdn, odn, A_, bias, state


@triton.jit
def _scan_fwd(x, dt, dt_bias, A, Bm, Cm, h0, y, hs, ht, T, D, N, NC, BT: tl.constexpr, BD: tl.constexpr,
              BN: tl.constexpr, HAS_BIAS: tl.constexpr, USE_H0: tl.constexpr, SAVE: tl.constexpr,
              STORE_HT: tl.constexpr):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # B T D may pass 2^31
    od, on, md, mn, mdn, odn, A_, bias, h = _program_tile(A, dt_bias, h0, b, pid_d, D, N, BD, BN, HAS_BIAS, USE_H0)
    for c in range(0, NC):
        if SAVE:
            tl.store(hs + (b * NC + c) * D * N + odn, h, mask=mdn)
        h = _chunk_fwd(x, dt, dt_bias, Bm, Cm, A_, h, y, b, c * BT, T, D, N, od, md, on, mn, BT, HAS_BIAS)
    if STORE_HT:
        tl.store(ht + b * D * N + odn, h, mask=mdn)


@triton.jit
def _chunk_bwd(x, dt, dt_bias, Bm, Cm, A_, h_start, Gs, dy, dx, ddt, dB, dC, b, t0, T, D, N, od, md, on, mn,
               BT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One chunk's gradients by two associative scans; returns (the carry a_{t0} g_{t0}, its dA part)."""
    delta, raw, m2, offs = _load_delta(dt, dt_bias, b, t0, T, D, od, md, BT, HAS_BIAS)
    delta_next, _, _, _ = _load_delta(dt, dt_bias, b, t0 + 1, T, D, od, md, BT, HAS_BIAS)
    xt = tl.load(x + offs, mask=m2, other=0.0).to(tl.float32)
    dyt = tl.load(dy + offs, mask=m2, other=0.0).to(tl.float32)
    Bt, mbn, obn = _load_bc(Bm, b, t0, T, N, on, mn, BT)
    Ct, _, _ = _load_bc(Cm, b, t0, T, N, on, mn, BT)
    a = tl.exp(delta[:, :, None] * A_[None, :, :])
    u = (delta * xt)[:, :, None] * Bt[:, None, :]
    ac, uc = tl.associative_scan((a, u), axis=0, combine_fn=_combine)
    hh = ac * h_start[None, :, :] + uc
    # g_t = a_{t+1} g_{t+1} + C_t dy_t inside the chunk; the last row takes the carry a_{t0+BT} g_{t0+BT} as is
    rows = tl.arange(0, BT)[:, None, None]
    a_next = tl.where(rows == BT - 1, 1.0, tl.exp(delta_next[:, :, None] * A_[None, :, :]))
    gc, gu = tl.associative_scan((a_next, dyt[:, :, None] * Ct[:, None, :]), axis=0, combine_fn=_combine,
                                 reverse=True)
    g = gc * Gs[None, :, :] + gu
    gB = tl.sum(g * Bt[:, None, :], axis=2)
    w = g * (hh - u)  # g_t a_t h_{t-1}
    tl.store(dx + offs, (delta * gB).to(dx.dtype.element_ty), mask=m2)
    tl.store(ddt + offs, (xt * gB + tl.sum(w * A_[None, :, :], axis=2)) * tl.sigmoid(raw), mask=m2)
    tl.store(dB + obn, tl.sum(g * (delta * xt)[:, :, None], axis=1), mask=mbn)
    tl.store(dC + obn, tl.sum(dyt[:, :, None] * hh, axis=1), mask=mbn)
    return tl.sum(tl.where(rows == 0, a * g, 0.0), axis=0), tl.sum(w * delta[:, :, None], axis=0)


@triton.jit
def _scan_bwd(x, dt, dt_bias, A, Bm, Cm, hs, dy, dht, dx, ddt, dA, dB, dC, dh0, B, T, D, N, NC,
              BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DHT: tl.constexpr,
              STORE_DH0: tl.constexpr):
    pid_d, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # B T D may pass 2^31
    # Gs = a_{t+1} g_{t+1}: what the state after step t receives from the future (dht after the last token)
    od, on, md, mn, mdn, odn, A_, bias, Gs = _program_tile(A, dt_bias, dht, b, pid_d, D, N, BD, BN, HAS_BIAS,
                                                            USE_DHT)
    dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
    dB += pid_d.to(tl.int64) * B * T * N  # this block's slice of the dB / dC partial sums `[NDB, B, T, N]`
    dC += pid_d.to(tl.int64) * B * T * N
    for i in range(0, NC):
        t0 = (NC - 1 - i) * BT
        h = tl.load(hs + (b * NC + t0 // BT) * D * N + odn, mask=mdn, other=0.0)
        Gs, dA_part = _chunk_bwd(x, dt, dt_bias, Bm, Cm, A_, h, Gs, dy, dx, ddt, dB, dC, b, t0, T, D, N, od, md, on,
                                 mn, BT, HAS_BIAS)
        dA_acc += dA_part
    tl.store(dA + b * D * N + odn, dA_acc, mask=mdn)
    if STORE_DH0:
        tl.store(dh0 + b * D * N + odn, Gs, mask=mdn)  # dL/dh_{-1} = a_0 g_0


class FwdConfig(NamedTuple):
    """A forward candidate. kernel "walk": `_walk_fwd` over time chunks of TC tokens (TC >= T: one chunk, no
    pass 1), BD channels per program (one per thread), tokens unrolled by UNROLL; "scan": `_scan_fwd`'s
    in-chunk associative scan over the whole sequence, BD channels x N states per program. BT: the interval
    of the states saved for the backward (the scan's chunk)."""
    kernel: str
    BT: int
    BD: int
    warps: int
    TC: int = 0
    UNROLL: int = 4


def _time_chunks(B: int, T: int, D: int, BD: int, warps: int, multiple: int) -> list[int]:
    """Chunk lengths (multiples of `multiple`) for a walk kernel's candidates: the fewest chunks that give
    ~2048 warps (16 per SM) with B cdiv(D, BD) programs per chunk, 4x as many chunks, and one chunk. The walks
    are latency-bound per token (H200, 2026-12-05: 0.90 / 3.3 / 16 ms forward at chunks of 512 / 2048 / 16384
    tokens, B = 1, D = 2048), so more, shorter chunks can pay for their extra pass."""
    chunks = max(1, 2048 // (B * cdiv(D, BD) * warps))
    split = multiple * max(1, cdiv(T, multiple * chunks))
    shorter = multiple * max(1, cdiv(split, 4 * multiple))
    return list(dict.fromkeys(multiple * cdiv(min(tc, T), multiple) for tc in (shorter, split, T)))


def _configs(B: int, T: int, D: int, N: int) -> list[FwdConfig]:
    """Forward candidates; the first is the interpreter's (and, with tuning off, the GPU's).

    One program walks one chunk of one channel block sequentially, each token waiting on its loads, so the
    grid must be wide in time as well: at B = 1, D = 2048 there are only 16 blocks of 128 channels (on the
    H200 a single chunk took 16 ms, chunks of 512 tokens 0.90 ms). Chunks of TC tokens make cdiv(T, TC) times
    more programs, for a second walk (pass 1: each chunk's own end state); TC >= T drops pass 1 where B and D
    alone fill the GPU. The scan candidate is the kernel measured on the H100
    (benchmarks/results/mamba.md: (32, 8, 4), 4.1-4.8x the engine's scalar-gate forward)."""
    walk = [FwdConfig("walk", 32, BD, warps, TC) for BD, warps in ((128, 4), (64, 2))
            for TC in _time_chunks(B, T, D, BD, warps, 32)]
    return [*walk, FwdConfig("scan", 32, 8, 4)]


class BwdConfig(NamedTuple):
    """A backward candidate. kernel "walk": `_walk_bwd` over time chunks of TC tokens (a multiple of the
    forward's BT), BD channels per program, one per thread (one warp: the sums over channels stay in it), its
    states recomputed SUB (2 or 4) tokens at a time, with DEFER its SUB tokens' stores after all of their steps
    (no step's loads wait behind the previous step's stores); "scan": `_scan_bwd`'s in-chunk associative scans over
    the whole sequence, BD channels x N states per program."""
    kernel: str
    BD: int
    warps: int
    TC: int = 0
    SUB: int = 4
    DEFER: int = 0


def _bwd_configs(B: int, T: int, D: int, N: int, BT: int) -> list[BwdConfig]:
    """Backward candidates; the first is the interpreter's. The walk at 32 channels per warp recomputing 4 or 2
    states at a time (selective_walk.py: within 0.5% of each other on the H100 since the lane sums, 2026-12-07,
    benchmarks/results/mamba.md) or at 64 channels over 2 warps (`tl.sum`: 3.58 against 2.33 ms at T = 16k); SUB = 2
    also with its stores deferred (sm_90a 57.75 instructions per state element against 60.25, no spills; at SUB = 4
    deferring spills 372 bytes): on the H100, 2026-12-07 19:07, 6% faster than SUB = 2 eager at T = 16k, 1% behind
    SUB = 4. The scan variants are those measured on the H100 (mamba.md): fwd+bwd
    0.62-0.92x the engine's, 7-9 ms of backward at B T = 16k."""
    walk = [BwdConfig("walk", BD, warps, TC, sub, defer)
            for BD, warps, sub, defer in ((32, 1, 4, 0), (32, 1, 2, 0), (32, 1, 2, 1), (64, 2, 4, 0))
            for TC in _time_chunks(B, T, D, BD, warps, BT)]
    return [*walk, *dict.fromkeys((BwdConfig("scan", 8 if N > 32 else 16, 4), BwdConfig("scan", 8, 4)))]


def _padded_bc(Bm, Cm, TP: int, BN: int):
    """B and C as the walk kernels read them: float32 `[B, TP, BN]`, zero past T tokens and N states (with no
    padding to add, a cast, or the inputs themselves when float32)."""
    Bsz, T, N = Bm.shape
    if (TP, BN) == (T, N):
        return Bm.to(torch.float32), Cm.to(torch.float32)
    Bp, Cp = (torch.zeros((Bsz, TP, BN), dtype=torch.float32, device=Bm.device) for _ in range(2))
    Bp[:, :T, :N], Cp[:, :T, :N] = Bm, Cm
    return Bp, Cp


# Launch plans of the forward, per input signature and configuration: its kernels launched through the compiled
# kernels (KernelLaunch), not the JIT's per-call argument binding and cache lookup, as the flash kernels are. They
# matter where a call's GPU work is shorter than its host time; at B = 1, T = 4k it is not (0.207 ms with plans,
# 0.206 without, on the H100: benchmarks/results/mamba.md).
_FWD_PLANS: dict = {}


def _launch(plan: dict, role: str, fn, grid, *args, **meta) -> None:
    """fn[grid](*args, **meta), through the plan's KernelLaunch for `role` (made on first use). `meta` holds
    every constexpr argument (and the launch options), `args` every other argument, in order."""
    run = plan.get(role)
    if run is None:
        run = plan[role] = KernelLaunch(fn, grid, meta)
    run(*args)


def _forward(x, dt, dt_bias, A, Bm, Cm, h0, save: bool, want_ht: bool):
    Bsz, T, D = x.shape
    N = A.shape[1]
    BN = next_pow2(N)
    y = empty_output((Bsz, T, D), x.dtype, x.device)
    ht = empty_output((Bsz, D, N), torch.float32, x.device) if want_ht else None
    key = (D, N, x.dtype, Bsz, seqlen_bucket(T))
    # what the compiled kernels are specialised on besides shapes: dtypes, which optional inputs there are, and
    # the alignment of every input that a kernel may read in place
    sig = (x.shape, A.shape, x.device, save, want_ht, tuner_env(),
           *(None if t is None else (t.dtype, t.data_ptr() % 16) for t in (x, dt, dt_bias, A, Bm, Cm, h0)))
    holder = {}

    def launch(cfg: FwdConfig):
        plan = _FWD_PLANS.get((sig, cfg))
        if plan is None:
            plan = remember_plan(_FWD_PLANS, (sig, cfg), {})
        # the states saved for the backward: their number depends on the candidate's BT
        holder["hs"] = hs = (torch.empty((Bsz, cdiv(T, cfg.BT), D, N), dtype=torch.float32, device=x.device)
                             if save else None)
        if cfg.kernel == "scan":
            _launch(plan, "scan", _scan_fwd, (cdiv(D, cfg.BD), Bsz), x, dt, dt_bias, A, Bm, Cm, h0, y, hs, ht, T, D,
                    N, cdiv(T, cfg.BT), BT=cfg.BT, BD=cfg.BD, BN=BN, HAS_BIAS=dt_bias is not None,
                    USE_H0=h0 is not None, SAVE=save, STORE_HT=want_ht, num_warps=cfg.warps)
            return
        if cfg.TC % cfg.BT or cfg.BT % cfg.UNROLL:
            raise ValueError(f"mamba forward config {cfg}: TC must be a multiple of BT, and BT of UNROLL")
        NC, blocks = cdiv(T, cfg.TC), cdiv(D, cfg.BD)
        tiles = dict(BT=cfg.BT, BD=cfg.BD, BN=BN, UNROLL=cfg.UNROLL, HAS_BIAS=dt_bias is not None,
                     num_warps=cfg.warps)
        A_t = A.t().contiguous()  # the walk's states are [N, D] (selective_walk.py); these copies are O(D N)
        TP = cfg.BT * cdiv(T, cfg.BT)
        Bp, Cp = _padded_bc(Bm, Cm, TP, BN)
        start = None if h0 is None else h0.transpose(1, 2).contiguous()
        if NC > 1:  # pass 1: each chunk but the last from zero; then the states between chunks
            ends = torch.empty((Bsz, NC - 1, N, D), dtype=torch.float32, device=x.device)
            sums = torch.empty((Bsz, NC - 1, D), dtype=torch.float32, device=x.device)
            _launch(plan, "ends", _walk_fwd, (blocks, NC - 1, Bsz), x, dt, dt_bias, A_t, Bp, None, None, None, None,
                    ends, sums, None, T, D, N, cfg.TC, TP, USE_START=False, EMIT=False, SAVE=False, STORE_HT=False,
                    **tiles)
            h0_t, start = start, torch.empty((Bsz, NC, N, D), dtype=torch.float32, device=x.device)
            _launch(plan, "chain", _pass_states, (cdiv(D * N, PASS_BLOCK), Bsz), A_t, ends, sums, h0_t, start, D, N,
                    NC, **PASS_TILE, USE_H0=h0_t is not None)
        ht_t = torch.empty((Bsz, N, D), dtype=torch.float32, device=x.device) if want_ht else None
        _launch(plan, "emit", _walk_fwd, (blocks, NC, Bsz), x, dt, dt_bias, A_t, Bp, Cp, start, y, hs, None, None,
                ht_t, T, D, N, cfg.TC, TP, USE_START=start is not None, EMIT=True, SAVE=save, STORE_HT=want_ht,
                **tiles)
        if want_ht:
            ht.copy_(ht_t.transpose(1, 2))
    cfg = pick_config(("mamba_fwd", *key), _configs(Bsz, T, D, N), launch)
    launch(cfg)
    return y, ht, holder["hs"], cfg.BT


def _walk_backward(cfg: BwdConfig, x, dt, dt_bias, A, Bm, Cm, hs, BT, dy, dht, dx, ddt, want_dh0: bool) -> dict:
    """`_walk_bwd` over chunks of cfg.TC tokens, their carries from `_walk_carry` and `_pass_states`."""
    Bsz, T, D = x.shape
    N = A.shape[1]
    BN, TC = next_pow2(N), cfg.TC
    if cfg.SUB not in (2, 4) or TC % BT or BT % cfg.SUB:
        raise ValueError(f"mamba backward config {cfg}: SUB must be 2 or 4, TC a multiple of the forward's BT = {BT} "
                         f"and BT of SUB")
    NC, blocks = cdiv(T, TC), cdiv(D, cfg.BD)
    f32 = dict(dtype=torch.float32, device=x.device)
    A_t = A.t().contiguous()
    TP = BT * cdiv(T, BT)
    Bp, Cp = _padded_bc(Bm, Cm, TP, BN)
    carry = None if dht is None else dht.transpose(1, 2).contiguous()
    if NC > 1:  # each chunk but the first from a zero carry, then the carries between chunks, from the last
        ends, sums = torch.empty((Bsz, NC - 1, N, D), **f32), torch.empty((Bsz, NC - 1, D), **f32)
        _walk_carry[(blocks, NC - 1, Bsz)](dt, dt_bias, A_t, Cp, dy, ends, sums, T, D, N, TC, TP, BD=cfg.BD, BN=BN,
                                           UNROLL=4, HAS_BIAS=dt_bias is not None, num_warps=cfg.warps)
        dht_t, carry = carry, torch.empty((Bsz, NC, N, D), **f32)
        _pass_states[(cdiv(D * N, PASS_BLOCK), Bsz)](A_t, ends, sums, dht_t, carry, D, N, NC, **PASS_TILE,
                                                     USE_H0=dht_t is not None)
    dA = empty_output((Bsz, NC, N, D), torch.float32, x.device)
    dB, dC = (empty_output((blocks, Bsz, T, N), torch.float32, x.device) for _ in range(2))
    dh0 = empty_output((Bsz, N, D), torch.float32, x.device) if want_dh0 else None
    ckpt = torch.empty((Bsz, NC, BT // cfg.SUB, N, D), **f32)
    lanes = cfg.BD == 32 and cfg.warps == 1 and BN <= 32  # dB, dC summed by `_lane_sums` (selective_walk.py)
    _walk_bwd[(blocks, NC, Bsz)](x, dt, dt_bias, A_t, Bp, Cp, hs, dy, carry, dx, ddt, dA, dB, dC, dh0, ckpt, T, D, N,
                                 TC, TP, BT=BT, BD=cfg.BD, BN=BN, SUB=cfg.SUB, HAS_BIAS=dt_bias is not None,
                                 USE_CARRY=carry is not None, STORE_DH0=want_dh0, LANES=lanes, EMULATE=interpreting(),
                                 DEFER=bool(cfg.DEFER), num_warps=cfg.warps)
    return {"dA": dA.sum((0, 1)).t(), "dB": dB.sum(0), "dC": dC.sum(0),
            "dh0": None if dh0 is None else dh0.transpose(1, 2)}


def _backward(x, dt, dt_bias, A, Bm, Cm, hs, BT, dy, dht, want_dh0: bool):
    Bsz, T, D = x.shape
    N = A.shape[1]
    key = (D, N, x.dtype, Bsz, seqlen_bucket(T), BT)
    dx = empty_output((Bsz, T, D), x.dtype, x.device)
    ddt = empty_output((Bsz, T, D), torch.float32, x.device)
    out = {}

    def launch(cfg: BwdConfig):
        if cfg.kernel == "walk":
            out.update(_walk_backward(cfg, x, dt, dt_bias, A, Bm, Cm, hs, BT, dy, dht, dx, ddt, want_dh0))
            return
        NDB, BN = cdiv(D, cfg.BD), next_pow2(N)
        dA = empty_output((Bsz, D, N), torch.float32, x.device)
        dB, dC = (empty_output((NDB, Bsz, T, N), torch.float32, x.device) for _ in range(2))
        dh0 = empty_output((Bsz, D, N), torch.float32, x.device) if want_dh0 else None
        _scan_bwd[(NDB, Bsz)](x, dt, dt_bias, A, Bm, Cm, hs, dy, dht, dx, ddt, dA, dB, dC, dh0, Bsz, T, D, N,
                              cdiv(T, BT), BT=BT, BD=cfg.BD, BN=BN, HAS_BIAS=dt_bias is not None,
                              USE_DHT=dht is not None, STORE_DH0=want_dh0, num_warps=cfg.warps)
        out.update(dA=dA.sum(0), dB=dB.sum(0), dC=dC.sum(0), dh0=dh0)
    cfg = pick_config(("mamba_bwd", *key), _bwd_configs(Bsz, T, D, N, BT), launch)
    launch(cfg)
    return dx, ddt, out["dA"], out["dB"], out["dC"], out["dh0"]


class SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, dt_bias, h0, want_ht):
        save = any(ctx.needs_input_grad)
        y, ht, hs, BT = _forward(x, dt, dt_bias, A, Bm, Cm, h0, save, want_ht)
        ctx.save_for_backward(x, dt, A, Bm, Cm, dt_bias, hs)
        ctx.BT, ctx.has_h0 = BT, h0 is not None
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        x, dt, A, Bm, Cm, dt_bias, hs = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dh0 = _backward(x, dt, dt_bias, A, Bm, Cm, hs, ctx.BT, dy.contiguous(),
                                             None if dht is None else dht.contiguous(), ctx.has_h0)
        dbias = None if dt_bias is None else ddt.sum((0, 1))
        return dx, ddt.to(dt.dtype), dA, dB.to(Bm.dtype), dC.to(Cm.dtype), dbias, dh0, None


def selective_scan(x, dt, A, B, C, dt_bias=None, initial_state=None, output_final_state=True):
    """The S6 scan without D skip or gate (validated by the caller, `effattn.linear.mamba.mamba`).

    x, dt: `[B, T, D]`, A: `[D, N]` float32, B, C: `[B, T, N]`, dt_bias: `[D]` float32 or None,
    initial_state `[B, D, N]` float32. Returns y `[B, T, D]` (x's dtype) and the final state (float32) or None.
    """
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return SelectiveScan.apply(contig(x), contig(dt), contig(A), contig(B), contig(C), contig(dt_bias),
                               contig(initial_state), output_final_state)
