"""RWKV-5/6's chunk form as one autograd node (`rwkv_chunk`): the engine's kernels, then RWKV's read-before-write
epilogue as one Triton kernel each way.

RWKV (v5, v6) reads the state before the current token's write and adds the token through a bonus u:

    o_t = r_t S_{t-1} + scale (sum_d r_td u_d k_td) v_t

The engine runs with the queries shifted one step left, so `o_next[t - 1] = r_t S_{t-1}` for t >= 1, and
`first = r_0 S_{-1}` (zero without an initial state). This module turns (o_next, first, r, k, v, u) into o in one
pass over the rows, and its backward gives every input's gradient in one pass:

    c_t = scale sum_d r_td u_d k_td,   dc_t = sum_e do_te v_te
    d o_next[t - 1] = do_t (d o_next[T - 1] = 0),   d first = do_0,   dv_t = c_t do_t,
    dr_t = scale u k_t dc_t,   dk_t = scale u r_t dc_t,   du = scale sum_{b, t} r_t k_t dc_t.

In PyTorch the same epilogue took six float32 casts, two concatenations and the bonus's products (640 us of a
1.18 ms forward at B = 1, T = 16k, H = 16, K = V = 64 on the H100, benchmarks/results/catalog_fla_2026-12-06_h100.md),
and its autograd more in the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import cdiv, next_pow2
from .engine import _backward, _dense_chunks, _forward

ROWS = 32  # tokens per program


@triton.jit
def _tiles(r, k, v, u, T, H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One program's rows: token indices t `[BT]`, row offsets into `[B, T, H, K]` and `[B, T, H, V]` tensors
    `[BT, BK]` / `[BT, BV]` and their masks, r, k `[BT, BK]`, v `[BT, BV]` and u `[BK]` in float32."""
    it, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = it * BT + tl.arange(0, BT)
    ok, ov = tl.arange(0, BK), tl.arange(0, BV)
    row = (b * T + t) * H + h
    p_k, m_k = row[:, None] * K + ok[None, :], (t[:, None] < T) & (ok[None, :] < K)
    p_v, m_v = row[:, None] * V + ov[None, :], (t[:, None] < T) & (ov[None, :] < V)
    rr = tl.load(r + p_k, mask=m_k, other=0.0).to(tl.float32)
    kk = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
    vv = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
    uu = tl.load(u + h * K + ok, mask=ok < K, other=0.0).to(tl.float32)
    return t, p_k, m_k, p_v, m_v, rr, kk, vv, uu


@triton.jit
def _bonus_fwd(o_next, first, r, k, v, u, o, T, H, K, V, scale, BT: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, USE_FIRST: tl.constexpr):
    t, p_k, m_k, p_v, m_v, rr, kk, vv, uu = _tiles(r, k, v, u, T, H, K, V, BT, BK, BV)
    c = scale * tl.sum(rr * kk * uu[None, :], 1)  # [BT]
    # r_t S_{t-1}: the engine's output one row up (t >= 1), `first` on row 0
    past = tl.load(o_next + p_v - H * V, mask=m_v & (t[:, None] >= 1), other=0.0).to(tl.float32)
    if USE_FIRST:
        ov = tl.arange(0, BV)
        row0 = tl.load(first + tl.program_id(1) * V + ov, mask=ov < V, other=0.0)
        past += tl.where(t[:, None] == 0, row0[None, :], 0.0)
    tl.store(o + p_v, (past + c[:, None] * vv).to(o.dtype.element_ty), mask=m_v)


@triton.jit
def _bonus_bwd(do, r, k, v, u, d_o_next, d_first, dr, dk, dv, du_part, T, H, K, V, scale, BT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    t, p_k, m_k, p_v, m_v, rr, kk, vv, uu = _tiles(r, k, v, u, T, H, K, V, BT, BK, BV)
    dd = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
    c = scale * tl.sum(rr * kk * uu[None, :], 1)
    dc = scale * tl.sum(dd * vv, 1)  # scale folded in: every use below carries it
    tl.store(dv + p_v, (c[:, None] * dd).to(dv.dtype.element_ty), mask=m_v)
    tl.store(dr + p_k, (uu[None, :] * kk * dc[:, None]).to(dr.dtype.element_ty), mask=m_k)
    tl.store(dk + p_k, (uu[None, :] * rr * dc[:, None]).to(dk.dtype.element_ty), mask=m_k)
    it, bh = tl.program_id(0), tl.program_id(1)
    ok = tl.arange(0, BK)
    tl.store(du_part + (it * tl.num_programs(1) + bh) * K + ok, tl.sum(rr * kk * dc[:, None], 0), mask=ok < K)
    # o_next's row t - 1 fed row t; its last row fed nothing
    tl.store(d_o_next + p_v - H * V, dd.to(d_o_next.dtype.element_ty), mask=m_v & (t[:, None] >= 1))
    tl.store(d_o_next + p_v, tl.zeros_like(dd).to(d_o_next.dtype.element_ty), mask=m_v & (t[:, None] == T - 1))
    ov = tl.arange(0, BV)
    row0 = tl.sum(tl.where(t[:, None] == 0, dd, 0.0), 0)
    tl.store(d_first + bh * V + ov, row0, mask=(ov < V) & (it == 0))


def _launch_dims(r, v):
    B, T, H, K = r.shape
    V = v.shape[-1]
    blk = lambda n: max(16, next_pow2(n))  # noqa: E731
    return B, T, H, K, V, (cdiv(T, ROWS), B * H), dict(BT=ROWS, BK=blk(K), BV=blk(V))


def _epilogue(o_next, first, r, k, v, u, scale: float):
    B, T, H, K, V, grid, blocks = _launch_dims(r, v)
    o = empty_output(v.shape, v.dtype, v.device)
    _bonus_fwd[grid](o_next, first if first is not None else o, r, k, v, u, o, T, H, K, V, float(scale),
                     USE_FIRST=first is not None, **blocks, num_warps=4)
    return o


def _epilogue_backward(do, r, k, v, u, scale: float):
    """(d o_next, d first `[B, H, V]`, dr, dk, dv: float32 (the caller adds the engine's parts), du)."""
    B, T, H, K, V, grid, blocks = _launch_dims(r, v)
    f32 = dict(dtype=torch.float32, device=r.device)
    d_o_next = empty_output(v.shape, torch.float32, v.device)
    d_first = empty_output((B, H, V), torch.float32, v.device)
    dr, dk, dv = (empty_output(t.shape, torch.float32, t.device) for t in (r, k, v))
    du_part = empty_output((grid[0], B, H, K), **f32)
    _bonus_bwd[grid](do.contiguous(), r, k, v, u, d_o_next, d_first, dr, dk, dv, du_part, T, H, K, V,
                     float(scale), **blocks, num_warps=4)
    return d_o_next, d_first, dr, dk, dv, du_part.sum((0, 1)).to(u.dtype)


class _RWKVChunk(torch.autograd.Function):
    """The whole chunk form as one autograd node: the engine on the queries shifted one step left, then the
    epilogue. r, k and v get gradients from both parts; they are summed in float32 and rounded once (as separate
    nodes, each part's gradient was rounded to bf16, then their sum: three roundings of a large gradient)."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, h0, scale, chunk_size):
        B, T, H, K = r.shape
        V = v.shape[-1]
        r, k, v, w, u = (t.contiguous() for t in (r, k, v, w, u))
        q = torch.cat([r[:, 1:], torch.zeros_like(r[:, :1])], dim=1)  # q'_j = r_{j+1}
        pk = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731
        ch = _dense_chunks(B, T, chunk_size, str(r.device))
        h0 = None if h0 is None else h0.contiguous()
        want_grad = any(ctx.needs_input_grad[:6])
        o_next, ht, saved = _forward(pk(q), pk(k), pk(v), pk(w), None, scale, h0, False, ch, True, want_grad,
                                     torch.float32)  # rounded once, after the bonus
        first = None if h0 is None else scale * torch.einsum("bhk,bhkv->bhv", r[:, 0].float(), h0.float())
        o = _epilogue(o_next.view(B, T, H, V), first, r, k, v, u, scale)
        if want_grad:
            ctx.save_for_backward(q, k, v, w, r, u, h0, *saved)
        ctx.scale, ctx.ch = scale, ch
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, w, r, u, h0, *saved = ctx.saved_tensors
        B, T, H, K = r.shape
        scale = ctx.scale
        d_o_next, d_first, dr, dk, dv, du = _epilogue_backward(do, r, k, v, u, scale)
        pk = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731
        dq, dk_e, dv_e, dw, _, dh0 = _backward(pk(q), pk(k), pk(v), pk(w), None, scale, False, ctx.ch, saved,
                                               pk(d_o_next), dht, h0 is not None, grad_dtype=torch.float32)
        dr[:, 1:] += dq.view(q.shape)[:, :-1]
        dk += dk_e.view(k.shape)
        dv += dv_e.view(v.shape)
        if h0 is not None:  # first = scale r_0 h0
            dr[:, 0] += scale * torch.einsum("bhv,bhkv->bhk", d_first, h0.float())
            dh0 = (dh0 + scale * torch.einsum("bhk,bhv->bhkv", r[:, 0].float(), d_first)).to(h0.dtype)
        return (dr.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.view(w.shape), du, dh0, None, None)


def rwkv_chunk(r, k, v, w, u, initial_state, scale: float, chunk_size: int):
    """RWKV-5/6's WKV on the engine's chunk kernels and the fused epilogue: r, k, w `[B, T, H, K]`, v
    `[B, T, H, V]`, u `[H, K]`, initial_state `[B, H, K, V]` or None. Returns (o `[B, T, H, V]` in v's dtype,
    the final state `[B, H, K, V]` float32)."""
    return _RWKVChunk.apply(r, k, v, w, u, initial_state, scale, chunk_size)
