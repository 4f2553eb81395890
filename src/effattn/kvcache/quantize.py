"""Asymmetric integer quantization and bit packing for KV caches (KIVI, Liu et al. 2024; survey Table 4).

x ~= code * scale + zero with code in [0, 2^bits - 1], scale = (max - min) / (2^bits - 1), zero = min over
a group. Packing puts element i * (8 // bits) + j of the last dim into bits [j * bits, (j + 1) * bits) of
byte i, the layout the decode kernel unpacks.
"""
from __future__ import annotations

import torch

BITS = (2, 4, 8)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, x's shape) and scale, zero (float32, x's shape with `dim` reduced to 1)."""
    levels = 2 ** bits - 1
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = torch.round((xf - lo) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


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
