"""`effattn.decode`: attention of a few new query tokens against a KV cache (FlashDecoding).

Works with every cache of `effattn.kvcache` (contiguous, paged, quantized, evicted): each describes itself
as `KVSegment`s that the one split-KV kernel family reads (see `decode_kernels.py`). The registered
method `flash_decoding` runs the same kernel with plain k/v tensors as the cache, so the registry-wide
tests and benchmark cover it.
"""
from __future__ import annotations

import torch

from .._triton_mode import require_triton
from ..validate import check_qkv, check_scale, check_tensor
from .decode_kernels import MAX_SPLITS, KVSegment, flash_decode

DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)


def _check_config(num_splits, block_n) -> None:
    for name, value in (("num_splits", num_splits), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    if num_splits is not None and num_splits > MAX_SPLITS:
        raise ValueError(f"num_splits must be <= {MAX_SPLITS}, got {num_splits}")
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")


def decode(q: torch.Tensor, cache, *, scale: float | None = None, causal: bool = True, return_lse: bool = False,
           seq_ids=None, num_splits: int | None = None, block_n: int | None = None):
    """Attention of q `[B, Tq, H, D]` (the newest Tq tokens, already appended to `cache`) over the cache.

    `cache`: a `ContiguousKVCache`, `PagedKVCache` (sequences `seq_ids`, default all live ones in order),
    `QuantizedKVCache` (dequantised inside the kernel) from `effattn.kvcache`. Sequences may have
    different lengths; causal alignment is bottom-right per sequence. GQA: H must be a multiple of the
    cache's Hkv, and each KV head is read once per group of query heads.

    Returns o `[B, Tq, H, Dv]` in q's dtype (and the natural-log LSE `[B, H, Tq]` float32 with
    `return_lse`). Time O(B H Tq L D), memory traffic: the cache once. Dao et al. 2023 (FlashDecoding).
    """
    check_tensor("q", q, ndim=4, dtypes=DECODE_DTYPES, layout="[B, Tq, H, D]")
    check_scale(scale)
    _check_config(num_splits, block_n)
    if not hasattr(cache, "segments"):
        raise TypeError(f"cache must be a KV cache of effattn.kvcache, got {type(cache).__name__}")
    B, Tq, H, D = q.shape
    lengths = cache.batch_lengths(seq_ids)
    if q.device != cache.device:
        raise ValueError(f"q and cache must be on the same device, got {q.device} and {cache.device}")
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if B != len(lengths):
        raise ValueError(f"q has batch size B={B} but the cache holds {len(lengths)} sequences")
    if D != cache.head_dim:
        raise ValueError(f"q must have head dim D={cache.head_dim} like the cache ([B, Tq, H, D]), got {D}")
    if cache.kv_heads == 0 or H % cache.kv_heads:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the cache's Hkv={cache.kv_heads}")
    if D not in HEAD_DIMS or cache.head_dim_v not in HEAD_DIMS:
        raise ValueError(f"decode supports head dims {HEAD_DIMS}, got D={D}, Dv={cache.head_dim_v}")
    if causal and Tq > min(lengths):
        raise ValueError(f"q has Tq={Tq} tokens but a sequence of the cache holds only {min(lengths)}: append "
                         f"the new tokens' keys and values to the cache before decoding")
    require_triton("decode", q)
    scale = D ** -0.5 if scale is None else float(scale)
    segments, totals = cache.segments(seq_ids)
    return flash_decode(q.contiguous(), segments, totals, scale=scale, causal=causal, return_lse=return_lse,
                        num_splits=num_splits, block_n=block_n)


OPTIONS = {"causal": True, "scale": None, "return_lse": False, "num_splits": None, "block_n": None}


def flash_decoding(q, k, v, *, causal=True, scale=None, return_lse=False, num_splits=None, block_n=None):
    """Split-KV decoding of q `[B, Tq, H, D]` over k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` (the whole
    tensors are the cache; Tq <= S when causal, aligned bottom-right). Returns o `[B, Tq, H, Dv]`."""
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v, dtypes=DECODE_DTYPES)
    check_scale(scale)
    _check_config(num_splits, block_n)
    if D not in HEAD_DIMS or Dv not in HEAD_DIMS:
        raise ValueError(f"flash_decoding supports head dims {HEAD_DIMS}, got D={D}, Dv={Dv}")
    if causal and T > S:
        raise ValueError(f"causal decoding needs Tq <= S (queries are the cache's newest tokens), got {T} > {S}")
    require_triton("flash_decoding", q)
    lengths = torch.full((B,), S, dtype=torch.int32, device=q.device)
    seg = KVSegment(k.contiguous(), v.contiguous(), lengths, torch.zeros_like(lengths), S)
    return flash_decode(q.contiguous(), [seg], lengths, scale=D ** -0.5 if scale is None else float(scale),
                        causal=causal, return_lse=return_lse, num_splits=num_splits, block_n=block_n)


def _register() -> None:
    from dataclasses import replace

    from ..inputs import softmax_inputs
    from ..reference import softmax_attention
    from ..registry import KV_CACHE, Complexity, Method, Shape, register

    def make_inputs(shape: Shape, dtype, device, generator, **options):
        # A few new tokens against a longer cache, GQA as the shape says.
        short = replace(shape, seq_q=1 + shape.seq_q % 3, seq_k=shape.S + 21)
        return softmax_inputs(short, dtype, device, generator, **{"causal": True, **options})

    register(Method(
        name="flash_decoding", family="hardware",
        cite="Dao et al. 2023, Flash-Decoding (survey Table 2, decoding)",
        fn=flash_decoding, reference=softmax_attention, make_inputs=make_inputs,
        complexity=Complexity("O(T S d)", "O(S d)", 1.0, 1.0),
        state_or_cache=KV_CACHE,
        options=OPTIONS, supports=frozenset({"causal", "noncausal", "gqa", "decode"}), grad_inputs=(),
        description="split-KV decoding: partial softmax per KV split + LSE merge, GQA groups in one tile"))


_register()
