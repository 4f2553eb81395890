"""Ring attention (Liu et al., 2023) with zigzag load balancing for causal attention.

Each of the W ranks holds a shard of the sequence (see sharding.py). K/V shards circulate around the
ring: at step i rank r holds the K/V of rank r - i, computes its queries against them with the local
attention (local.py) while the next shard is already in flight, and merges the partial output with the
LSE. The backward circulates K/V again, together with an accumulator of dK/dV that visits every rank and
arrives back at its owner after W hops; each step uses the final output and LSE, so it is exact.

Causal zigzag with local chunks (a, b) = (r, 2W-1-r) and K/V from rank s: s = r is causal on the whole
shard; s < r: all queries see the first K/V chunk only; s > r: only the second query chunk sees K/V, all
of it. Every step after the first costs half of a full block on every rank.
"""
from __future__ import annotations

import math

import torch

from ..validate import check_qkv, check_scale
from .comm import RingExchange, group_rank_size
from .local import LocalAttention, local_backend, merge_into

_KV_TAG, _DKV_TAG = 0, 1


def _step_plan(rank: int, src: int, n: int, causal: bool, zigzag: bool):
    """(query rows, key rows, causal) of the local shard that take part when holding rank src's K/V,
    or None when none of this rank's queries sees them."""
    full = slice(0, n)
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if not zigzag:
        return (full, full, False) if src < rank else None
    half = n // 2
    return (full, slice(0, half), False) if src < rank else (slice(half, n), full, False)


def _ring_forward(q, k, v, scale, causal, zigzag, group, rank, world, local: LocalAttention):
    B, n, H, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    o = torch.zeros(B, n, H, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, H, n), -math.inf, dtype=acc, device=q.device)
    kv = [k, v]
    for step in range(world):
        exchange = RingExchange(kv, group, rank, world, _KV_TAG) if step < world - 1 else None
        plan = _step_plan(rank, (rank - step) % world, n, causal, zigzag)
        if plan is not None:
            rows, cols, blk_causal = plan
            o_i, lse_i = local.forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], causal=blk_causal, scale=scale)
            merge_into(o[:, rows], lse[:, :, rows], o_i, lse_i)
            del o_i, lse_i  # not alive during the next step's local call: the peak holds one block's output
        if exchange is not None:
            kv = exchange.wait()
    return o, lse


def _ring_backward(do, q, k, v, o, lse, scale, causal, zigzag, group, rank, world, local: LocalAttention):
    n = q.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv, dkv_exchange = [k, v], None
    for step in range(world):
        kv_exchange = RingExchange(kv, group, rank, world, _KV_TAG) if step < world - 1 else None
        plan = _step_plan(rank, (rank - step) % world, n, causal, zigzag)
        if plan is not None:
            rows, cols, blk_causal = plan
            dq_i, dk_i, dv_i = local.backward(do[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols], o[:, rows],
                                              lse[:, :, rows], causal=blk_causal, scale=scale)
            dq[:, rows] += dq_i
        # The accumulator for the K/V held now left the previous rank after its compute of the last
        # step, so it travelled while this step computed.
        if dkv_exchange is None:
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        else:
            dkv = dkv_exchange.wait()
        if plan is not None:
            dkv[0][:, cols] += dk_i
            dkv[1][:, cols] += dv_i
            del dq_i, dk_i, dv_i  # likewise: one block's gradients alive at a time
        if world > 1:  # after the last step this hop brings each accumulator home
            dkv_exchange = RingExchange(dkv, group, rank, world, _DKV_TAG)
        if kv_exchange is not None:
            kv = kv_exchange.wait()
    if dkv_exchange is not None:
        dkv = dkv_exchange.wait()
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, zigzag, group, local):
        rank, world = group_rank_size(group)
        if world == 1:  # a ring of one is the local kernel: no accumulators (zigzag order is natural order)
            o, lse = local.forward(q, k, v, causal=causal, scale=scale)
        else:
            o, lse = _ring_forward(q, k, v, scale, causal, zigzag, group, rank, world, local)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (scale, causal, zigzag, group, rank, world, local)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        scale, causal, zigzag, group, rank, world, local = ctx.args
        if world == 1:
            dq, dk, dv = local.backward(do.contiguous(), q, k, v, o, lse, causal=causal, scale=scale)
        else:
            dq, dk, dv = _ring_backward(do.contiguous(), q, k, v, o, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, *, group=None, causal: bool = False, scale: float | None = None, zigzag: bool = True,
                   backend: str = "auto", return_lse: bool = False):
    """Exact softmax attention over a sequence sharded across the ranks of `group`.

    q: `[B, n, H, D]`, k: `[B, n, Hkv, D]`, v: `[B, n, Hkv, Dv]`: this rank's shard (n = N / W tokens,
    `shard(x, group, zigzag=...)` cuts it), H % Hkv == 0; K/V travel with their Hkv heads, never repeated.
    `zigzag` says how the shards were cut when `causal` (rank r holds chunks r and 2W-1-r of 2W); without
    `causal` the key order does not matter and it is ignored. `backend`: the local attention ("auto",
    "torch", "sdpa", see local.py). Every rank must call with the same shapes and options.

    Returns o `[B, n, H, Dv]` (this rank's rows), and with `return_lse` also the LSE `[B, H, n]` in float32
    (float64 for float64 inputs; no gradient flows through it). Differentiable in q, k, v, exactly.
    Time O(N^2 d / W) per rank (causal: half) in W steps, each overlapping one K/V transfer of
    O(N Hkv d / W); memory O(N / W) per rank.
    """
    check_qkv(q, k, v, same_length=True)
    check_scale(scale)
    group_rank_size(group)  # raises unless torch.distributed is initialised
    zigzag = bool(zigzag) and bool(causal)
    if zigzag and q.shape[1] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks, so the local length must be even, got "
                         f"q with n={q.shape[1]} tokens")
    local = local_backend(backend, q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, lse = _RingAttention.apply(q, k, v, scale, bool(causal), zigzag, group, local)
    return (o, lse) if return_lse else o
