"""Softmax attention written straight from its equation, O = softmax(scale * Q K^T + M) V.

Ground truth for every exact and sparse method: call it with float64 CPU tensors. It is plain PyTorch and
dtype-generic, so called in bf16/fp16 it is also the "plain PyTorch in the same dtype" baseline of the
2x error rule. It materialises the full [B, H, T, S] score matrix on purpose: readable, not efficient.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Mask = Union[torch.Tensor, MaskFn, None]


def mask_from_fn(mask_fn: MaskFn, B: int, H: int, T: int, S: int, device=None) -> torch.Tensor:
    """Evaluate a mask function `(b, h, q_idx, kv_idx) -> bool` on broadcast index grids: `[B, H, T, S]`."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    qi = torch.arange(T, device=device).view(1, 1, T, 1)
    ki = torch.arange(S, device=device).view(1, 1, 1, S)
    return torch.as_tensor(mask_fn(b, h, qi, ki), device=device).expand(B, H, T, S)


def visibility(B: int, H: int, T: int, S: int, *, causal: bool = False, window=None, mask: Mask = None,
               device=None) -> torch.Tensor:
    """Boolean `[B, H, T, S]`: True where query i may attend to key j.

    Causal and windows are bottom-right aligned: query i sits at key position i + S - T (flash-attn's rule).
    `window=(left, right)` keeps keys j with pos - left <= j <= pos + right.
    """
    pos = torch.arange(T, device=device).view(T, 1) + (S - T)
    j = torch.arange(S, device=device).view(1, S)
    keep = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= pos
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        keep &= (j >= pos - left) & (j <= pos + right)
    keep = keep.view(1, 1, T, S).expand(B, H, T, S)
    if mask is not None:
        m = mask_from_fn(mask, B, H, T, S, device) if callable(mask) else mask.to(device=device, dtype=torch.bool)
        keep = keep & m.expand(B, H, T, S)
    return keep


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale: float | None = None, mask: Mask = None, window=None, softcap: float | None = None,
                      return_lse: bool = False, **_ignored):
    """Exact softmax attention.

    q: `[B, T, H, D]`, k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]`, H % Hkv == 0 (query head h reads KV head
    h // (H // Hkv)). mask: bool tensor broadcastable to `[B, H, T, S]` (True = attend) or a mask function
    `(b, h, q_idx, kv_idx) -> bool`. softcap: scores -> softcap * tanh(scores / softcap) (Gemma 2).
    Rows with no visible key output 0 and have LSE = -inf.

    Returns o `[B, T, H, Dv]`, and with `return_lse` also the natural-log LSE `[B, H, T]` of the scaled
    (and capped) scores, in float32 (float64 for float64 inputs).
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    group = H // Hkv
    kh = k.repeat_interleave(group, dim=2)  # [B, S, H, D]
    vh = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kh) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = visibility(B, H, T, S, causal=causal, window=window, mask=mask, device=q.device)
    scores = scores.masked_fill(~keep, -math.inf)
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(stat_dtype), dim=-1)  # [B, H, T]
    probs = torch.exp(scores.to(stat_dtype) - lse.unsqueeze(-1)).nan_to_num(0.0).to(q.dtype)
    o = torch.einsum("bhts,bshd->bthd", probs, vh)
    return (o, lse) if return_lse else o
