"""Rotary position embeddings (RoPE, Su et al., 2021), shared by every layer that uses them.

Pairs of channels (i, i + d/2) of a head are rotated by angle pos * base^(-2i/d) ("rotate half" layout).
"""
from __future__ import annotations

import torch
from torch import nn


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape `[T, dim // 2]` (float32) for integer `positions` `[T]`."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x `[B, T, H, dim]` by cos/sin `[T, dim // 2]`; returns x's dtype, computed in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """`rope(x, offset)` rotates x `[B, T, H, dim]` as if its tokens sat at positions offset .. offset + T - 1."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim} [B, T, H, {self.dim}], got shape {tuple(x.shape)}")
        pos = torch.arange(offset, offset + x.shape[1], device=x.device)
        cos, sin = rotary_angles(pos, self.dim, self.base)
        return apply_rotary(x, cos, sin)
