"""`ContextParallel`: run an existing layer (or attention function) context parallel over a process group.

Like torchtitan's parallelisms, this is applied from outside: the layer's code does not change. While
the wrapped layer runs, every `effattn.attention(...)` call it makes is routed to ring or Ulysses
attention over `group`; everything else in the layer (projections, norms, MLPs) is token-wise and simply
runs on this rank's shard. Layers that use positions (rotary embeddings) must be given the global
positions of the shard: `local_positions(N, group, zigzag=...)`.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..api import DEFAULT_METHOD, ROUTE, attention
from ..registry import REGISTRY
from ..validate import check_choice
from .ring import ring_attention
from .ulysses import ulysses_attention

_RING_OPTIONS = ("causal", "scale", "return_lse")


class ContextParallel(nn.Module):
    """Wrap `layer` (an nn.Module that calls `effattn.attention`, or an attention function
    `fn(q, k, v, **options)`) so that it runs on sequence shards `[B, N / W, ...]` over `group`.

    mode "ring": exact softmax methods (standard, mha, gqa, mqa, hardware kernels) with options causal,
    scale, return_lse; K/V circulate (ring_attention). mode "ulysses": any registered method, heads are
    re-sharded by all-to-all (ulysses_attention). `zigzag`: the shards were cut in zigzag order (what
    causal ring attention wants; `shard(x, group, zigzag=True)`); `backend`: the ring's local attention.
    Inputs and outputs are this rank's shard; parameters are the wrapped layer's own (replicate them).
    """

    def __init__(self, layer: nn.Module | Callable, group=None, *, mode: str = "ring", zigzag: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        check_choice("mode", mode, ("ring", "ulysses"))
        if not callable(layer):
            raise TypeError(f"layer must be an nn.Module or a callable attention function, got {type(layer).__name__}")
        self.layer = layer if isinstance(layer, nn.Module) else None
        self.fn = None if isinstance(layer, nn.Module) else layer
        self.group, self.mode, self.zigzag, self.backend = group, mode, bool(zigzag), backend

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, zigzag={self.zigzag}, backend={self.backend!r}"

    def _parallel(self, q, k, v, method, options: dict[str, Any]):
        """One attention call of the wrapped layer, run over the group."""
        if self.mode == "ulysses":
            return ulysses_attention(q, k, v, group=self.group, method=method or DEFAULT_METHOD,
                                     zigzag=self.zigzag, **options)
        name = method or DEFAULT_METHOD
        record = REGISTRY.get(name) if isinstance(name, str) else None
        if record is None or record.approximates_softmax or record.family in ("sparse", "linear"):
            raise ValueError(f"mode='ring' runs exact full softmax attention, got method {name!r}; "
                             "use mode='ulysses' for other methods")
        for key, value in options.items():
            if key not in _RING_OPTIONS and value is not None and value is not False:
                raise ValueError(f"mode='ring' takes only the options {_RING_OPTIONS}, got {key}={value!r} "
                                 f"for method {name!r}; use mode='ulysses' for it")
        kept = {key: value for key, value in options.items() if key in _RING_OPTIONS}
        return ring_attention(q, k, v, group=self.group, zigzag=self.zigzag, backend=self.backend, **kept)

    def forward(self, *args: Any, **kwargs: Any):
        if self.fn is not None:
            registered = self.fn is attention or any(self.fn is m.fn for m in REGISTRY)
            if self.mode == "ulysses" and not registered:
                return ulysses_attention(*args, group=self.group, method=self.fn, zigzag=self.zigzag, **kwargs)
            if registered and self.fn is not attention:
                name = next(m.name for m in REGISTRY if self.fn is m.fn)
                return self._parallel(*args, name, kwargs)
        calls = []

        def route(q, k, v, method, options):
            calls.append(method)
            token = ROUTE.set(None)  # the local computation must not be routed again
            try:
                return self._parallel(q, k, v, method, dict(options))
            finally:
                ROUTE.reset(token)

        token = ROUTE.set(route)
        try:
            out = (self.layer if self.layer is not None else self.fn)(*args, **kwargs)
        finally:
            ROUTE.reset(token)
        if not calls:
            raise RuntimeError("the wrapped layer never called effattn.attention, so nothing ran context "
                               "parallel and its output would be that of the local shard alone")
        return out
