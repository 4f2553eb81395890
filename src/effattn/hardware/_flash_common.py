"""Building blocks shared by the flash forward and backward kernels, and their launch-time tuner.

Scores live in the log2 domain inside the kernels (s2 = log2(e) * s), so the softmax uses `exp2`, which
maps to one MUFU instruction; log2(e) is folded into the score scale (FlashAttention-2, Dao 2023, Alg. 1).
Visibility is arithmetic: query row i sits at key position pos = i + (S - T) (bottom-right alignment) and
sees keys j with pos - LEFT <= j <= pos + RIGHT; "no limit" is the sentinel `NO_LIMIT`, causal is
RIGHT = 0. Block-sparse masks add a per-tile bitmask for the partial tiles (see effattn.sparse.block_mask).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Sequence

import triton
import triton.language as tl

from .._triton_mode import interpreting

LOG2E = 1.4426950408889634
NO_LIMIT = 1 << 30  # window side without a limit; pos +- NO_LIMIT stays inside int32 for N < 2^30


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [rows, cols] tile, zero-filling rows >= n_rows / cols >= n_cols only where asked to."""
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    """a @ b (+ acc) in float32. DOT_PREC "ieee" for fp32 inputs (exact products, so fp32 passes the 2x
    rule), "upcast" under the interpreter for bf16, whose dot multiplies raw bf16 bit patterns."""
    if DOT_PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return c


def dot_precision(dtype) -> str | None:
    import torch

    if dtype == torch.float32:
        # Exact fp32 products: "ieee" in the interpreter; on the GPU three tf32 passes reach fp32 accuracy
        # on the tensor cores, where "ieee" unrolls into FMA code that takes minutes to compile.
        return "ieee" if interpreting() else "tf32x3"
    return "upcast" if dtype == torch.bfloat16 and interpreting() else None


@triton.jit
def _sequence(CU, b, T, S, VARLEN: tl.constexpr):
    """(row offset, query length, key length, batch index into the tensors) of sequence b: a packed
    sequence of cu_seqlens (self-attention, batch 1) or batch element b."""
    if VARLEN:
        q0 = tl.load(CU + b)
        seqlen_q = tl.load(CU + b + 1) - q0
        seqlen_k = seqlen_q
        bb = 0
    else:
        q0 = 0
        seqlen_q = T
        seqlen_k = S
        bb = b
    return q0, seqlen_q, seqlen_k, bb


@triton.jit
def _tanh(x):
    # libdevice.tanh does not run in the interpreter; 1 - 2 / (e^{2x} + 1) saturates correctly at +-inf.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _scores(qk, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """log2-domain scores of the raw dot products, and tanh(...) of the softcap (Gemma 2) for the backward."""
    if SOFTCAP:
        t = _tanh(qk * cap_in)  # cap_in = scale / softcap
        s = t * cap_out  # cap_out = softcap * log2(e)
    else:
        t = qk
        s = qk * qk_scale  # qk_scale = scale * log2(e)
    return s, t


@triton.jit
def _visible(pos, kidx, kv_len, LEFT, RIGHT, SINKS):
    """Window / causal visibility of key kidx for the query at key position pos (broadcast shapes): the
    first SINKS keys (attention sinks) are visible whatever the left edge of the window."""
    return (kidx < kv_len) & ((kidx >= pos - LEFT) | (kidx < SINKS)) & (kidx <= pos + RIGHT)


@triton.jit
def _softmax_step(x, c_row, c_tile, shift, m_i, l_i, MASK: tl.constexpr):
    """Online-softmax update for a tile of raw scores x (-inf where masked) whose log2 scores are x * c with
    c > 0 (c_row: c per row or a scalar, c_tile: the same broadcastable to x): (p, alpha, l, m) with
    p = 2^(x c - m_new + shift), alpha = 2^(m_old - m_new). Since c > 0 the row max is max(x) * c, so
    p costs one FMA and one exp2 per score (no separate scaling pass). shift (log2 of a constant) scales p
    and l alike, e.g. by 448 for e4m3 P."""
    m_new = tl.maximum(m_i, tl.max(x, 1) * c_row)
    if MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet: exp2 gives 0
    else:
        m_use = m_new
    p = tl.exp2(x * c_tile - (m_use - shift)[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


# Lazy online softmax: the running max moves only when a row's max grew by more than this (log2 units), so a
# kept max leaves p <= 2^8 = 256 (well inside bf16 / fp16 P and the float32 sums; not e4m3 P, scaled to 448)
LAZY_GROWTH: tl.constexpr = tl.constexpr(8.0)


@triton.jit
def _lazy_softmax_step(x, c_row, c_tile, acc, l_i, m_i):
    """The online softmax of an unmasked tile (scores x * c, c > 0 as in `_softmax_step`, no shift) with a lazy
    rescale (FlashAttention-4's conditional one): the running max m moves, and l and the output acc are rescaled by
    2^(m_old - m_new), only when some row's max grew by more than LAZY_GROWTH since m last moved (+inf while m is
    -inf), one decision for the whole program (a reduction over its rows). A kept max gives p = 2^(x c - m) <=
    2^LAZY_GROWTH; acc, l and the LSE stay consistent, as they share m. Returns (p, acc, l, m); the caller adds
    p V to acc."""
    m_tile = tl.max(x, 1) * c_row
    if tl.max(m_tile - m_i, 0) > LAZY_GROWTH:
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.exp2(x * c_tile - m_i[:, None])
    return p, acc, l_i + tl.sum(p, 1), m_i


@triton.jit
def _tile_bits(BITS, tile, r, c, BLOCK_Q: tl.constexpr, WORDS: tl.constexpr):
    """Bit (r, c) of partial tile `tile`: rows r and columns c local to the tile, one of them [n, 1] and
    the other [1, m]. Each row's WORDS words are loaded once (a load per row, not per element: an
    element-wise gather costs a load instruction per score) and expanded by shifts, word j serving the
    columns 32 j .. 32 j + 31."""
    row = BITS + (tile * BLOCK_Q + r) * WORDS
    shift = c % 32
    bits = ((tl.load(row) >> shift) & 1) != 0
    for j in tl.static_range(1, WORDS):
        bits = tl.where(c // 32 == j, ((tl.load(row + j) >> shift) & 1) != 0, bits)
    return bits


@triton.jit
def _kv_stages(m0, seqlen_q, seqlen_k, off, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block [m0, m0 + BLOCK_M) split into [lo, a) masked, [a, b) full, [b, hi) masked.

    Full blocks are inside the window for every row and inside the keys, so they need no mask at all."""
    pos_lo = m0 + off
    pos_hi = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1 + off
    lo = tl.maximum(pos_lo - LEFT, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(pos_hi + RIGHT + 1, seqlen_k), 0)
    full_lo = tl.cdiv(tl.maximum(pos_hi - LEFT, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(pos_lo + RIGHT + 1, seqlen_k), 0) // BLOCK_N * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, b, hi


@triton.jit
def _q_stages(n0, seqlen_q, seqlen_k, off, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range that sees key block [n0, n0 + BLOCK_N), split like `_kv_stages`; full query blocks
    see every key of the block and lie inside the queries (keys past the end never get stored)."""
    j_hi = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo = tl.maximum(n0 - off - RIGHT, 0) // BLOCK_M * BLOCK_M
    hi = tl.maximum(tl.minimum(j_hi - off + LEFT + 1, seqlen_q), 0)
    full_lo = tl.cdiv(tl.maximum(j_hi - off - RIGHT, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.maximum(tl.minimum(n0 - off + LEFT + 1, seqlen_q), 0) // BLOCK_M * BLOCK_M
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, b, hi


# ------------------------------------------------------------------------------------------------- tuner
class Config(tuple):
    """(block_m, block_n, num_warps, num_stages, tma, ws, ahead, regs, lazy) of one launch; tma=1 loads through
    TMA descriptors, ws=1 asks Triton to warp-specialise the unmasked key loop (forward kernels); ahead=1 issues
    the next matmul before the exponentials, so that the tensor cores work while they run: each unmasked key
    block's Q K^T before the previous block's softmax (forward kernels), dP^T before P^T (dK/dV); regs > 0
    caps the registers per thread (ptx .maxnreg), so that more programs share an SM; lazy=1 (the dense forward's
    unmasked loop) rescales the output only when a row's max grew past a threshold (`_lazy_softmax_step`)."""

    def __new__(cls, block_m: int, block_n: int, num_warps: int, num_stages: int, tma: int = 0, ws: int = 0,
                ahead: int = 0, regs: int = 0, lazy: int = 0):
        return super().__new__(cls, (block_m, block_n, num_warps, num_stages, tma, ws, ahead, regs, lazy))

    def options(self) -> dict:
        """The launch's compiler options: warps, stages and the register cap where one is set."""
        opts = dict(num_warps=self[2], num_stages=self[3])
        if self[7]:
            opts["maxnreg"] = self[7]
        return opts


_BEST: dict = {}
TIMINGS: dict = {}  # key -> {config: ms}, for the benchmark's report of what the tuner tried


def tuner_env() -> tuple:
    """The environment variables that steer `pick_config` (part of every launch-plan cache key)."""
    return os.environ.get("EFFATTN_FLASH_CONFIGS", ""), os.environ.get("EFFATTN_FLASH_TUNE", "1")


@functools.lru_cache(maxsize=16)
def _parse_forced(spec: str) -> dict:
    """kind -> the pinned configuration's fields, integers where they read as such ("walk,32,128,4,512")."""
    out = {}
    for item in filter(None, spec.split(";")):
        kind, _, cfg = item.partition("=")
        out[kind.strip()] = tuple(int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in cfg.split(","))
    return out


def _forced() -> dict:
    """EFFATTN_FLASH_CONFIGS="fwd=128,64,4,3;mamba_fwd=walk,32,128,4,512;..." pins the configuration of a
    kernel kind, built as the kind's candidates are (benchmarks use it to compile candidates in parallel
    processes); EFFATTN_FLASH_TUNE=0 takes the first candidate."""
    return _parse_forced(os.environ.get("EFFATTN_FLASH_CONFIGS", ""))


def pick_config(key, configs: Sequence[Config], launch: Callable[[Config], None]) -> Config:
    """The fastest of `configs` for `key` (key[0] is the kernel kind), timed once per key with do_bench and
    cached; the interpreter (and a single candidate) takes the first. With EFFATTN_FLASH_TUNE=0, the first
    that compiles and fits in the GPU's resources (one compile instead of one per candidate); with
    EFFATTN_FLASH_TUNE=compile, the same after launching every candidate once, untimed (so that all of them
    are compiled into Triton's disk cache: `effattn bench`'s compile-ahead workers). Launches must be
    idempotent."""
    forced = _forced().get(key[0])
    if forced is not None:  # the candidates' own type (a NamedTuple such as Config, or a plain tuple)
        return forced if type(configs[0]) is tuple else type(configs[0])(*forced)
    if interpreting() or len(configs) == 1:
        return configs[0]
    mode = os.environ.get("EFFATTN_FLASH_TUNE", "1")
    tune = mode not in ("0", "compile")
    cache_key = key if tune else (mode, *key)  # apart: the variable may change within a process
    if cache_key not in _BEST:
        best, best_ms = None, math.inf
        for cfg in configs:
            try:
                ms = triton.testing.do_bench(lambda: launch(cfg), warmup=10, rep=30) if tune else launch(cfg)
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError):
                continue  # e.g. too much shared memory for this tile shape
            if not tune:
                best = best or cfg
                if mode == "0":
                    break
                continue
            TIMINGS.setdefault(key, {})[cfg] = ms
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"no kernel configuration could run for {key} (every candidate ran out of resources)")
        _BEST[cache_key] = best
    return _BEST[cache_key]


def remember_plan(cache: dict, sig, plan):
    """Store a launch plan under its input signature and return it. The caches are bounded: past 256 distinct
    signatures (many shapes, e.g. serving) a cache starts over rather than grow."""
    if len(cache) > 256:
        cache.clear()
    cache[sig] = plan
    return plan


class KernelLaunch:
    """`fn[grid](*args, **kwargs)` with grid, constexprs and options fixed, replayed on new arguments through
    the compiled kernel directly: the JIT's per-call argument binding, specialisation and cache lookup are
    most of a launch's host time, which bounds short sequences. Valid only while every argument the kernel
    specialises on (integer values, pointer alignment, dtypes) is unchanged: callers key their caches on
    all of them. The interpreter always goes through the JIT."""

    def __init__(self, fn, grid, kwargs):
        self.fn, self.grid, self.kwargs = fn, tuple(grid) + (1,) * (3 - len(grid)), kwargs
        self.runner = None

    def __call__(self, *args) -> None:
        if self.runner is not None:
            self.runner(*args, *self.consts)
            return
        kernel = self.fn[self.grid](*args, **self.kwargs)
        if not interpreting() and kernel is not None:
            self.consts = tuple(self.kwargs[name] for name in self.fn.arg_names[len(args):])
            self.runner = kernel[self.grid]


# Host-side arithmetic in plain Python: triton.cdiv / next_power_of_2 are jit-wrapped and cost microseconds
# per call, which adds up on the launch path of short sequences.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def seqlen_bucket(n: int) -> int:
    """Tuning key for a sequence length: short, medium and long sequences may prefer different tiles."""
    return min(next_pow2(max(n, 1)), 16384)


def window_bucket(window, left: int, right: int, cols: int) -> int | None:
    """Tuning key for a sliding window: the keys a row sees, bucketed like sequence lengths (a 1024-key window at
    N = 16k runs short programs and wants other tiles than causal attention at 16k); None without a window."""
    return None if window is None else seqlen_bucket(min(cols, left + right + 1))


def block_d(d: int) -> int:
    return max(16, next_pow2(d))
