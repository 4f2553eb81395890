"""Fused Triton quantisers: one read of Q/K/V and one write of the codes, in place of the many passes of
the PyTorch definitions in quantize.py (which they reproduce bit for bit: same float32 operations).

    _amax_kernel:     max |x| per (batch, head) or per (batch, head, channel) over all tokens, by float32 atomic
                      max into a zeroed buffer: the whole-head and per-channel scales' one reduction pass, in one
                      launch where PyTorch took seven (abs, amax, cast, compare, divide, ones, where), which
                      bounded short sequences by host time.
    _qk_quant_kernel: per group of GROUP tokens of one (batch, head), optional mean subtraction (K smoothing),
                      amax -> scale -> INT8 (round half away from zero) or FP8 e4m3 codes, per-token scales;
                      GROUP = 0: one scale per head, from `_amax_kernel`'s head maximum.
    _v_fp8_kernel:    V / its per-channel (or per-head) scale, from `_amax_kernel`'s maxima -> e4m3 codes stored
                      token-contiguous, zero-padded to V_PAD; the scales stored beside them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from .._triton_mode import interpreting
from ._flash_common import KernelLaunch, block_d, cdiv, remember_plan
from .quant_fwd import _to_e4m3
from .quantize import FP8, FP8_MAX, INT8_MAX, V_PAD


V_QMAX: tl.constexpr = tl.constexpr(FP8_MAX)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _scale_of(amax, qmax):
    """The quantisers' scale rule (quantize.py): max|x| / qmax in IEEE float32, 1 where the maximum is 0."""
    return tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)


@triton.jit
def _token_block(X, sx_b, sx_t, sx_h, N, H, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tokens [program_id(0) * BLOCK_R, + BLOCK_R) of head program_id(1) (of B * H) of x `[B, N, H, D]`, in
    float32 with zeros outside: (x, rows, cols, in-bounds mask)."""
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(X + (pid_bh // H) * sx_b + (pid_bh % H) * sx_h + rows[:, None] * sx_t + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    return x, rows, cols, ok


@triton.jit
def _amax_kernel(X, A, sx_b, sx_t, sx_h, N, H, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                 PER_CHANNEL: tl.constexpr):
    """A (float32, zeroed) `[B * H * D]` (PER_CHANNEL) or `[B * H]` <- max |x| over this block's tokens."""
    pid_bh = tl.program_id(1)
    x, _, cols, _ = _token_block(X, sx_b, sx_t, sx_h, N, H, D, BLOCK_D, BLOCK_R)
    x = tl.abs(x)  # exact in float32: the maximum is one of the inputs
    if PER_CHANNEL:
        tl.atomic_max(A + pid_bh * D + cols, tl.max(x, 0), mask=cols < D)
    else:
        tl.atomic_max(A + pid_bh, tl.max(tl.max(x, 1), 0))


@triton.jit
def _qk_quant_kernel(X, MEAN, HS, C, SC, sx_b, sx_t, sx_h, sc_b, sc_t, sc_h, ss_b, ss_h, sm_b, sm_h, N, H, qmax,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
                     SMOOTH: tl.constexpr, TO_FP8: tl.constexpr, GRID_ROUND: tl.constexpr):
    """GROUP = 0: HS `[B * H]` holds each head's max |x|."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    x, rows, cols, ok = _token_block(X, sx_b, sx_t, sx_h, N, H, D, BLOCK_D, BLOCK_R)
    if SMOOTH:
        mean = tl.load(MEAN + b * sm_b + h * sm_h + cols, mask=cols < D, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)
    if GROUP == 0:
        scale = tl.full([BLOCK_R], 1.0, tl.float32) * _scale_of(tl.load(HS + pid_bh), qmax)
    else:
        row_max = tl.max(tl.abs(x), 1)
        amax = tl.max(tl.reshape(row_max, (BLOCK_R // GROUP, GROUP)), 1)
        amax = tl.reshape(tl.broadcast_to(amax[:, None], (BLOCK_R // GROUP, GROUP)), (BLOCK_R,))
        scale = _scale_of(amax, qmax)
    y = tl.math.div_rn(x, scale[:, None])  # IEEE division, as torch's
    if TO_FP8:
        codes = _to_e4m3(y, GRID_ROUND)
    else:
        codes = (tl.where(y < 0, -1.0, 1.0) * tl.floor(tl.abs(y) + 0.5)).to(tl.int8)
    tl.store(C + b * sc_b + h * sc_h + rows[:, None] * sc_t + cols[None, :], codes, mask=ok)
    tl.store(SC + b * ss_b + h * ss_h + rows, scale, mask=rows < N)


@triton.jit
def _v_fp8_kernel(V, A, C, SC, sv_b, sv_t, sv_h, sc_b, sc_h, sc_d, S, H, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PER_HEAD: tl.constexpr, GRID_ROUND: tl.constexpr):
    """A: `_amax_kernel`'s maxima, per channel `[B * H * D]` or per head `[B * H]`; SC `[B, H, D]` (dense) <- the
    scales, written by each head's first program."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    v, rows, cols, _ = _token_block(V, sv_b, sv_t, sv_h, S, H, D, BLOCK_D, BLOCK_N)
    if PER_HEAD:
        scale = tl.full([BLOCK_D], 1.0, tl.float32) * _scale_of(tl.load(A + pid_bh), V_QMAX)
    else:
        scale = _scale_of(tl.load(A + pid_bh * D + cols, mask=cols < D, other=0.0), V_QMAX)
    if tl.program_id(0) == 0:
        tl.store(SC + pid_bh * D + cols, scale, mask=cols < D)
    codes = _to_e4m3(tl.math.div_rn(v, scale[None, :]), GRID_ROUND)
    # every row: the codes are padded to whole V_PAD blocks, with zeros past S (the attention loads them unmasked)
    tl.store(C + b * sc_b + h * sc_h + cols[None, :] * sc_d + rows[:, None], codes, mask=cols[None, :] < D)


# ---------------------------------------------------------------------------------------------- launchers
_AMAX_PLANS: dict = {}  # launches replayed per input signature (flash_fwd._PLANS explains why)
_QK_PLANS: dict = {}
_V_PLANS: dict = {}


def _plan(cache: dict, sig: tuple, make):
    """The cached launch plan of `sig`, made (and remembered) on first use."""
    plan = cache.get(sig)
    return remember_plan(cache, sig, make()) if plan is None else plan


def _amax(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max |x| over the tokens of x `[B, N, H, D]` (unit channel stride), float32: `[B * H * D]` per channel,
    else `[B * H]` (over the channels too)."""
    B, N, H, D = x.shape
    amax = torch.zeros(B * H * (D if per_channel else 1), dtype=torch.float32, device=x.device)
    rows = 16 if interpreting() else 64
    plan = _plan(_AMAX_PLANS, (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16, per_channel),
                 lambda: ((x.stride(0), x.stride(1), x.stride(2), N, H), KernelLaunch(
                     _amax_kernel, (cdiv(N, rows), B * H),
                     dict(D=D, BLOCK_D=block_d(D), BLOCK_R=rows, PER_CHANNEL=per_channel, num_warps=4))))
    plan[1](x, amax, *plan[0])
    return amax


def quantize_qk(x: torch.Tensor, group: int | None, *, fp8: bool, smooth: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `quantize_int8` / `quantize_fp8` (of `smooth_k(x)` with smooth) for a token group `group`
    (a power of 2 up to 128; None: the whole head, its maximum from `_amax_kernel` first).
    x `[B, N, H, D]` -> (codes `[B, N, H, D]`, scale float32 `[B, H, N]`)."""
    B, N, H, D = x.shape
    if group is None and smooth:
        raise ValueError("quantize_qk: K smoothing is fused for token groups only, got group=None")
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty(B, N, H, D, dtype=FP8 if fp8 else torch.int8, device=x.device)
    scale = torch.empty(B, H, N, dtype=torch.float32, device=x.device)
    mean = x.mean(dim=1, dtype=torch.float32) if smooth else scale  # [B, H, D]
    head_max = _amax(x, per_channel=False) if group is None else scale

    def make():  # outputs and mean are fresh dense tensors: their strides follow from the shapes
        rows = max(group or 1, 16 if interpreting() else 64)
        return ((x.stride(0), x.stride(1), x.stride(2), codes.stride(0), codes.stride(1), codes.stride(2),
                 scale.stride(0), scale.stride(1), mean.stride(0), mean.stride(1), N, H,
                 FP8_MAX if fp8 else INT8_MAX),
                KernelLaunch(_qk_quant_kernel, (cdiv(N, rows), B * H), dict(
                    D=D, BLOCK_D=block_d(D), BLOCK_R=rows, GROUP=group or 0, SMOOTH=smooth, TO_FP8=fp8,
                    GRID_ROUND=interpreting(), num_warps=4)))

    plan = _plan(_QK_PLANS, (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16, group, fp8, smooth), make)
    plan[1](x, mean, head_max, codes, scale, *plan[0])
    return codes, scale


def quantize_v(v: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `quantize_v_fp8`: same outputs; the maxima from one pass over V (`_amax_kernel`), the scales and
    codes from a second."""
    B, S, H, D = v.shape
    v = v if v.stride(-1) == 1 else v.contiguous()
    amax = _amax(v, per_channel=not per_head)
    scale = torch.empty(B, H, D, dtype=torch.float32, device=v.device)
    codes = empty_output((B, H, D, cdiv(S, V_PAD) * V_PAD), FP8, v.device)
    block = 64
    plan = _plan(_V_PLANS, (v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16, per_head),
                 lambda: ((v.stride(0), v.stride(1), v.stride(2), codes.stride(0), codes.stride(1), codes.stride(2),
                           S, H), KernelLaunch(_v_fp8_kernel, (codes.shape[3] // block, B * H), dict(
                               D=D, BLOCK_D=block_d(D), BLOCK_N=block, PER_HEAD=per_head,
                               GRID_ROUND=interpreting(), num_warps=4))))
    plan[1](v, amax, codes, scale, *plan[0])
    return codes, scale
