"""Context parallelism on torch.distributed: exact attention over a sequence sharded across ranks.

    ring_attention      K/V circulate around the ring (zigzag shards balance causal work), LSE merge
    ulysses_attention   all-to-all to head shards, any method on the whole sequence, all-to-all back
    shard / unshard     cut a sequence into this rank's part (contiguous or zigzag) and gather it back
    ContextParallel     wrap a layer or attention function to run over a process group

Works with NCCL on GPUs and gloo on CPU. Nothing in hardware/ knows about ranks: the local attention
(local.py) is a backend these schedules call.
"""
from .comm import all_to_all
from .local import BACKENDS, LocalAttention, local_backend, merge_into
from .ring import ring_attention
from .sharding import contiguous_to_zigzag, local_positions, shard, unshard, zigzag_to_contiguous
from .ulysses import ulysses_attention
from .wrapper import ContextParallel

__all__ = ["ring_attention", "ulysses_attention", "shard", "unshard", "local_positions", "ContextParallel",
           "all_to_all", "LocalAttention", "BACKENDS", "local_backend", "merge_into", "zigzag_to_contiguous",
           "contiguous_to_zigzag"]
