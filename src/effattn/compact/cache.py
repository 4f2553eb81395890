"""A layer's decoding cache: named, preallocated buffers that grow along the token axis.

Every compact layer stores a different thing per token (MHA/GQA: k and v heads; MLA: the latent c_kv and
the shared k_rope; MFA: one k and one v head; TPA: the factors A_K, B_K, A_V, B_V), so the cache is a set
of fields `name -> per-token shape`, each a buffer `[B, capacity, *shape]` allocated once (static shapes,
as gpt-fast does) and filled up to `length`. `nbytes` is what the cache actually holds in memory.
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from ..validate import check_positive_int, check_tensor


class LayerCache:
    """Buffers for `fields` (name -> per-token shape) of `batch` sequences of up to `capacity` tokens.

    `heads_first=True` stores a field of per-token shape (h, *rest) as `[B, h, capacity, *rest]` (every head's
    tokens contiguous, as decode kernels read them) while `append` and `view` still speak `[B, T, h, *rest]`:
    attention then reads each head's keys without the copy a token-major layout costs a batched matmul.
    """

    def __init__(self, fields: Mapping[str, tuple[int, ...]], batch: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                 heads_first: bool = False) -> None:
        check_positive_int("batch", batch)
        check_positive_int("capacity", capacity)
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.fields = {name: tuple(dims) for name, dims in fields.items()}
        self.buffers, self._tokens = {}, {}
        for name, dims in self.fields.items():
            if heads_first and len(dims) >= 2:
                buf = torch.zeros(batch, dims[0], capacity, *dims[1:], dtype=dtype, device=device)
                self._tokens[name] = buf.movedim(2, 1)  # [B, capacity, h, *rest] view of the same memory
            else:
                buf = torch.zeros(batch, capacity, *dims, dtype=dtype, device=device)
                self._tokens[name] = buf
            self.buffers[name] = buf

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write `new[name]` `[B, T, *dims]` at positions length .. length + T - 1 of every field (all fields
        at once); return views `[B, length, *dims]` of everything stored so far."""
        if set(new) != set(self.fields):
            raise ValueError(f"append needs exactly the fields {sorted(self.fields)}, got {sorted(new)}")
        T = None
        for name, t in new.items():
            dims = self.fields[name]
            layout = f"[B={self.batch}, T, {', '.join(map(str, dims))}]"
            check_tensor(name, t, ndim=2 + len(dims), layout=layout)
            if t.shape[0] != self.batch or tuple(t.shape[2:]) != dims:
                raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
            if T is not None and t.shape[1] != T:
                raise ValueError(f"all fields must append the same number of tokens, got {T} and {t.shape[1]} ({name})")
            T = t.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"cache overflow: holds {self.length} of {self.capacity} tokens, cannot append {T}")
        for name, t in new.items():
            self._tokens[name][:, self.length:self.length + T] = t
        self.length += T
        return self.view()

    def view(self) -> dict[str, torch.Tensor]:
        """Everything stored so far, `[B, length, *dims]` per field (views, no copies)."""
        return {name: tok[:, :self.length] for name, tok in self._tokens.items()}

    def narrow_batch(self, n: int) -> "LayerCache":
        """A cache sharing this one's memory for its first n sequences (same length)."""
        out = copy.copy(self)
        out.batch = n
        out.buffers = {k: b[:n] for k, b in self.buffers.items()}
        out._tokens = {k: t[:n] for k, t in self._tokens.items()}
        return out

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
    heads_first: bool = False  # cache layout, see LayerCache

    def cache_fields(self) -> dict[str, tuple[int, ...]]:
        return dict(self.fields)

    def cache_elements_per_token(self) -> int:
        return sum(math.prod(dims) for dims in self.fields.values())

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None) -> LayerCache:
        p = next(self.parameters())
        return LayerCache(self.cache_fields(), batch, capacity, dtype or p.dtype, device or p.device,
                          heads_first=self.heads_first)

    def _check(self, x: torch.Tensor, cache: LayerCache | None) -> int:
        """Validate x and the cache; return the position offset of x's first token."""
        check_tensor("x", x, ndim=3, layout=f"[B, T, d_model={self.d_model}]")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model} ([B, T, d_model]), got {tuple(x.shape)}")
        if cache is None:
            return 0
        if not isinstance(cache, LayerCache):
            raise TypeError(f"cache must be a LayerCache from new_cache(), got {type(cache).__name__}")
        if cache.fields != self.cache_fields():
            raise ValueError(f"cache holds fields {cache.fields}, this layer needs {self.cache_fields()}")
        return cache.length


def kernel_decode(q: torch.Tensor, cache: LayerCache, k_name: str = "k", v_name: str = "v") -> torch.Tensor:
    """Causal attention of q `[B, T, H, D]` (its tokens already appended) over the cache's key and value
    fields, by the split-KV FlashDecoding kernel of `effattn.hardware` reading the cache buffers in place
    (strided: token-major or heads-first alike; a single-head field `[B, cap, D]` is MQA). Returns
    `[B, T, H, Dv]`. Dao et al. 2023 (Flash-Decoding)."""
    from .._triton_mode import require_triton
    from ..hardware.decode_api import DECODE_DTYPES, HEAD_DIMS
    from ..hardware.decode_kernels import KVSegment, flash_decode

    k, v = cache._tokens[k_name], cache._tokens[v_name]
    if k.dim() == 3:  # one shared head
        k, v = k.unsqueeze(2), v.unsqueeze(2)
    D, Dv = k.shape[-1], v.shape[-1]
    if q.dtype not in DECODE_DTYPES or D not in HEAD_DIMS or Dv not in HEAD_DIMS:
        raise ValueError(f"the decode kernel supports dtypes {DECODE_DTYPES} and head dims {HEAD_DIMS}, got "
                         f"{q.dtype}, D={D}, Dv={Dv}")
    require_triton("kernel_decode", q)
    lengths = torch.full((cache.batch,), cache.length, dtype=torch.int32, device=q.device)
    segment = KVSegment(k, v, lengths, torch.zeros_like(lengths), cache.length)
    return flash_decode(q.contiguous(), [segment], lengths, scale=D ** -0.5, causal=True)
