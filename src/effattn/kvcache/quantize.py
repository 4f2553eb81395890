"""Asymmetric integer quantization and bit packing for KV caches (KIVI, Liu et al. 2024; survey Table 4).

x ~= code * scale + zero with code in [0, 2^bits - 1], scale = (max - min) / (2^bits - 1), zero = min over
a group. Packing puts element i * (8 // bits) + j of the last dim into bits [j * bits, (j + 1) * bits) of
byte i, the layout the decode kernel unpacks.
"""
from __future__ import annotations

import torch

BITS = (2, 4, 8)


def quantize(x: torch.Tensor, bits: int, dim: int, exclude: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, x's shape) and scale, zero (float32, x's shape with `dim` reduced to 1). Entries
    where `exclude` is True (sparse outliers stored apart) do not widen the range."""
    levels = 2 ** bits - 1
    xf = x.float()
    if exclude is None:
        lo = xf.amin(dim, keepdim=True)
        hi = xf.amax(dim, keepdim=True)
    else:
        lo = torch.where(exclude, torch.inf, xf).amin(dim, keepdim=True)
        hi = torch.where(exclude, -torch.inf, xf).amax(dim, keepdim=True)
        lo, hi = torch.where(torch.isinf(lo), 0.0, lo), torch.where(torch.isinf(hi), 0.0, hi)
        xf = xf.clamp(lo, hi)
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = torch.round((xf - lo) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def rotate(x: torch.Tensor, base: float, dtype) -> torch.Tensor:
    """RoPE ("rotate half", as effattn.nn.rotary) of x `[L, Hkv, D]` at positions 0 .. L-1, in `dtype`."""
    L, _, D = x.shape
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    angle = torch.arange(L, dtype=torch.float64, device=x.device)[:, None] * inv_freq  # [L, D/2]
    cos, sin = angle.cos().to(dtype)[:, None], angle.sin().to(dtype)[:, None]
    x1, x2 = x[..., :D // 2].to(dtype), x[..., D // 2:].to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return codes.to(dtype) * scale.to(dtype) + zero.to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes `[..., D]` -> bytes `[..., D * bits / 8]`."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """bytes `[..., D * bits / 8]` -> uint8 codes `[..., D]`."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return codes.flatten(-2)
