"""Building blocks shared by the layers: RMSNorm, the short causal convolution, head reshapes, checks.

Every layer follows one decoding contract: `step(x, cache) -> (y, cache)` continues the sequence held in
`cache` (None = empty) by the tokens of x, `[B, D]` (one token) or `[B, T, D]` (a chunk, e.g. a prompt),
so that `forward(x) == step(x, None)[0]` and feeding x token by token gives the same outputs. A cache is a
plain dict of tensors plus an integer `"offset"` (tokens seen so far); step never mutates its input cache.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import check_positive_int, check_tensor

Cache = Optional[dict]


def check_layer_input(x, dim: int, *, allow_token: bool = False) -> torch.Tensor:
    """x `[B, T, dim]` (or `[B, dim]` when `allow_token`), floating point, T >= 1."""
    check_tensor("x", x, layout=f"[B, T, {dim}]")
    ok_rank = x.dim() == 3 or (allow_token and x.dim() == 2)
    if not ok_rank or x.shape[-1] != dim or not x.is_floating_point():
        want = f"[B, T, {dim}]" + (f" or [B, {dim}]" if allow_token else "")
        raise ValueError(f"x must be a floating tensor {want}, got shape {tuple(x.shape)}, dtype {x.dtype}")
    if x.dim() == 3 and x.shape[1] == 0:
        raise ValueError("x must hold at least one token, got T=0")
    return x


def as_chunk(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, bool]:
    """(x as `[B, T, dim]`, whether it came as one token `[B, dim]`) after validating it."""
    check_layer_input(x, dim, allow_token=True)
    return (x.unsqueeze(1), True) if x.dim() == 2 else (x, False)


def check_cache(cache, keys: tuple[str, ...], batch: int) -> None:
    if cache is None:
        return
    if not isinstance(cache, dict) or "offset" not in cache:
        raise TypeError(f"cache must be None or a dict returned by step(), got {type(cache).__name__}")
    for key in keys:
        t = cache.get(key)
        if isinstance(t, torch.Tensor) and t.shape[0] != batch:
            raise ValueError(f"cache[{key!r}] holds batch {t.shape[0]}, but x has batch {batch}")


def layer_dims(dim: int, heads: int, head_dim: int | None) -> int:
    """Validate (dim, heads, head_dim) and return head_dim (default dim // heads)."""
    check_positive_int("dim", dim)
    check_positive_int("heads", heads)
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads} (or pass head_dim)")
        head_dim = dim // heads
    return check_positive_int("head_dim", head_dim)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, T, H * d]` -> `[B, T, H, d]`."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time of width `kernel_size` (H3/Mamba/DeltaNet), optional SiLU.

    `forward(x, cache)` with x `[B, T, C]` returns (y, new_cache); cache holds the last kernel_size - 1
    inputs `[B, K - 1, C]` (zeros before the sequence starts), so chunks continue seamlessly.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True) -> None:
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        self.kernel_size, self.activation = kernel_size, activation
        self.weight = nn.Parameter(torch.randn(channels, kernel_size) * kernel_size ** -0.5)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.kernel_size - 1, C)
        full = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, K - 1 + T, C]
        y = F.conv1d(full.transpose(1, 2), self.weight.unsqueeze(1), self.bias, groups=C).transpose(1, 2)
        new_cache = full[:, full.shape[1] - (self.kernel_size - 1):]
        return (F.silu(y) if self.activation else y), new_cache


class SwiGLU(nn.Module):
    """The MLP of a block: W2 (silu(W1 x) * W3 x) (Shazeer, 2020)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class CachedLayer(nn.Module):
    """Base of every token mixer: subclasses implement `_run(x, cache) -> (y, new_cache)` for a chunk
    x `[B, T, dim]`; this class gives them `forward` and `step` with one validation and offset rule."""

    dim: int
    cache_keys: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, T, dim]` -> `[B, T, dim]`, causal (training)."""
        check_layer_input(x, self.dim)
        return self._run(x, None)[0]

    def step(self, x: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Continue the sequence in `cache` (None: empty) by x `[B, dim]` or `[B, T, dim]`; returns
        (y shaped like x, new cache). Agrees with `forward` on the concatenated sequence."""
        x3, single = as_chunk(x, self.dim)
        check_cache(cache, self.cache_keys, x3.shape[0])
        y, new = self._run(x3, cache)
        new["offset"] = (0 if cache is None else cache["offset"]) + x3.shape[1]
        return (y[:, 0] if single else y), new
