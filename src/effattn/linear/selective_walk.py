"""Mamba's selective scan as a token-by-token walk over time chunks (Triton): the forward and the backward.

A program owns BD channels, one per thread with its N states in registers, and one chunk of TC tokens. For the
compiler to keep that layout of the `[BN, BD]` tiles, every state the kernels read or write is stored `[N, D]`
(channel-contiguous) and D is not specialised: were D known to be a multiple of 16, the tiles' loads would be
vectorised 4 channels per thread, which moves the warps onto the state axis and puts every C_t . h_t across
warps, through shared memory (benchmarks/results/mamba_compile_2026-12-05.md). Nothing crosses threads in the
forward, and B_t, C_t are broadcast loads from float32 copies padded to whole blocks (`Bp`, `Cp` `[B, TP, BN]`),
needing no mask or conversion. Chunks make the grid wide in time as well as in channels: at B = 1 the channels
alone leave the GPU's exp units idle.

Forward: pass 1 (`_walk_fwd`, EMIT=False) walks each chunk from zero to its end state and its sum of delta;
`_pass_states` chains the chunks (h <- exp(A sum delta) h + end); pass 2 (EMIT=True) walks each chunk again from
its true start, writing y, and the states every BT tokens that the backward starts from.

Backward (see selective_scan.py for the adjoint): the carry into each chunk's last token comes the same way,
reversed: `_walk_carry` walks each chunk back from zero (g_t = G + C_t dy_t, G <- a_t g_t) and `_pass_states`
chains them from dht. `_walk_bwd` then walks each chunk back from its carry. It needs h_t in reverse order: per
BT block it recomputes the states forward from the saved one, keeping the state before every SUB tokens in a
scratch (small enough to stay in cache), then per SUB tokens recomputes their SUB states in registers and walks
them back. SUB (2 or 4) trades registers for loop trips: the SUB + 1 states held at once set the register count
(sm_90a at 32 channels per warp, with the lane sums below: 255 with 60 bytes of spills at SUB = 4, 246 without at
SUB = 2; either way 8 warps per SM). On the H100 (2026-12-07, lane sums) SUB = 4 and 2 took 2.333 / 2.343 ms at
T = 16k (with `tl.sum`'s 80 shuffles a sum SUB = 2 had been 3-8% faster, the walk issuing in 34% of cycles); 16
channels per warp (167 registers, 12 warps) was slower: twice the instructions per state. DEFER stores a group's
SUB tokens' dx, ddt, dB, dC after all of its steps: a store between two steps keeps the next step's loads (which
may alias it, as far as the compiler knows) from being issued before it, so each step waited on its loads; at
SUB = 2 the compiler then also reuses the recompute's loads (sm_90a 57.75 instructions per state element against
60.25, no spills; at SUB = 4 it spills 372 bytes). On the H100 (2026-12-07 19:07) that made SUB = 2 6% faster at
T = 16k (1.951 ms against 2.082), 1% behind SUB = 4 (1.935): the tuner times both.
dB and dC sum over channels: each program reduces its BD channels and writes a partial sum per channel block (at
BD = 32, one warp, by `_lane_sums`' transposed butterfly: shuffles only, 31 a sum at N = 16 instead of 80, which
made the walk backward 14-15% faster on the H100); dA sums over time: a partial per chunk. The launcher adds them.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile(A_t, dt_bias, pid_d, D, N, BD: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This program's channels and states: offsets, masks, the `[N, D]` tile offsets, A log2(e), dt bias."""
    od = pid_d * BD + tl.arange(0, BD)
    on = tl.arange(0, BN)
    md, mn = od < D, on < N
    mnd = mn[:, None] & md[None, :]
    tile = on[:, None] * D + od[None, :]
    A2 = tl.load(A_t + tile, mask=mnd, other=0.0) * LOG2E  # exp(delta A) = exp2(delta A log2(e))
    bias = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(dt_bias + od, mask=md, other=0.0)
    return od, on, md, mnd, tile, A2, bias


@triton.jit
def _softplus(raw):
    """log(1 + e^raw) = max(raw, 0) + log1p(z), z = e^-|raw| in (0, 1], with log1p(z) = z P(z) by a degree-8
    polynomial fitted to log1p(z) / z on (0, 1] (relative error 2.7e-7 evaluated in float32). 13 instructions on
    sm_90a where libdevice's logf of 1 + e^raw took 30 (one token's softplus was a fifth of the forward's y pass,
    a tenth of the walk backward); that form also lost e^raw's digits below the ulp of 1 when raw < 0. Past raw =
    17 the log1p term is below half an ulp of raw, so the result is raw, as torch's threshold of 20 gives."""
    z = tl.exp2(-tl.abs(raw) * LOG2E)
    p = 0.00518595427 * z - 0.0292100515
    p = p * z + 0.0775399879
    p = p * z - 0.135839045
    p = p * z + 0.190559343
    p = p * z - 0.248256415
    p = p * z + 0.333160102
    p = p * z - 0.499992549
    p = p * z + 0.99999994
    return tl.maximum(raw, 0.0) + z * p


@triton.jit
def _delta(dt, bias, b, t, t_end, T, D, od, md):
    """delta_t = softplus(dt_t + bias) `[BD]` (0 at and past t_end: an identity step), raw dt_t + bias, the mask."""
    mt = md & (t < t_end)
    raw = tl.load(dt + (b * T + t) * D + od, mask=mt, other=0.0).to(tl.float32) + bias
    return tl.where(mt, _softplus(raw), 0.0), raw, mt


@triton.jit
def _token(x, dt, bias, Bp, b, t, t_end, T, TP, D, od, md, on, BN: tl.constexpr):
    """Token t: delta, x_t, raw dt_t `[BD]`, B_t `[BN]`, the channel mask."""
    delta, raw, mt = _delta(dt, bias, b, t, t_end, T, D, od, md)
    xt = tl.load(x + (b * T + t) * D + od, mask=mt, other=0.0).to(tl.float32)
    Bt = tl.load(Bp + (b * TP + t) * BN + on)
    return delta, xt, raw, Bt, mt


@triton.jit
def _stream(x, dt, bias, b, t, t_end, T, D, od, md):
    """Token t's raw dt_t + bias and x_t `[BD]` in float32 (x: x or dy `[B, T, D]`; 0 at and past t_end): the
    loads a walk issues ahead of their use."""
    mt = md & (t < t_end)
    row = (b * T + t) * D + od
    raw = tl.load(dt + row, mask=mt, other=0.0).to(tl.float32) + bias
    return raw, tl.load(x + row, mask=mt, other=0.0).to(tl.float32)


@triton.jit
def _row(P, b, t, t_end, TP, on, BN: tl.constexpr, BD: tl.constexpr):
    """Row t of a float32 `[B, TP, BN]` copy (B or C), broadcast over the channels `[BN, BD]` (the registers it
    takes are those of a `[BN]` row: each thread holds all BN values either way). The broadcast lets a row be
    carried through the walk's loop: a carried `[BN]` row would be loaded in another layout and converted through
    shared memory, with a barrier, at every use. Unmasked: past the copy's last row it reads that row, and a walk
    uses a row at or past t_end only times a zero delta or dy, or for a store it masks (a masked load would zero its
    16 registers first, one instruction in ten of the forward's token step on sm_90a)."""
    row = tl.load(P + (b * TP + tl.minimum(t, TP - 1)) * BN + on)
    return tl.broadcast_to(row[:, None], (BN, BD))


@triton.jit
def _advance(h, raw, xt, Bt, A2, mt):
    """h_t = exp(delta_t A) h_{t-1} + B_t delta_t x_t from token t's raw dt_t + bias, x_t `[BD]` and B_t
    (`[BN, BD]`, from `_row`); delta_t = 0 (an identity step) where mt is false. Returns h_t and delta_t."""
    delta = tl.where(mt, _softplus(raw), 0.0)
    return tl.exp2(delta[None, :] * A2) * h + Bt * (delta * xt)[None, :], delta


@triton.jit(do_not_specialize=["D"])  # see the module docstring
def _walk_fwd(x, dt, dt_bias, A_t, Bp, Cp, start, y, hs, ends, sums, ht, T, D, N, TC, TP, BT: tl.constexpr,
              BD: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr,
              USE_START: tl.constexpr, EMIT: tl.constexpr, SAVE: tl.constexpr, STORE_HT: tl.constexpr):
    """Program (channel block, time chunk c of TC tokens, batch b) walks its chunk token by token (the module
    docstring has the layout). Bp, Cp: B, C in float32 `[B, TP, BN]`, zero-padded to TP = a multiple of BT
    tokens and BN states. EMIT=False (pass 1): from a zero state, the chunk's end state and its sum of delta
    into ends `[B, NC, N, D]`, sums `[B, NC, D]`. EMIT=True (pass 2): from the true state before the chunk
    (start `[B, NC, N, D]`, NC = the grid's chunk count, or h0 when there is one chunk), y, ht after the last
    chunk, and every BT tokens the state for the backward (hs `[B, cdiv(T, BT), D, N]`; TC is a multiple of
    BT).

    Each token waits on nothing it loads: dt and x (streamed from memory) are loaded two tokens ahead of their
    use and B, C (shared by every channel block, so cached) one token ahead, in registers carried through the
    loop. Without that, the compiler issues each token's loads just before their use (after the previous
    token's y store, which it cannot move them past), and every token pays a memory latency."""
    pid_d, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # B T D may pass 2^31
    NC = tl.num_programs(1)
    od, on, md, mnd, tile, A2, bias = _tile(A_t, dt_bias, pid_d, D, N, BD, BN, HAS_BIAS)
    h = tl.zeros([BN, BD], dtype=tl.float32)
    if USE_START:
        h += tl.load(start + (b * NC + c) * D * N + tile, mask=mnd, other=0.0)
    delta_sum = tl.zeros([BD], dtype=tl.float32)
    t_begin = c * TC
    t_end = tl.minimum(T, t_begin + TC)
    raw1, x1 = _stream(x, dt, bias, b, t_begin, t_end, T, D, od, md)  # token t + 1's, then t + 2's
    raw2, x2 = _stream(x, dt, bias, b, t_begin + 1, t_end, T, D, od, md)
    B1 = _row(Bp, b, t_begin, t_end, TP, on, BN, BD)
    C1 = B1
    if EMIT:
        C1 = _row(Cp, b, t_begin, t_end, TP, on, BN, BD)
    for s in range(t_begin, t_end, BT):
        if SAVE:
            tl.store(hs + (b * tl.cdiv(T, BT) + s // BT) * D * N + od[None, :] * N + on[:, None], h, mask=mnd)
        for t0 in range(s, s + BT, UNROLL):
            for j in tl.static_range(UNROLL):  # unrolled, so that one token's exps overlap the next one's
                t = t0 + j
                raw, xt, Bt, Ct = raw1, x1, B1, C1
                raw1, x1 = raw2, x2
                raw2, x2 = _stream(x, dt, bias, b, t + 2, t_end, T, D, od, md)
                B1 = _row(Bp, b, t + 1, t_end, TP, on, BN, BD)
                if EMIT:
                    C1 = _row(Cp, b, t + 1, t_end, TP, on, BN, BD)
                mt = md & (t < t_end)
                h, delta = _advance(h, raw, xt, Bt, A2, mt)
                if EMIT:
                    tl.store(y + (b * T + t) * D + od, tl.sum(h * Ct, axis=0).to(y.dtype.element_ty),
                             mask=mt)
                else:
                    delta_sum += delta
    if EMIT:
        if STORE_HT:
            if c == NC - 1:
                tl.store(ht + b * D * N + tile, h, mask=mnd)
    else:
        tl.store(ends + (b * NC + c) * D * N + tile, h, mask=mnd)
        tl.store(sums + (b * NC + c) * D + od, delta_sum, mask=md)


@triton.jit
def _combine(a1, u1, a2, u2):
    # (a1, u1) then (a2, u2): h -> a2 (a1 h + u1) + u2
    return a1 * a2, a2 * u1 + u2


@triton.jit
def _pass_states(A_t, ends, sums, h0, start, D, N, NC, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                 USE_H0: tl.constexpr):
    """The state before each of NC chunks (start `[B, NC, N, D]`) from h0 and the chunks' own end states
    (ends `[B, NC - 1, N, D]`, from zero; sums of delta `[B, NC - 1, D]`): h <- exp(A * sum of delta) h + end.
    The backward chains its carries with it too, from dht, its chunks in reverse order.

    A program owns BLOCK (n, d) elements and takes the chunks GROUP at a time: it loads the group's decays and
    end states at once and composes them with an associative scan (`_combine`), so the chain costs one load
    latency per GROUP chunks. (A loop of one chunk a step waited on two dependent loads each step: 0.1 ms at 128
    chunks, 0.42 ms at 512 on the H100, 2026-12-07, with 32 programs at D N = 32768.)"""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)  # flat (n, d)
    m = idx < D * N
    A2 = tl.load(A_t + idx, mask=m, other=0.0) * LOG2E
    h = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_H0:
        h += tl.load(h0 + b * D * N + idx, mask=m, other=0.0)
    tl.store(start + b * NC * D * N + idx, h, mask=m)
    rows = tl.arange(0, GROUP)[:, None]
    for g0 in range(0, NC - 1, GROUP):
        c = g0 + rows  # chunk c's end state is the state before chunk c + 1
        live = (c < NC - 1) & m[None, :]
        total = tl.load(sums + (b * (NC - 1) + c) * D + (idx % D)[None, :], mask=live, other=0.0)
        end = tl.load(ends + (b * (NC - 1) + c) * D * N + idx[None, :], mask=live, other=0.0)
        decay, state = tl.associative_scan((tl.exp2(A2[None, :] * total), end), axis=0, combine_fn=_combine)
        after = decay * h[None, :] + state  # the state after chunk c; past NC - 1 the identity (1, 0) keeps it
        tl.store(start + (b * NC + c + 1) * D * N + idx[None, :], after, mask=live)
        h = tl.sum(tl.where(rows == GROUP - 1, after, 0.0), axis=0)


@triton.jit(do_not_specialize=["D"])  # see the module docstring
def _walk_carry(dt, dt_bias, A_t, Cp, dy, ends, sums, T, D, N, TC, TP, BD: tl.constexpr, BN: tl.constexpr,
                UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Chunk c = 1 + program_id(1) walked back from a zero carry: what it passes to the state before it,
    a_{t0} g_{t0}, and its sum of delta, into ends `[B, NC - 1, N, D]` and sums `[B, NC - 1, D]` at index
    NC - 1 - c (reversed, so that `_pass_states` chains them from the last chunk). Loads run ahead of their
    use as in `_walk_fwd`: dt and dy two tokens, C one token."""
    pid_d, c, b = tl.program_id(0), tl.program_id(1) + 1, tl.program_id(2).to(tl.int64)
    NC = tl.num_programs(1) + 1
    od, on, md, mnd, tile, A2, bias = _tile(A_t, dt_bias, pid_d, D, N, BD, BN, HAS_BIAS)
    G = tl.zeros([BN, BD], dtype=tl.float32)
    delta_sum = tl.zeros([BD], dtype=tl.float32)
    t_begin = c * TC
    t_end = tl.minimum(T, t_begin + TC)
    steps = tl.cdiv(t_end - t_begin, UNROLL) * UNROLL  # tokens walked, from t_begin + steps - 1 down
    t_last = t_begin + steps - 1
    raw1, dy1 = _stream(dy, dt, bias, b, t_last, t_end, T, D, od, md)  # token t - 1's, then t - 2's
    raw2, dy2 = _stream(dy, dt, bias, b, t_last - 1, t_end, T, D, od, md)
    C1 = _row(Cp, b, t_last, t_end, TP, on, BN, BD)
    for i in range(0, steps // UNROLL):
        for jj in tl.static_range(UNROLL):
            t = t_last - i * UNROLL - jj
            raw, dyt, Ct = raw1, dy1, C1
            raw1, dy1 = raw2, dy2
            raw2, dy2 = _stream(dy, dt, bias, b, t - 2, t_end, T, D, od, md)  # t - 2 >= t_begin - 2 >= 0 here
            C1 = _row(Cp, b, t - 1, t_end, TP, on, BN, BD)
            delta = tl.where(md & (t < t_end), _softplus(raw), 0.0)
            G = tl.exp2(delta[None, :] * A2) * (G + Ct * dyt[None, :])
            delta_sum += delta
    k = NC - 1 - c
    tl.store(ends + (b * (NC - 1) + k) * D * N + tile, G, mask=mnd)
    tl.store(sums + (b * (NC - 1) + k) * D + od, delta_sum, mask=md)


@triton.jit
def _shuffle_xor(x, lane, m: tl.constexpr, EMULATE: tl.constexpr):
    """Each thread's x `[K, 32]` (one column a lane) from lane `lane ^ m` of its warp: one SHFL per register. EMULATE
    (the CPU interpreter, which runs no PTX): the same exchange as a gather over the columns."""
    if EMULATE:
        y = tl.gather(x, tl.broadcast_to((lane ^ m)[None, :], x.shape), axis=1)
    else:
        y = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 31, -1;", "=f,f,r",
                                      [x, tl.full(x.shape, m, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    return y


@triton.jit
def _lane_sums(x, lane, BN: tl.constexpr, EMULATE: tl.constexpr):
    """Sums over the 32 lanes of a warp of x `[BN, 32]` (one channel a lane, BN <= 32 states in each thread's
    registers): lane l returns state l // (32 // BN)'s sum `[32]`. A transposed butterfly: at lane bit m = 16, 8,
    .., 1 each lane keeps the half of its rows that its bit m picks and adds the partner's copy of them, so the
    rows halve at each step (then whole-row butterflies once one is left): BN - 1 + 5 - log2(BN) shuffles against
    5 BN for BN separate sums (31 against 80 at BN = 16; sm_90a: 53.5 / 63 instead of 66.4 / 76.3 instructions per
    state element of the walk backward at SUB = 4 / 2, benchmarks/mamba_compile.py)."""
    for i in tl.static_range(5):  # lane bit 16 >> i
        if (BN >> i) > 1:
            lo, hi = tl.split(tl.permute(tl.reshape(x, (2, (BN >> i) // 2, 32)), (1, 2, 0)))
            up = ((lane & (16 >> i)) != 0)[None, :]
            x = tl.where(up, hi, lo) + _shuffle_xor(tl.where(up, lo, hi), lane, 16 >> i, EMULATE)
        else:
            x += _shuffle_xor(x, lane, 16 >> i, EMULATE)
    return tl.reshape(x, (32,))


@triton.jit
def _forward_step(x, dt, bias, Bp, A2, h, b, t, t_end, T, TP, D, od, md, on, BN: tl.constexpr):
    delta, xt, _, Bt, _ = _token(x, dt, bias, Bp, b, t, t_end, T, TP, D, od, md, on, BN)
    return tl.exp2(delta[None, :] * A2) * h + Bt[:, None] * (delta * xt)[None, :]


@triton.jit
def _backward_step(x, dt, bias, Bp, Cp, dy, A2, G, dA_acc, h_t, h_prev, b, t, t_end, T, TP, D, od, md, on,
                   BN: tl.constexpr, LANES: tl.constexpr, EMULATE: tl.constexpr):
    """Token t of the adjoint walk, given h_t and h_{t-1}: returns the carry a_t g_t for token t - 1, dA's running
    sum, and token t's dx_t, ddt_t `[BD]` and this block's dB_t, dC_t partial sums (`[32]`, lane l holding state
    l // (32 // BN)'s, with LANES; `[BN]` without), for `_store_step`."""
    delta, xt, raw, Bt, mt = _token(x, dt, bias, Bp, b, t, t_end, T, TP, D, od, md, on, BN)
    Ct = tl.load(Cp + (b * TP + t) * BN + on)
    dyt = tl.load(dy + (b * T + t) * D + od, mask=mt, other=0.0).to(tl.float32)
    a = tl.exp2(delta[None, :] * A2)
    g = G + Ct[:, None] * dyt[None, :]
    gB = tl.sum(g * Bt[:, None], axis=0)
    w = g * (a * h_prev)  # g_t a_t h_{t-1}
    dx_t = delta * gB
    # sum_n w A = (sum_n w A2) ln 2
    ddt_t = (xt * gB + tl.sum(w * A2, axis=0) * 0.6931471805599453) * tl.sigmoid(raw)
    if LANES:  # BD = 32 channels, one warp
        lane = tl.arange(0, 32)
        dB_t = _lane_sums(g * (delta * xt)[None, :], lane, BN, EMULATE)
        dC_t = _lane_sums(h_t * dyt[None, :], lane, BN, EMULATE)
    else:
        dB_t = tl.sum(g * (delta * xt)[None, :], axis=1)
        dC_t = tl.sum(h_t * dyt[None, :], axis=1)
    return a * g, dA_acc + w * delta[None, :], dx_t, ddt_t, dB_t, dC_t


@triton.jit
def _store_step(dx, ddt, dB, dC, dx_t, ddt_t, dB_t, dC_t, b, t, t_end, T, D, N, od, md, on, mn, BN: tl.constexpr,
                LANES: tl.constexpr):
    """Token t's outputs from `_backward_step` into dx, ddt `[B, T, D]` and this block's dB, dC partials."""
    row = b * T + t
    mt = md & (t < t_end)
    tl.store(dx + row * D + od, dx_t.to(dx.dtype.element_ty), mask=mt)
    tl.store(ddt + row * D + od, ddt_t, mask=mt)
    if LANES:  # lane l stores state l // (32 // BN)
        lane = tl.arange(0, 32)
        n = lane // (32 // BN)
        mine = (lane % (32 // BN) == 0) & (n < N) & (t < t_end)
        tl.store(dB + row * N + n, dB_t, mask=mine)
        tl.store(dC + row * N + n, dC_t, mask=mine)
    else:
        live = mn & (t < t_end)
        tl.store(dB + row * N + on, dB_t, mask=live)
        tl.store(dC + row * N + on, dC_t, mask=live)


@triton.jit(do_not_specialize=["D"])  # see the module docstring
def _walk_bwd(x, dt, dt_bias, A_t, Bp, Cp, hs, dy, carry, dx, ddt, dA, dB, dC, dh0, ckpt, T, D, N, TC, TP,
              BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, HAS_BIAS: tl.constexpr,
              USE_CARRY: tl.constexpr, STORE_DH0: tl.constexpr, LANES: tl.constexpr, EMULATE: tl.constexpr,
              DEFER: tl.constexpr):
    """Gradients of chunk c, walking back from the carry into its last token (carry `[B, NC, N, D]` in reversed
    chunk order, from `_pass_states`; dht itself when there is one chunk). Writes dx, ddt `[B, T, D]`, this
    channel block's dB, dC partials `[B, T, N]` (dB, dC point at its slice), dA's partial of this chunk
    `[B, NC, N, D]` and, from chunk 0, dh0 `[B, N, D]`. hs: the forward's states every BT tokens `[B, cdiv(T, BT),
    D, N]`; ckpt: scratch `[B, NC, BT / SUB, N, D]` for the states before every SUB (2 or 4) tokens of a block."""
    pid_d, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # B T D may pass 2^31
    NC = tl.num_programs(1)
    od, on, md, mnd, tile, A2, bias = _tile(A_t, dt_bias, pid_d, D, N, BD, BN, HAS_BIAS)
    mn = on < N
    G = tl.zeros([BN, BD], dtype=tl.float32)
    if USE_CARRY:
        G += tl.load(carry + (b * NC + NC - 1 - c) * D * N + tile, mask=mnd, other=0.0)
    dA_acc = tl.zeros([BN, BD], dtype=tl.float32)
    dB += pid_d.to(tl.int64) * tl.num_programs(2) * T * N  # this channel block's slice of the partial sums
    dC += pid_d.to(tl.int64) * tl.num_programs(2) * T * N
    ckpt += (b * NC + c) * (BT // SUB) * D * N  # this chunk's BT / SUB states `[N, D]`
    t_begin = c * TC
    t_end = tl.minimum(T, t_begin + TC)
    n_blocks = tl.cdiv(t_end - t_begin, BT)
    for i in range(0, n_blocks):
        s = t_begin + (n_blocks - 1 - i) * BT
        h = tl.load(hs + (b * tl.cdiv(T, BT) + s // BT) * D * N + od[None, :] * N + on[:, None], mask=mnd, other=0.0)
        raw1, x1 = _stream(x, dt, bias, b, s, t_end, T, D, od, md)  # loads ahead of their use, as in _walk_fwd
        raw2, x2 = _stream(x, dt, bias, b, s + 1, t_end, T, D, od, md)
        B1 = _row(Bp, b, s, t_end, TP, on, BN, BD)
        for k in range(0, BT // SUB):  # the states before every SUB tokens of the block
            tl.store(ckpt + k * D * N + tile, h, mask=mnd)
            for j in tl.static_range(SUB):
                t = s + k * SUB + j
                raw, xt, Bt = raw1, x1, B1
                raw1, x1 = raw2, x2
                raw2, x2 = _stream(x, dt, bias, b, t + 2, t_end, T, D, od, md)
                B1 = _row(Bp, b, t + 1, t_end, TP, on, BN, BD)
                h, _ = _advance(h, raw, xt, Bt, A2, md & (t < t_end))
        tl.debug_barrier()  # the scratch written, before any thread reads it back
        for kk in range(0, BT // SUB):  # SUB tokens at a time, from the block's last
            t0 = s + (BT // SUB - 1 - kk) * SUB
            h0 = tl.load(ckpt + (BT // SUB - 1 - kk) * D * N + tile, mask=mnd, other=0.0)
            h1 = _forward_step(x, dt, bias, Bp, A2, h0, b, t0, t_end, T, TP, D, od, md, on, BN)
            h2 = _forward_step(x, dt, bias, Bp, A2, h1, b, t0 + 1, t_end, T, TP, D, od, md, on, BN)
            if SUB == 4:
                h3 = _forward_step(x, dt, bias, Bp, A2, h2, b, t0 + 2, t_end, T, TP, D, od, md, on, BN)
                h4 = _forward_step(x, dt, bias, Bp, A2, h3, b, t0 + 3, t_end, T, TP, D, od, md, on, BN)
                G, dA_acc, dx3, ddt3, dB3, dC3 = _backward_step(x, dt, bias, Bp, Cp, dy, A2, G, dA_acc, h4, h3, b,
                                                                t0 + 3, t_end, T, TP, D, od, md, on, BN, LANES, EMULATE)
                if not DEFER:
                    _store_step(dx, ddt, dB, dC, dx3, ddt3, dB3, dC3, b, t0 + 3, t_end, T, D, N, od, md, on, mn, BN,
                                LANES)
                G, dA_acc, dx2, ddt2, dB2, dC2 = _backward_step(x, dt, bias, Bp, Cp, dy, A2, G, dA_acc, h3, h2, b,
                                                                t0 + 2, t_end, T, TP, D, od, md, on, BN, LANES, EMULATE)
                if not DEFER:
                    _store_step(dx, ddt, dB, dC, dx2, ddt2, dB2, dC2, b, t0 + 2, t_end, T, D, N, od, md, on, mn, BN,
                                LANES)
            G, dA_acc, dx1, ddt1, dB1, dC1 = _backward_step(x, dt, bias, Bp, Cp, dy, A2, G, dA_acc, h2, h1, b, t0 + 1,
                                                            t_end, T, TP, D, od, md, on, BN, LANES, EMULATE)
            if not DEFER:
                _store_step(dx, ddt, dB, dC, dx1, ddt1, dB1, dC1, b, t0 + 1, t_end, T, D, N, od, md, on, mn, BN, LANES)
            G, dA_acc, dx0, ddt0, dB0, dC0 = _backward_step(x, dt, bias, Bp, Cp, dy, A2, G, dA_acc, h1, h0, b, t0,
                                                            t_end, T, TP, D, od, md, on, BN, LANES, EMULATE)
            _store_step(dx, ddt, dB, dC, dx0, ddt0, dB0, dC0, b, t0, t_end, T, D, N, od, md, on, mn, BN, LANES)
            if DEFER:  # the group's stores after all of its steps, so that no step's loads wait behind a store
                _store_step(dx, ddt, dB, dC, dx1, ddt1, dB1, dC1, b, t0 + 1, t_end, T, D, N, od, md, on, mn, BN, LANES)
                if SUB == 4:
                    _store_step(dx, ddt, dB, dC, dx2, ddt2, dB2, dC2, b, t0 + 2, t_end, T, D, N, od, md, on, mn, BN,
                                LANES)
                    _store_step(dx, ddt, dB, dC, dx3, ddt3, dB3, dC3, b, t0 + 3, t_end, T, D, N, od, md, on, mn, BN,
                                LANES)
    tl.store(dA + (b * NC + c) * D * N + tile, dA_acc, mask=mnd)
    if STORE_DH0:
        if c == 0:
            tl.store(dh0 + b * D * N + tile, G, mask=mnd)  # dL/dh_{-1} = a_0 g_0
