"""Output allocation for kernels, with optional poisoning so tests catch elements a kernel never wrote.

Every kernel launcher allocates its outputs with `empty_output`; inside `poisoned_outputs()` they are
filled with NaN (or the integer minimum) instead of left uninitialised, so a missed tile fails loudly.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# A process-wide switch rather than a context variable: CUDA backward passes run on autograd's own
# threads, which would not see a context variable set by the test's thread.
_poison = {"on": False}


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    previous = _poison["on"]
    _poison["on"] = enabled
    try:
        yield
    finally:
        _poison["on"] = previous


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison["on"]:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


def empty_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty_output(t.shape, dtype or t.dtype, t.device)
