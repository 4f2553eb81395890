"""DeepSpeed-Ulysses (Jacobs et al., 2023): trade sequence sharding for head sharding around attention.

One all-to-all turns this rank's `[B, N/W, H, D]` shard into `[B, N, H/W, D]` (the whole sequence for
H/W heads), any attention method runs unchanged on it, and one all-to-all turns the output back. The
result is exact whatever the method, because heads are independent; gradients flow back through the
all-to-alls (comm.all_to_all is an autograd Function whose backward is the inverse all-to-all).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..validate import check_qkv
from .comm import all_to_all, group_rank_size
from .sharding import contiguous_to_zigzag, zigzag_to_contiguous

# Options whose meaning depends on the global head index or on returning more than o.
_REFUSED = ("mask", "return_lse", "output_final_state")


def ulysses_attention(q, k, v, *, group=None, method: str | Callable = "standard", zigzag: bool = False,
                      **options: Any) -> torch.Tensor:
    """Attention of sequence-sharded q `[B, n, H, D]`, k `[B, n, Hkv, D]`, v `[B, n, Hkv, Dv]` (n = N / W).

    `method`: a registered method name, run through `effattn.attention(..., method=method, **options)`
    (e.g. `causal=True`), or a callable `fn(q, k, v, **options) -> o` applied to whole-sequence,
    head-sharded tensors. `zigzag=True` if the shards were cut in zigzag order (the order is restored
    around the method, so causal masks see the true positions). H and Hkv must divide by the world size W.
    Returns o `[B, n, H, Dv]`, this rank's rows. Communication: 4 all-to-alls of O(N H d / W) per rank
    (fwd), the same in bwd; compute is the method's on N tokens and H / W heads.
    """
    B, n, _, H, Hkv, _, _ = check_qkv(q, k, v, same_length=True)
    _, world = group_rank_size(group)
    if H % world or Hkv % world:
        raise ValueError(f"Ulysses shards heads: H={H} query heads and Hkv={Hkv} key/value heads must both "
                         f"divide by the world size {world}")
    refused = [name for name in _REFUSED if options.get(name) is not None and options.get(name) is not False]
    if refused:
        raise ValueError(f"ulysses_attention does not take {refused[0]!r}: it would see head-sharded, "
                         f"whole-sequence tensors (got {refused[0]}={type(options[refused[0]]).__name__})")
    if zigzag and n % 2:
        raise ValueError(f"zigzag shards hold two equal chunks, so the local length must be even, got n={n}")
    if callable(method):
        fn = method
    else:
        from ..api import attention
        from ..registry import REGISTRY
        REGISTRY.get(method)  # an unknown name raises here, before any communication

        def fn(q, k, v, **opts):
            return attention(q, k, v, method=method, **opts)

    # [B, n, H, D] -> [B, N, H / W, D]: scatter the heads, gather the sequence in rank order.
    qh, kh, vh = (all_to_all(x, 2, 1, group) for x in (q, k, v))
    if zigzag and world > 1:
        qh, kh, vh = (zigzag_to_contiguous(x, world) for x in (qh, kh, vh))
    o = fn(qh, kh, vh, **options)
    if not isinstance(o, torch.Tensor) or o.shape[:3] != qh.shape[:3]:
        raise TypeError(f"the attention method must return o [B, N, H/W, Dv] {tuple(qh.shape[:3])}, got "
                        f"{type(o).__name__} {tuple(getattr(o, 'shape', ()))}")
    if zigzag and world > 1:
        o = contiguous_to_zigzag(o, world)
    return all_to_all(o, 1, 2, group)
