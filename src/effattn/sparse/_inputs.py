"""Input factories of the sparse methods' registry records.

The same `make_inputs` serves the tests (tiny odd shapes, where a method's real defaults, e.g. 64-token
blocks or a 512-token window, would make it dense or degenerate) and `effattn bench` (thousands of
tokens, where the tests' tiny options would be meaningless): options depend on the size.
"""
from __future__ import annotations

from ..inputs import softmax_inputs

SMALL = 256  # below this many tokens, the tests' options


def is_small(shape) -> bool:
    return max(shape.seq_q, shape.S) < SMALL


def sized_options(shape, small: dict, large: dict | None = None) -> dict:
    return dict(small if is_small(shape) else (large or {}))


def sparse_inputs(shape, dtype, device, generator, *, small: dict, large: dict | None = None, **options) -> dict:
    return softmax_inputs(shape, dtype, device, generator, **{**sized_options(shape, small, large), **options})


def grid_for(n: int, dims: int) -> tuple[int, ...]:
    """A near-cubic (or near-square) grid of exactly n cells in raster order."""
    if dims == 1:
        return (n,)
    first = max(d for d in range(1, int(round(n ** (1 / dims))) + 1) if n % d == 0)
    return (first,) + grid_for(n // first, dims - 1)


def fit_kernel(kernel, grid) -> tuple[int, ...]:
    return tuple(min(k, g) for k, g in zip(kernel, grid))

