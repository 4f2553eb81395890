"""NSA, Native Sparse Attention (Yuan et al. 2025; survey Table 4 and Sec. 6.4): three causal branches
mixed by learned gates, o_t = g_cmp o_cmp + g_slc o_slc + g_win o_win.

- compression: K and V cut into blocks of l tokens (stride d = l), each block mapped to one token by a
  learned map phi; here phi is linear over the positions of the block, k~_i = sum_j w_k[j] k_{i l + j}
  (the paper's phi is an MLP with an intra-block position encoding; the linear map is its first layer).
  Query t sees compressed block i when the whole block is in its past (i l + l - 1 <= t).
- selection: block importance = the compression branch's attention probabilities summed over the
  query heads of a GQA group (Eq. 9-10 with l' = l = d). With `selection="token"` (the paper's, and the
  default) each query keeps the block holding its own position and its top_n earlier blocks; with
  `selection="block"` the importance is also summed over the queries of a query block of l, which then
  share one choice (coarser tiles, no elementwise mask inside them, but a query's choice then depends
  on the later queries of its block: not causal token by token, so layers use "token"). Then attention
  to the chosen blocks' original tokens, causal.
- sliding window: the last `window` tokens.
All three run through `effattn.flash_attention`; the selection is not differentiated, everything else
(q, k, v, gates, w_k, w_v) is trained end to end.
"""
from __future__ import annotations

import torch

from ..hardware.flash import flash_attention
from ..reference.softmax import softmax_attention
from ..validate import check_positive_int, check_qkv, check_scale, check_tensor
from .block_mask import block_mask, block_mask_from_blocks
from ._select import (block_relation, causal_fn, dense_mask, n_blocks, stat_dtype, token_block_mask,
                      top_k_of)

SELECTIONS = ("token", "block")


def compress(x: torch.Tensor, w: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[B, S, H, D]` -> `[B, S // l, H, D]`: sum_j w[j] x[i l + j] over complete blocks."""
    B, S, H, D = x.shape
    n = S // block_size
    return torch.einsum("bnjhd,j->bnhd", x[:, :n * block_size].reshape(B, n, block_size, H, D), w.to(x.dtype))


def _compressed_visible(T, S, block_size):
    return lambda b, h, q, kv: kv * block_size + block_size - 1 <= q + (S - T)


def _select(importance, T, S, block_size, top_n, H, Hkv, selection):
    """importance `[B, H, T, nC]` (probabilities over complete compressed blocks) -> bool, the same for the
    query heads of a GQA group: `[B, H, T, nK]` per query ("token") or `[B, H, nQ, nK]` per query block."""
    B, _, _, nC = importance.shape
    nk = n_blocks(S, block_size)
    imp = importance.view(B, Hkv, H // Hkv, T, nC).sum(2)
    imp = torch.nn.functional.pad(imp, (0, nk - nC))
    if selection == "token":
        own = (torch.arange(T, device=imp.device).view(T, 1) + (S - T)).div(block_size, rounding_mode="floor")
        j = torch.arange(nk, device=imp.device).view(1, nk)
        past, current = j < own, j == own
    else:
        nq = n_blocks(T, block_size)
        imp = torch.nn.functional.pad(imp, (0, 0, 0, nq * block_size - T)).view(B, Hkv, nq, block_size, nk).sum(3)
        past, current = block_relation(T, S, block_size, block_size, imp.device)
    sel = top_k_of(imp, past.expand_as(imp), top_n) | current
    return sel.repeat_interleave(H // Hkv, dim=1)


def _selected_mask(sel, T, S, block_size, selection):
    """The selected branch's elementwise mask `[B, H, T, S]` (references)."""
    return dense_mask(sel, T, S, 1 if selection == "token" else block_size, block_size, causal_fn(T, S))


def _check(q, k, v, gates, w_k, w_v, block_size, top_n, window, scale, selection):
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v)
    check_scale(scale)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    check_positive_int("block_size", block_size, power_of_two=True)
    check_positive_int("top_n", top_n, minimum=0)
    check_positive_int("window", window)
    check_tensor("gates", gates, ndim=4, layout="[B, T, H, 3]")
    if tuple(gates.shape) != (B, T, H, 3):
        raise ValueError(f"gates must have shape [B, T, H, 3] = {(B, T, H, 3)}, got {tuple(gates.shape)}")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        check_tensor(name, w, ndim=1, layout="[block_size]")
        if w.shape[0] != block_size:
            raise ValueError(f"{name} must have shape [block_size] = [{block_size}], got {tuple(w.shape)}")
    return B, T, S, H, Hkv


def nsa(q, k, v, gates, w_k, w_v, *, block_size=64, top_n=4, window=512, selection="token", scale=None):
    """Native sparse attention (causal, bottom-right). q `[B, T, H, D]`, k `[B, S, Hkv, D]`,
    v `[B, S, Hkv, Dv]`, gates `[B, T, H, 3]` (sigmoid outputs for the compressed, selected and window
    branches), w_k, w_v `[block_size]` (compression maps), selection "token" | "block" (see the module).
    Returns o `[B, T, H, Dv]`; before the first complete block (S < block_size) o_cmp is 0.
    Time O(N^2 d / l + N (top_n + 1) l d + N w d)."""
    B, T, S, H, Hkv = _check(q, k, v, gates, w_k, w_v, block_size, top_n, window, scale, selection)
    kc, vc = compress(k, w_k, block_size), compress(v, w_v, block_size)
    if kc.shape[1]:
        bm_c = block_mask(_compressed_visible(T, S, block_size), 1, 1, T, kc.shape[1], device=q.device)
        o_cmp = flash_attention(q, kc, vc, block_mask=bm_c, scale=scale)
    else:  # no complete block yet: nothing to attend to
        o_cmp = q.new_zeros(B, T, H, v.shape[-1])
    with torch.no_grad():  # the compressed probabilities rank the blocks; the ranking has no gradient
        acc = stat_dtype(q)
        D = q.shape[-1]
        sc = torch.einsum("bthd,bshd->bhts", q.to(acc), kc.to(acc).repeat_interleave(H // Hkv, dim=2))
        sc = sc * (D ** -0.5 if scale is None else scale)
        vis = _compressed_visible(T, S, block_size)(0, 0, torch.arange(T, device=q.device).view(T, 1),
                                                   torch.arange(kc.shape[1], device=q.device).view(1, -1))
        importance = torch.softmax(sc.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
        sel = _select(importance, T, S, block_size, top_n, H, Hkv, selection)
    if selection == "token":
        bm_s = token_block_mask(sel, T, S, block_size)
    else:
        bm_s = block_mask_from_blocks(sel, T, S, (block_size, block_size), causal=True)
    o_slc = flash_attention(q, k, v, block_mask=bm_s, scale=scale)
    o_win = flash_attention(q, k, v, causal=True, window=(window - 1, 0), scale=scale)
    g = gates.to(q.dtype).unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win


def nsa_reference(q, k, v, gates, w_k, w_v, *, block_size=64, top_n=4, window=512, selection="token", scale=None,
                  **_ignored):
    """The three branches with dense masks (softmax_attention), the selection from the compressed
    branch's probabilities recomputed from its LSE."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    kc, vc = compress(k, w_k, block_size), compress(v, w_v, block_size)
    if kc.shape[1] == 0:
        o_cmp, lse = q.new_zeros(B, T, H, v.shape[-1]), q.new_zeros(B, H, T)
    else:
        o_cmp, lse = softmax_attention(q, kc, vc, mask=_compressed_visible(T, S, block_size), scale=scale,
                                       return_lse=True)
    scale_ = D ** -0.5 if scale is None else scale
    sc = torch.einsum("bthd,bshd->bhts", q.detach(), kc.detach().repeat_interleave(H // Hkv, dim=2)) * scale_
    vis = torch.arange(kc.shape[1]).view(1, -1) * block_size + block_size - 1 <= torch.arange(T).view(-1, 1) + S - T
    p = torch.exp(sc - lse.detach().unsqueeze(-1)).masked_fill(~vis.to(q.device), 0.0).nan_to_num(0.0)
    sel = _select(p, T, S, block_size, top_n, H, Hkv, selection)
    o_slc = softmax_attention(q, k, v, mask=_selected_mask(sel, T, S, block_size, selection), scale=scale)
    o_win = softmax_attention(q, k, v, causal=True, window=(window - 1, 0), scale=scale)
    g = gates.unsqueeze(-1)
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win


def nsa_inputs(shape, dtype, device, generator, **options):
    from ..inputs import randn, softmax_inputs
    from ..inputs import sized_options

    options = {**sized_options(shape, {"block_size": 16, "top_n": 1, "window": 6}), **options}
    block_size = options.setdefault("block_size", 64)
    out = softmax_inputs(shape, dtype, device, generator, **options)
    B, T, H = shape.batch, shape.seq_q, shape.heads
    out["gates"] = torch.sigmoid(torch.randn((B, T, H, 3), generator=generator)).to(device=device, dtype=dtype)
    for name in ("w_k", "w_v"):
        out[name] = (1.0 / block_size + randn((block_size,), torch.float32, "cpu", generator, std=0.1)).to(
            device=device, dtype=dtype)
    return out


def _register() -> None:
    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="nsa", family="sparse", cite="Yuan et al. 2025 (survey Table 4, NSA)", fn=nsa, reference=nsa_reference,
        make_inputs=nsa_inputs,
        complexity=Complexity("O(N^2 d / l + N n l d + N w d)", "O(N)", 1.0, 1.0),
        state_or_cache=StateOrCache("2 Hkv d (1 + 1/l)", True, lambda s: 2 * s.Hkv * s.head_dim),
        options={"gates": None, "w_k": None, "w_v": None, "block_size": 64, "top_n": 4, "window": 512,
                 "selection": "token", "scale": None},
        supports=frozenset({"causal", "backward", "gqa"}), grad_inputs=("q", "k", "v", "gates", "w_k", "w_v"),
        approximates_softmax=True,
        description="compressed + top-n selected blocks + sliding window, learned gates (trainable)"))


_register()
