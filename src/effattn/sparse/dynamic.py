"""Dynamic sparse attention (survey Sec. 6.4): block selections computed from q and k, run by the
block-sparse flash kernel.

- MoBA (Lu et al. 2025): mean-pooled key blocks, top-k gating per query block, current block causal.
- Quest (Tang et al. 2024): per-page min/max key bounds, upper bound of q.k per page, top-k pages.
- XAttention (Xu et al. 2025) / FlexPrefill-style: antidiagonal block scores, softmax over key tiles,
  smallest set of blocks reaching a cumulative `threshold` (or a fixed `budget` fraction).

For each: `*_select` computes the selection fast (pooled tensors, never `[T, S]`); the method builds a
`BlockMask` and calls `effattn.flash_attention`; `*_reference` recomputes the selection densely from the
full float64 score matrix (or a loop over pages) and runs `softmax_attention` with the elementwise mask.
Selection scores are computed in >= float32 so that the choice does not depend on bf16 rounding; the
selection is not differentiated (gradients flow through the attention over the chosen blocks).
"""
from __future__ import annotations

import math

import torch

from ..hardware.flash import flash_attention
from ..reference.softmax import softmax_attention
from ..validate import check_positive_int, check_qkv, check_scale
from .block_mask import block_mask_from_blocks
from ._select import (block_relation, causal_fn, dense_mask, kv_heads_to_q, n_blocks, stat_dtype, token_block_mask,
                      top_k_of)

QUERY_BLOCK = 16  # Quest's query tile: decoding has few queries


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of the sequence dim: `[B, N, H, D]` -> `[B, ceil(N / block), H, D]`."""
    B, N, H, D = x.shape
    nb = n_blocks(N, block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * block - N))
    counts = torch.clamp(N - torch.arange(nb, device=x.device) * block, max=block).view(1, nb, 1, 1)
    return xp.view(B, nb, block, H, D).sum(2) / counts


def _check(q, k, v, scale, **ints):
    dims = check_qkv(q, k, v)
    check_scale(scale)
    for name, value in ints.items():
        check_positive_int(name, value, power_of_two=name in ("block_size", "page_size"),
                           minimum=0 if name == "top_k" else 1)
    return dims


# ---------------------------------------------------------------- MoBA

def moba_select(q, k, block_size=64, top_k=3):
    """MoBA gating: score(i, j) = mean(q in query block i) . mean(k in key block j); each query block
    keeps its current block(s) and the top_k past blocks. Returns bool `[B, H, nQ, nK]`."""
    T, S, H = q.shape[1], k.shape[1], q.shape[2]
    acc = stat_dtype(q)
    qbar = _pool(q.detach().to(acc), block_size)
    kbar = kv_heads_to_q(_pool(k.detach().to(acc), block_size), H)
    scores = torch.einsum("bihd,bjhd->bhij", qbar, kbar)
    past, current = block_relation(T, S, block_size, block_size, q.device)
    return top_k_of(scores, past.expand_as(scores), top_k) | current


def moba(q, k, v, *, block_size=64, top_k=3, scale=None):
    """Mixture of Block Attention (causal). q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`
    -> o `[B, T, H, Dv]`. Each query block attends to (1 + top_k) key blocks of `block_size`:
    time O(N (k + 1) b d) plus O(N^2 d / b^2) for the gate."""
    B, T, S, H, _, _, _ = _check(q, k, v, scale, block_size=block_size, top_k=top_k)
    sel = moba_select(q, k, block_size, top_k)
    bm = block_mask_from_blocks(sel, T, S, (block_size, block_size), causal=True)
    return flash_attention(q, k, v, block_mask=bm, scale=scale)


def _block_average(n: int, block: int, dtype, device) -> torch.Tensor:
    """`[nb, n]` matrix averaging the entries of each block."""
    idx = torch.arange(n, device=device)
    a = (idx.view(1, n) // block == torch.arange(n_blocks(n, block), device=device).view(-1, 1)).to(dtype)
    return a / a.sum(1, keepdim=True)


def moba_reference_select(q, k, block_size=64, top_k=3):
    """The MoBA gate from the full score matrix: mean of q_t . k_s over each (query block, key block)."""
    T, S, H = q.shape[1], k.shape[1], q.shape[2]
    full = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H // k.shape[2], dim=2))
    scores = _block_average(T, block_size, q.dtype, q.device) @ full @ _block_average(S, block_size, q.dtype, q.device).T
    past, current = block_relation(T, S, block_size, block_size, q.device)
    return top_k_of(scores, past.expand_as(scores), top_k) | current


def moba_reference(q, k, v, *, block_size=64, top_k=3, scale=None, **_ignored):
    T, S = q.shape[1], k.shape[1]
    sel = moba_reference_select(q.detach(), k.detach(), block_size, top_k)
    mask = dense_mask(sel, T, S, block_size, block_size, causal_fn(T, S))
    return softmax_attention(q, k, v, mask=mask, scale=scale)


# ---------------------------------------------------------------- Quest

def quest_select(q, k, page_size=16, top_k=4):
    """Quest: per page p, key bounds m_p = min, M_p = max (per channel); criticality of page p for query
    q is sum_d max(q_d m_pd, q_d M_pd) = q . (m + M)/2 + |q| . (M - m)/2, an upper bound of q . k over
    the page. Each query token keeps its top_k causally visible pages. Returns bool `[B, H, T, nP]`."""
    T, S, H = q.shape[1], k.shape[1], q.shape[2]
    acc = stat_dtype(q)
    kf = k.detach().to(acc)
    nP = n_blocks(S, page_size)
    pad = nP * page_size - S
    kp = torch.nn.functional.pad(kf, (0, 0, 0, 0, 0, pad), value=math.inf).view(k.shape[0], nP, page_size, *k.shape[2:])
    lo = kp.amin(2)
    hi = torch.nn.functional.pad(kf, (0, 0, 0, 0, 0, pad), value=-math.inf).view_as(kp).amax(2)
    centre, radius = kv_heads_to_q((lo + hi) / 2, H), kv_heads_to_q((hi - lo) / 2, H)
    qf = q.detach().to(acc)
    crit = torch.einsum("bthd,bphd->bhtp", qf, centre) + torch.einsum("bthd,bphd->bhtp", qf.abs(), radius)
    pos = torch.arange(T, device=q.device).view(T, 1) + (S - T)
    visible = torch.arange(nP, device=q.device).view(1, nP) * page_size <= pos
    return top_k_of(crit, visible.expand_as(crit), top_k)


def quest(q, k, v, *, page_size=16, top_k=4, scale=None):
    """Query-aware page selection for decoding (causal, bottom-right). q `[B, T, H, D]` (T small),
    k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` -> o `[B, T, H, Dv]`; each query reads top_k pages:
    O(S d / page) for the bounds and O(top_k page d) per query for attention."""
    B, T, S, H, _, _, _ = _check(q, k, v, scale, page_size=page_size, top_k=top_k)
    bm = token_block_mask(quest_select(q, k, page_size, top_k), T, S, page_size, QUERY_BLOCK)
    return flash_attention(q, k, v, block_mask=bm, scale=scale)


def quest_reference_select(q, k, page_size=16, top_k=4):
    """Quest's criticality by the definition, max(q_d m_d, q_d M_d) summed over d, page by page."""
    T, S, H = q.shape[1], k.shape[1], q.shape[2]
    kh = k.repeat_interleave(H // k.shape[2], dim=2)
    crit = []
    for start in range(0, S, page_size):
        page = kh[:, start:start + page_size]  # [B, P, H, D]
        lo, hi = page.amin(1, keepdim=True), page.amax(1, keepdim=True)
        crit.append(torch.maximum(q * lo, q * hi).sum(-1).transpose(1, 2))  # [B, H, T]
    crit = torch.stack(crit, dim=-1)
    pos = torch.arange(T).view(T, 1) + (S - T)
    visible = (torch.arange(crit.shape[-1]).view(1, -1) * page_size <= pos).to(q.device)
    return top_k_of(crit, visible.expand_as(crit), top_k)


def quest_reference(q, k, v, *, page_size=16, top_k=4, scale=None, **_ignored):
    T, S = q.shape[1], k.shape[1]
    sel = quest_reference_select(q.detach(), k.detach(), page_size, top_k)
    mask = dense_mask(sel, T, S, 1, page_size, causal_fn(T, S))
    return softmax_attention(q, k, v, mask=mask, scale=scale)


# ---------------------------------------------------------------- XAttention / FlexPrefill-style

def choose_blocks(weights: torch.Tensor, candidates: torch.Tensor, threshold=None, budget=None) -> torch.Tensor:
    """Per row, the fewest candidate blocks whose weights (normalised over candidates) sum to at least
    `threshold`, or the `ceil(budget * n_candidates)` heaviest. Bool, same shape as `weights`."""
    w = weights.masked_fill(~candidates, 0.0)
    if budget is not None:  # a budget replaces the threshold
        k = torch.ceil(budget * candidates.sum(-1, keepdim=True).to(w.dtype)).long()
        order = w.masked_fill(~candidates, -1.0).argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(w.shape[-1], device=w.device).expand_as(order))
        return (rank < k) & candidates
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    sorted_w, order = w.sort(-1, descending=True)
    before = sorted_w.cumsum(-1) - sorted_w  # mass of the heavier blocks already chosen
    keep_sorted = before < threshold
    return torch.zeros_like(candidates).scatter_(-1, order, keep_sorted) & candidates


def _tile_softmax_to_blocks(A, T, S, stride, block_size, causal, scale):
    """Antidiagonal tile scores `[B, H, nt, ns]` -> block weights `[B, H, nQ, nK]` (softmax over tiles)."""
    nt, ns = A.shape[-2:]
    if causal:
        i = torch.arange(nt, device=A.device).view(nt, 1)
        j = torch.arange(ns, device=A.device).view(1, ns)
        A = A.masked_fill(j * stride > i * stride + stride - 1 + (S - T), -math.inf)
    P = torch.softmax(A * scale / stride, dim=-1).nan_to_num(0.0)
    m = block_size // stride
    nq, nk = n_blocks(T, block_size), n_blocks(S, block_size)
    P = torch.nn.functional.pad(P, (0, nk * m - ns, 0, nq * m - nt))
    return P.view(*P.shape[:2], nq, m, nk, m).sum((3, 5))


def _xattention_candidates(T, S, block_size, causal, device):
    past, current = block_relation(T, S, block_size, block_size, device)
    return (past | current) if causal else torch.ones_like(past), current


def xattention_select(q, k, block_size=64, stride=8, threshold=0.9, budget=None, causal=True, scale=None):
    """Antidiagonal scoring: the sum of q_a . k_c over each stride x stride tile's antidiagonal equals the
    dot product of the tile's q rows in reverse order, concatenated, with its k rows concatenated, so
    one product of `[T / s, s D]` by `[S / s, s D]` scores every tile. Returns bool `[B, H, nQ, nK]`."""
    B, T, H, D = q.shape
    S = k.shape[1]
    acc = stat_dtype(q)
    nt, ns = n_blocks(T, stride), n_blocks(S, stride)
    qp = torch.nn.functional.pad(q.detach().to(acc), (0, 0, 0, 0, 0, nt * stride - T))
    kp = torch.nn.functional.pad(kv_heads_to_q(k.detach().to(acc), H), (0, 0, 0, 0, 0, ns * stride - S))
    qr = qp.view(B, nt, stride, H, D).flip(2).permute(0, 1, 3, 2, 4).reshape(B, nt, H, stride * D)
    kr = kp.view(B, ns, stride, H, D).permute(0, 1, 3, 2, 4).reshape(B, ns, H, stride * D)
    A = torch.einsum("bihx,bjhx->bhij", qr, kr)
    scale = D ** -0.5 if scale is None else scale
    W = _tile_softmax_to_blocks(A, T, S, stride, block_size, causal, scale)
    cand, current = _xattention_candidates(T, S, block_size, causal, q.device)
    return choose_blocks(W, cand.expand_as(W), threshold, budget) | current


def xattention(q, k, v, *, block_size=64, stride=8, threshold=0.9, budget=None, causal=True, scale=None):
    """Block-sparse prefill with antidiagonal block selection (XAttention; FlexPrefill's cumulative
    threshold). q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` -> o `[B, T, H, Dv]`.
    `threshold` in (0, 1] (attention mass to keep per query block) or, when given, `budget` in (0, 1]
    (fraction of the causally visible blocks; replaces the threshold). Selection O(N^2 d / s), attention O(selected blocks * b^2 d)."""
    B, T, S, H, _, _, _ = _check(q, k, v, scale, block_size=block_size, stride=stride)
    _check_xattention(block_size, stride, threshold, budget)
    sel = xattention_select(q, k, block_size, stride, threshold, budget, causal, scale)
    bm = block_mask_from_blocks(sel, T, S, (block_size, block_size), causal=causal)
    return flash_attention(q, k, v, block_mask=bm, scale=scale)


def _check_xattention(block_size, stride, threshold, budget):
    if block_size % stride:
        raise ValueError(f"stride must divide block_size, got stride={stride}, block_size={block_size}")
    if threshold is None and budget is None:
        raise ValueError("give a threshold or a budget, got neither")
    for name, x in (("threshold", threshold), ("budget", budget)):
        if x is not None and not (isinstance(x, (int, float)) and 0 < x <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {x!r}")


def xattention_reference_select(q, k, block_size=64, stride=8, threshold=0.9, budget=None, causal=True, scale=None):
    """The same selection from the full score matrix: antidiagonal entries (a + c = s - 1 inside each
    stride x stride tile) summed per tile."""
    B, T, H, D = q.shape
    S = k.shape[1]
    nt, ns = n_blocks(T, stride), n_blocks(S, stride)
    full = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H // k.shape[2], dim=2))
    full = torch.nn.functional.pad(full, (0, ns * stride - S, 0, nt * stride - T))
    a = torch.arange(nt * stride, device=q.device).view(-1, 1) % stride
    c = torch.arange(ns * stride, device=q.device).view(1, -1) % stride
    A = (full * (a + c == stride - 1)).view(B, H, nt, stride, ns, stride).sum((3, 5))
    scale = D ** -0.5 if scale is None else scale
    W = _tile_softmax_to_blocks(A, T, S, stride, block_size, causal, scale)
    cand, current = _xattention_candidates(T, S, block_size, causal, q.device)
    return choose_blocks(W, cand.expand_as(W), threshold, budget) | current


def xattention_reference(q, k, v, *, block_size=64, stride=8, threshold=0.9, budget=None, causal=True,
                         scale=None, **_ignored):
    T, S = q.shape[1], k.shape[1]
    sel = xattention_reference_select(q.detach(), k.detach(), block_size, stride, threshold, budget, causal, scale)
    mask = dense_mask(sel, T, S, block_size, block_size, causal_fn(T, S) if causal else None)
    return softmax_attention(q, k, v, mask=mask, scale=scale)


def _register() -> None:
    from functools import partial

    from ..registry import KV_CACHE, Complexity, Method, register
    from ._inputs import sparse_inputs

    kv_cache = KV_CACHE
    common = dict(family="sparse", state_or_cache=kv_cache, approximates_softmax=True,
                  supports=frozenset({"causal", "backward", "gqa"}))
    register(Method(
        name="moba", cite="Lu et al. 2025 (survey Table 4, MoBA)", fn=moba, reference=moba_reference,
        make_inputs=partial(sparse_inputs, small={"block_size": 16, "top_k": 1}),
        complexity=Complexity("O(N k b d + N^2 d / b^2)", "O(N)", 1.0, 1.0),
        options={"block_size": 64, "top_k": 3, "scale": None},
        description="mean-pooled key blocks, top-k gate per query block, causal current block", **common))
    register(Method(
        name="quest", cite="Tang et al. 2024 (survey Table 4, Quest)", fn=quest, reference=quest_reference,
        make_inputs=partial(sparse_inputs, small={"page_size": 16, "top_k": 2}),
        complexity=Complexity("O(N S d / p + N k p d)", "O(S d / p)", 1.0, 1.0),
        options={"page_size": 16, "top_k": 4, "scale": None},
        description="per-page min/max key bounds, top-k pages per query (decoding)", **common))
    register(Method(
        name="xattention", cite="Xu et al. 2025 (survey Table 4, XAttention); Lai et al. 2025 (FlexPrefill)",
        fn=xattention, reference=xattention_reference,
        make_inputs=partial(sparse_inputs, small={"block_size": 16, "stride": 4, "threshold": 0.6}),
        complexity=Complexity("O(N^2 d / s + N rho N d)", "O(N^2 / b^2)", 2.0, 1.0),
        options={"block_size": 64, "stride": 8, "threshold": 0.9, "budget": None, "causal": True, "scale": None},
        description="antidiagonal block scores, cumulative threshold or budget, block-sparse prefill", **common))


_register()
