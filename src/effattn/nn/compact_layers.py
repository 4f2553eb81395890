"""The compact class's own layers (MLA, MFA, TPA; `effattn.compact.build_layer`) behind the layers' step
contract. Their caches are preallocated `LayerCache`s filled in place; here each step copies what was
stored into a fresh one (O(S) per step, like the attention it feeds), so a cache passed to `step` is never
changed and `forward` / `step` agree as for every other layer."""
from __future__ import annotations

from ..registry import Shape
from .common import CachedLayer, layer_dims

PREFIX = "field:"  # cache entries holding one per-token field of the compact layer's cache


class CompactMixer(CachedLayer):
    """`CompactMixer("mla", dim, heads)`: the compact layer of that name at head_dim (default dim // heads);
    kwargs go to `build_layer` (rope, rope_base)."""

    def __init__(self, name: str, dim: int, heads: int, *, head_dim: int | None = None, **kwargs) -> None:
        from ..compact.build import build_layer

        super().__init__()
        self.dim, self.heads, self.name = dim, heads, name
        self.layer = build_layer(name, Shape(heads=heads, head_dim=layer_dims(dim, heads, head_dim)), dim,
                                 causal=True, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def _run(self, x, cache):
        stored = {} if cache is None else {k[len(PREFIX):]: v for k, v in cache.items() if k.startswith(PREFIX)}
        length = next(iter(stored.values())).shape[1] if stored else 0
        layer_cache = self.layer.new_cache(x.shape[0], length + x.shape[1], dtype=x.dtype, device=x.device)
        if stored:
            layer_cache.append(**stored)
        y = self.layer(x, layer_cache)
        return y, {PREFIX + k: v for k, v in layer_cache.view().items()}
