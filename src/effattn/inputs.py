"""Random input factories shared by method records, `effattn check`, tests and the benchmark.

Inputs are drawn on the CPU from a seeded generator and then moved, so the same seed gives the same
numbers on every device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Shape


# One `make_inputs` serves the tests (tiny odd shapes, where a method's real defaults, e.g. 64-token chunks or
# blocks, would leave a single chunk or make it dense) and `effattn bench` (thousands of tokens, where the tests'
# tiny options would measure something no one runs): below SMALL tokens, the tests' options.
SMALL = 256


def is_small(shape: Shape) -> bool:
    return max(shape.seq_q, shape.S) < SMALL


def sized_options(shape: Shape, small: dict, large: dict | None = None) -> dict:
    return dict(small if is_small(shape) else (large or {}))


def with_test_options(make, small: dict, shape: Shape, dtype, device, generator, **options) -> dict:
    """`make(shape, ...)` with the options `small` added at test sizes only: bind it as
    `partial(with_test_options, make, {"chunk_size": 16})` (a partial, so a record stays picklable)."""
    return make(shape, dtype, device, generator, **{**sized_options(shape, small), **options})


def randn(shape, dtype, device, generator: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(device=device, dtype=dtype)


def softmax_inputs(shape: Shape, dtype, device, generator, **options) -> dict:
    """q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` plus the given options."""
    B, T, H, D = shape.batch, shape.seq_q, shape.heads, shape.head_dim
    return {
        "q": randn((B, T, H, D), dtype, device, generator),
        "k": randn((B, shape.S, shape.Hkv, D), dtype, device, generator),
        "v": randn((B, shape.S, shape.Hkv, shape.Dv), dtype, device, generator),
        **options,
    }


def log_gate(shape, dtype, device, generator, strength: float = 1.0) -> torch.Tensor:
    """Log-space forget gate g = strength * logsigmoid(x) <= 0 (FLA convention), x ~ N(2, 1) so most
    gates are mild and some are strong."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32) + 2.0
    return (strength * F.logsigmoid(x)).to(device=device, dtype=dtype)


def linear_inputs(shape: Shape, dtype, device, generator, *, gate: str | None = None, beta: bool = False,
                  delta_rule: bool = False, initial_state: bool = True, state_cols_extra: int = 0,
                  normalize_qk: bool = False, **options) -> dict:
    """Inputs of the gated recurrence: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`; g `[B, T, H]` (scalar gate)
    or `[B, T, H, Dk]` (vector gate); beta `[B, T, H]` in (0, 1); initial_state `[B, H, Dk, Dv]`.

    `normalize_qk` L2-normalises q and k per head (what delta-rule methods require for stability)."""
    B, T, H, Dk, Dv = shape.batch, shape.seq_q, shape.heads, shape.head_dim, shape.Dv
    q = randn((B, T, H, Dk), torch.float32, "cpu", generator)
    k = randn((B, T, H, Dk), torch.float32, "cpu", generator)
    if normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    out = {"q": q.to(device=device, dtype=dtype), "k": k.to(device=device, dtype=dtype),
           "v": randn((B, T, H, Dv), dtype, device, generator)}
    if gate == "scalar":
        out["g"] = log_gate((B, T, H), dtype, device, generator)
    elif gate == "vector":
        out["g"] = log_gate((B, T, H, Dk), dtype, device, generator)
    elif gate is not None:
        raise ValueError(f"gate must be None, 'scalar' or 'vector', got {gate!r}")
    if beta:
        out["beta"] = torch.sigmoid(torch.randn((B, T, H), generator=generator)).to(device=device, dtype=dtype)
    if initial_state:
        out["initial_state"] = randn((B, H, Dk, Dv + state_cols_extra), torch.float32, device, generator, std=0.5)
    if delta_rule:
        out["delta_rule"] = True
    out.update(options)
    return out
