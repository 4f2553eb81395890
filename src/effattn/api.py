"""`effattn.attention`: one entry point for every registered method."""
from __future__ import annotations

import contextvars
from typing import Any

import torch

from .registry import REGISTRY
from .validate import check_options, check_tensor

DEFAULT_METHOD = "flash"
# Set by effattn.distributed.ContextParallel while a wrapped layer runs: a callable
# (q, k, v, method, options) that runs this call context parallel instead.
ROUTE: contextvars.ContextVar = contextvars.ContextVar("effattn_attention_route", default=None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str | None = None, **options: Any):
    """Attention of q `[B, T, H, D]` over k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` by a registered method.

    `options` are the method's keyword arguments (`effattn list` or `effattn.methods()` shows them); an
    unknown method or option raises with a "did you mean". Returns what the method returns: o
    `[B, T, H, Dv]`, or a tuple with the LSE / final state when asked for.
    """
    route = ROUTE.get()
    if route is not None:
        return route(q, k, v, method, options)
    record = REGISTRY.get(DEFAULT_METHOD if method is None else method)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    check_options(record.name, options, record.options)
    return record.fn(q, k, v, **options)
