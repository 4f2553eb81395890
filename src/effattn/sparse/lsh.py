"""Reformer LSH attention (Kitaev et al. 2020; survey Sec. 3.3).

Angular LSH: h(x) = argmax([x R; -x R]) with a random rotation R `[d, n_buckets / 2]` per hash round
(drawn from `seed`, identical on every device). Per round, queries and keys are sorted by (bucket,
position) and cut into chunks of `chunk_size`; a query attends to the keys of its own bucket in its chunk
and the previous one (Eq. P~_i of the paper), causally if asked. With shared QK (the paper's default,
keys k_j = q_j / ||q_j||, `k` is then not used) a token does not attend to itself unless it has no other
key. The rounds are combined by their log-sum-exp: o = sum_r exp(lse_r - logsumexp_r lse_r) o_r.
The fast path works on the sorted chunks (time O(n_hashes N chunk d), memory O(n_hashes N chunk));
the reference builds the same sets as dense `[T, S]` masks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..validate import check_positive_int, check_qkv, check_scale


def rotations(D: int, n_hashes: int, n_buckets: int, seed: int) -> torch.Tensor:
    """`[n_hashes, D, n_buckets / 2]` float64, from `torch.Generator().manual_seed(seed)`."""
    return torch.randn(n_hashes, D, n_buckets // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hash_vectors(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """x `[B, N, H, D]` -> buckets `[n_hashes, B, H, N]` (long)."""
    xr = torch.einsum("bnhd,rdk->rbhnk", x, R.to(device=x.device, dtype=x.dtype))
    return torch.cat([xr, -xr], dim=-1).argmax(-1)


def _keys(q, k, v, shared_qk):
    H = q.shape[2]
    keys = F.normalize(q, dim=-1) if shared_qk else k.repeat_interleave(H // k.shape[2], dim=2)
    return keys, v.repeat_interleave(H // v.shape[2], dim=2)


def _combine(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Rounds `[B, H, T, Dv]` with LSEs `[B, H, T]` -> `[B, T, H, Dv]`."""
    lse = torch.stack(lses)
    w = torch.softmax(lse, dim=0).nan_to_num(0.0).unsqueeze(-1)  # a row empty in every round stays 0
    return (w * torch.stack(outs)).sum(0).transpose(1, 2)


def _check(q, k, v, n_hashes, n_buckets, chunk_size, scale):
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v, same_length=True)
    check_scale(scale)
    check_positive_int("n_hashes", n_hashes)
    check_positive_int("n_buckets", n_buckets, minimum=2)
    check_positive_int("chunk_size", chunk_size)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be even (h(x) = argmax([xR; -xR])), got {n_buckets}")


def _chunk(x: torch.Tensor, nc: int, m: int, fill) -> torch.Tensor:
    """Sorted `[B, H, N, ...]` -> chunks `[B, H, nc, m, ...]`, padded with `fill`."""
    pad = nc * m - x.shape[2]
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:2], pad, *x.shape[3:]), fill)], dim=2)
    return x.view(*x.shape[:2], nc, m, *x.shape[3:])


def _with_previous(x: torch.Tensor, fill) -> torch.Tensor:
    """Chunks `[B, H, nc, m, ...]` -> `[B, H, nc, 2m, ...]`: the previous chunk, then the chunk itself."""
    prev = torch.cat([torch.full_like(x[:, :, :1], fill), x[:, :, :-1]], dim=2)
    return torch.cat([prev, x], dim=3)


def lsh_attention(q, k, v, *, n_hashes=2, n_buckets=8, chunk_size=64, causal=False, shared_qk=True, seed=0,
                  scale=None):
    """q `[B, T, H, D]`, k `[B, T, Hkv, D]` (unused with `shared_qk`), v `[B, T, Hkv, Dv]` -> o `[B, T, H, Dv]`."""
    _check(q, k, v, n_hashes, n_buckets, chunk_size, scale)
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    keys, vals = _keys(q, k, v, shared_qk)
    acc = torch.promote_types(q.dtype, torch.float32)
    R = rotations(D, n_hashes, n_buckets, seed)
    bq, bk = hash_vectors(q.detach().to(acc), R), hash_vectors(keys.detach().to(acc), R)
    m, nc = chunk_size, math.ceil(T / chunk_size)
    pos = torch.arange(T, device=q.device)
    qh, kh, vh = q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2)  # [B, H, T, .]
    outs, lses = [], []
    for r in range(n_hashes):
        order_q = (bq[r] * T + pos).argsort(-1)  # sort by (bucket, position)
        order_k = (bk[r] * T + pos).argsort(-1)

        def take(x, order):
            return x.gather(2, order.unsqueeze(-1).expand(*order.shape, x.shape[-1]))
        qc = _chunk(take(qh, order_q), nc, m, 0.0)
        kc = _with_previous(_chunk(take(kh, order_k), nc, m, 0.0), 0.0)
        vc = _with_previous(_chunk(take(vh, order_k), nc, m, 0.0), 0.0)
        pq = _chunk(order_q, nc, m, -1).unsqueeze(-1)  # query positions, -1 = padding
        pk = _with_previous(_chunk(order_k, nc, m, -1), -1).unsqueeze(-2)
        bqc = _chunk(bq[r].gather(2, order_q), nc, m, -1).unsqueeze(-1)
        bkc = _with_previous(_chunk(bk[r].gather(2, order_k), nc, m, -2), -2).unsqueeze(-2)
        valid = (bqc == bkc) & (pk >= 0)
        if causal:
            valid &= pk <= pq
        if shared_qk:
            others = valid & (pk != pq)
            valid = torch.where(others.any(-1, keepdim=True), others, valid)
        s = torch.einsum("bhcid,bhcjd->bhcij", qc, kc).to(acc) * scale
        s = s.masked_fill(~valid, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0).to(v.dtype)
        o = torch.einsum("bhcij,bhcjd->bhcid", p, vc).reshape(B, H, nc * m, -1)[:, :, :T]
        lse = lse.reshape(B, H, nc * m)[:, :, :T]
        inv = order_q.argsort(-1)  # back to the original order
        outs.append(o.gather(2, inv.unsqueeze(-1).expand_as(o)))
        lses.append(lse.gather(2, inv))
    return _combine(outs, lses).to(v.dtype)


def lsh_reference(q, k, v, *, n_hashes=2, n_buckets=8, chunk_size=64, causal=False, shared_qk=True, seed=0,
                  scale=None, **_ignored):
    """Dense: per round, mask[i, j] = same bucket and chunk(j) in {chunk(i) - 1, chunk(i)}, where chunk()
    is the rank in the (bucket, position) order divided by chunk_size; then softmax and LSE combination."""
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    keys, vals = _keys(q, k, v, shared_qk)
    R = rotations(D, n_hashes, n_buckets, seed)
    bq, bk = hash_vectors(q.detach(), R), hash_vectors(keys.detach(), R)
    pos = torch.arange(T, device=q.device)
    scores = torch.einsum("bthd,bshd->bhts", q, keys) * scale
    outs, lses = [], []
    for r in range(n_hashes):
        chunk_q = (bq[r] * T + pos).argsort(-1).argsort(-1) // chunk_size  # rank -> chunk
        chunk_k = (bk[r] * T + pos).argsort(-1).argsort(-1) // chunk_size
        keep = bq[r].unsqueeze(-1) == bk[r].unsqueeze(-2)
        dc = chunk_q.unsqueeze(-1) - chunk_k.unsqueeze(-2)
        keep &= (dc == 0) | (dc == 1)
        if causal:
            keep &= pos.view(1, -1) <= pos.view(-1, 1)
        if shared_qk:
            others = keep & ~torch.eye(T, dtype=torch.bool, device=q.device)
            keep = torch.where(others.any(-1, keepdim=True), others, keep)
        s = scores.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append(torch.einsum("bhts,bshd->bhtd", p, vals))
        lses.append(lse)
    return _combine(outs, lses)


def _register() -> None:
    from dataclasses import replace
    from ..registry import KV_CACHE, Complexity, Method, register

    def make_inputs(shape, dtype, device, generator, **options):
        from ._inputs import sparse_inputs

        shape = replace(shape, seq_k=None)  # self-attention only
        return sparse_inputs(shape, dtype, device, generator, small={"n_buckets": 4, "chunk_size": 8, "causal": True},
                             large={"causal": True}, **options)

    register(Method(
        name="reformer_lsh", family="sparse", cite="Kitaev et al. 2020 (Reformer; survey Sec. 3.3)",
        fn=lsh_attention, reference=lsh_reference, make_inputs=make_inputs,
        complexity=Complexity("O(n_h N c d)", "O(n_h N c)", 1.0, 1.0),
        state_or_cache=KV_CACHE,
        options={"n_hashes": 2, "n_buckets": 8, "chunk_size": 64, "causal": False, "shared_qk": True,
                 "seed": 0, "scale": None},
        supports=frozenset({"causal", "noncausal", "backward", "gqa"}), approximates_softmax=True,
        description="angular LSH buckets, sorted chunks + previous chunk, shared QK, rounds merged by LSE"))


_register()
