"""Input factories of the sparse methods' registry records: options depend on the size (`inputs.is_small`;
a 512-token window or 64-token blocks would make the tests' tiny shapes dense or degenerate).
"""
from __future__ import annotations

from ..inputs import sized_options, softmax_inputs


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

