"""A layer's decoding cache: named, preallocated buffers that grow along the token axis.

Every compact layer stores a different thing per token (MHA/GQA: k and v heads; MLA: the latent c_kv and
the shared k_rope; MFA: one k and one v head; TPA: the factors A_K, B_K, A_V, B_V), so the cache is a set
of fields `name -> per-token shape`, each a buffer `[B, capacity, *shape]` allocated once (static shapes,
as gpt-fast does) and filled up to `length`. `nbytes` is what the cache actually holds in memory.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..validate import check_positive_int, check_tensor


class LayerCache:
    def __init__(self, fields: Mapping[str, tuple[int, ...]], batch: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        check_positive_int("batch", batch)
        check_positive_int("capacity", capacity)
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.buffers = {name: torch.zeros(batch, capacity, *dims, dtype=dtype, device=device)
                        for name, dims in fields.items()}

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write `new[name]` `[B, T, *dims]` at positions length .. length + T - 1 of every field (all fields
        at once); return views `[B, length, *dims]` of everything stored so far."""
        if set(new) != set(self.buffers):
            raise ValueError(f"append needs exactly the fields {sorted(self.buffers)}, got {sorted(new)}")
        T = None
        for name, t in new.items():
            buf = self.buffers[name]
            check_tensor(name, t, ndim=buf.dim(), layout=f"[B, T, {', '.join(map(str, buf.shape[2:]))}]")
            if t.shape[0] != self.batch or t.shape[2:] != buf.shape[2:]:
                raise ValueError(f"{name} must have shape [B={self.batch}, T, {', '.join(map(str, buf.shape[2:]))}], "
                                 f"got {tuple(t.shape)}")
            if T is not None and t.shape[1] != T:
                raise ValueError(f"all fields must append the same number of tokens, got {T} and {t.shape[1]} ({name})")
            T = t.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"cache overflow: holds {self.length} of {self.capacity} tokens, cannot append {T}")
        for name, t in new.items():
            self.buffers[name][:, self.length:self.length + T] = t
        self.length += T
        return self.view()

    def view(self) -> dict[str, torch.Tensor]:
        return {name: buf[:, :self.length] for name, buf in self.buffers.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (all `capacity` tokens, filled or not)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def bytes_per_token(self) -> int:
        return self.nbytes // (self.batch * self.capacity)

    def reset(self) -> None:
        self.length = 0


class CompactLayer(nn.Module):
    """Base of the compact attention layers: `forward(x, cache=None)` with x `[B, T, d_model]`.

    Without a cache the layer attends causally within x (training, or a one-shot forward). With a cache
    (from `new_cache`) the tokens of x sit at positions cache.length .. cache.length + T - 1: they are
    appended to the cache and attend to everything stored (prefill, then decode one token at a time).
    """

    d_model: int
    fields: dict[str, tuple[int, ...]]  # what one token stores: name -> shape (set by each subclass)

    def cache_fields(self) -> dict[str, tuple[int, ...]]:
        return dict(self.fields)

    def cache_elements_per_token(self) -> int:
        return sum(math.prod(dims) for dims in self.fields.values())

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> LayerCache:
        p = next(self.parameters())
        return LayerCache(self.cache_fields(), batch, capacity, dtype or p.dtype, device or p.device)

    def _check(self, x: torch.Tensor, cache: LayerCache | None) -> int:
        """Validate x and the cache; return the position offset of x's first token."""
        check_tensor("x", x, ndim=3, layout=f"[B, T, d_model={self.d_model}]")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model} ([B, T, d_model]), got {tuple(x.shape)}")
        if cache is None:
            return 0
        if not isinstance(cache, LayerCache):
            raise TypeError(f"cache must be a LayerCache from new_cache(), got {type(cache).__name__}")
        fields = {n: tuple(b.shape[2:]) for n, b in cache.buffers.items()}
        if fields != self.cache_fields():
            raise ValueError(f"cache holds fields {fields}, this layer needs {self.cache_fields()}")
        return cache.length
