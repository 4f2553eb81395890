"""FlashAttention-2 (Dao 2023; survey Sec. 3, hardware-efficient attention) and its sliding-window form.

`flash_attention` is exact softmax attention computed tile by tile with an online softmax: the [T, S]
score matrix never exists, memory is O(N d), and the backward recomputes P from the saved LSE. The same
kernels run causal and windowed masks arithmetically and block-sparse masks from index lists, which is
what the sparse methods build on (effattn.sparse.block_mask).
"""
from __future__ import annotations

import torch

from .._triton_mode import require_triton
from ..reference.softmax import softmax_attention
from ..validate import check_cu_seqlens, check_qkv, check_scale, check_softcap, normalize_window
from .flash_bwd import flash_bwd
from .flash_fwd import flash_fwd

HEAD_DIMS = (16, 32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OPTIONS = {"causal": False, "window": None, "sink_tokens": 0, "softcap": None, "scale": None,
           "block_mask": None, "cu_seqlens": None, "return_lse": False}


_FWD_OPTIONS = ("scale", "causal", "window", "sinks", "softcap", "cu_seqlens", "max_seqlen", "sparse")


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, sinks, softcap, cu_seqlens, max_seqlen, sparse):
        cfg = dict(scale=scale, causal=causal, window=window, sinks=sinks, softcap=softcap,
                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, sparse=sparse)
        o, lse = flash_fwd(q, k, v, **cfg)
        ctx.set_materialize_grads(False)  # an unused LSE output gets None, not a zero tensor, in backward
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = cfg
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do if do.stride(-1) == 1 else do.contiguous()
        dlse = None if dlse is None else dlse.float().contiguous()
        dq, dk, dv = flash_bwd(do, dlse, q, k, v, o, lse, **ctx.cfg)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_block_mask(block_mask, q, k) -> None:
    from ..sparse.block_mask import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an effattn.sparse.BlockMask (from effattn.sparse.block_mask), "
                        f"got {type(block_mask).__name__}")
    B, T, H = q.shape[:3]
    S = k.shape[1]
    if block_mask.T != T or block_mask.S != S or block_mask.B not in (1, B) or block_mask.H not in (1, H):
        raise ValueError(f"block_mask was built for B={block_mask.B}, H={block_mask.H}, T={block_mask.T}, "
                         f"S={block_mask.S}; the inputs have B={B}, H={H}, T={T}, S={S} (B and H may be 1)")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask must be on q's device {q.device}, got {block_mask.device}")


def flash_attention(q, k, v, *, causal=False, window=None, sink_tokens=0, softcap=None, scale=None,
                    block_mask=None, cu_seqlens=None, return_lse=False):
    """Exact softmax attention with the FlashAttention-2 algorithm (Triton forward and backward).

    q: `[B, T, H, D]`, k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]`, H % Hkv == 0 (GQA/MQA without repeating
    K/V), D and Dv in 16/32/64/96/128/256, fp16/bf16/fp32 on CUDA (or CPU under TRITON_INTERPRET=1).
    causal: bottom-right aligned when T != S. window: int w or (left, right); query i (at key position
    i + S - T) sees keys in [pos - left, pos + right]. sink_tokens (with a window): the first sink_tokens
    keys of each sequence stay visible whatever the window's left edge (StreamingLLM's attention sinks;
    still clipped by causal / right), computed as extra key tiles, no block mask.
    softcap: scores -> softcap * tanh(scores / softcap).
    block_mask: an `effattn.sparse.BlockMask` for `[B|1, H|1, T, S]`; only its visited blocks are computed
    (combined with causal/window if given). cu_seqlens: int32 `[num_seqs + 1]` offsets of packed
    sequences (B == 1, self-attention: q and k packed the same way).

    Returns o `[B, T, H, Dv]` in q's dtype, and with `return_lse` also the natural-log LSE `[B, H, T]`
    (float32). Rows that see no key give o = 0 and LSE = -inf. Time O(visited tiles * BLOCK^2 * d),
    memory O(N d).
    """
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v, dtypes=DTYPES)
    check_scale(scale)
    check_softcap(softcap)
    window = normalize_window(window, causal)
    sink_tokens = _check_sinks(sink_tokens, window)
    for name, d in (("q/k head dim D", D), ("v head dim Dv", Dv)):
        if d not in HEAD_DIMS:
            raise ValueError(f"flash_attention: unsupported {name}={d}; supported: {HEAD_DIMS}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    require_triton("flash_attention", q)
    max_seqlen = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, total_k=S)
        if S != T:
            raise ValueError(f"cu_seqlens packs q and k the same way, so they need the same length, got T={T}, S={S}")
        if block_mask is not None:
            raise ValueError("block_mask and cu_seqlens cannot be combined: express the documents in the mask")
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if block_mask is not None:
        _check_block_mask(block_mask, q, k)
    scale = D ** -0.5 if scale is None else float(scale)
    args = (_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), scale, causal, window,
            sink_tokens, float(softcap) if softcap else None, cu_seqlens, max_seqlen, block_mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse = _FlashAttention.apply(*args)
    else:  # inference: no autograd node to build
        o, lse = flash_fwd(*args[:3], **dict(zip(_FWD_OPTIONS, args[3:])))
    return (o, lse) if return_lse else o


def sliding_window_attention(q, k, v, *, window=1024, causal=True, softcap=None, scale=None, cu_seqlens=None,
                             return_lse=False):
    """Sliding-window (local) attention, Longformer / Mistral style: `flash_attention` with `window`
    (default 1024 keys to the left, causal). Shapes as `flash_attention`; time O(N w d)."""
    return flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale,
                           cu_seqlens=cu_seqlens, return_lse=return_lse)


def _check_sinks(sink_tokens, window) -> int:
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
    if sink_tokens and window is None:
        raise ValueError(f"sink_tokens={sink_tokens} needs a window: without one every key is visible already")
    return sink_tokens


def _window_sink_mask(T: int, S: int, window, sinks: int, device) -> torch.Tensor:
    """`[T, S]` bool: query i (at key position i + S - T) sees keys in [pos - left, pos + right], and the
    first `sinks` keys up to pos + right."""
    left, right = window
    pos = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    return ((j >= pos - left) | (j < sinks)) & (j <= pos + right)


def flash_reference(q, k, v, *, causal=False, window=None, sink_tokens=0, softcap=None, scale=None,
                    block_mask=None, cu_seqlens=None, return_lse=False, **_ignored):
    """Float64-able reference with flash_attention's signature: softmax_attention per packed sequence, with
    the block mask expanded to its elementwise mask (and attention sinks as an elementwise mask too)."""
    mask = None if block_mask is None else block_mask.to_dense().to(q.device)
    window = normalize_window(window, causal)
    cfg = dict(causal=causal, window=window, softcap=softcap, scale=scale)
    sinks = _check_sinks(sink_tokens, window)
    if sinks:  # causal and the window go into the elementwise mask, with the sinks
        cfg.update(causal=False, window=None)

    def with_sinks(T, S, mask):
        if not sinks:
            return mask
        sink_mask = _window_sink_mask(T, S, window, sinks, q.device)
        return sink_mask if mask is None else mask & sink_mask

    if cu_seqlens is None:
        return softmax_attention(q, k, v, mask=with_sinks(q.shape[1], k.shape[1], mask), return_lse=return_lse,
                                 **cfg)
    bounds = cu_seqlens.tolist()
    outs = [softmax_attention(q[:, a:b], k[:, a:b], v[:, a:b], mask=with_sinks(b - a, b - a, None),
                              return_lse=True, **cfg) for a, b in zip(bounds[:-1], bounds[1:])]
    o = torch.cat([x[0] for x in outs], dim=1)
    return (o, torch.cat([x[1] for x in outs], dim=2)) if return_lse else o


def _register() -> None:
    from dataclasses import replace
    from functools import partial

    from ..inputs import softmax_inputs
    from ..registry import KV_CACHE, Complexity, Method, Shape, register

    kv_cache = KV_CACHE
    supports = frozenset({"causal", "noncausal", "backward", "gqa", "varlen"})

    def window_inputs(shape: Shape, dtype, device, generator, **options):
        options = {"window": max(2, shape.S // 3), "causal": True, **options}
        return softmax_inputs(shape, dtype, device, generator, **options)

    register(Method(
        name="flash", family="hardware", cite="Dao 2023, FlashAttention-2 (survey Sec. 3.1, Table 2)",
        fn=flash_attention, reference=flash_reference, make_inputs=partial(softmax_inputs, causal=True),
        complexity=Complexity("O(N^2 d)", "O(N d)", 2.0, 1.0), state_or_cache=kv_cache, options=OPTIONS,
        supports=supports,
        description="tiled exact attention, online softmax, Triton fwd+bwd; causal/window/softcap/GQA/varlen/"
                    "block-sparse"))
    register(Method(
        name="flash_sliding_window", family="hardware",
        cite="Beltagy et al. 2020 Longformer / Jiang et al. 2023 Mistral (survey Sec. 4, local attention)",
        fn=sliding_window_attention, reference=flash_reference, make_inputs=window_inputs,
        complexity=Complexity("O(N w d)", "O(N d)", 1.0, 1.0),
        state_or_cache=replace(kv_cache, formula="2 Hkv d (last w tokens)"),
        options={k: v for k, v in {**OPTIONS, "window": 1024, "causal": True}.items() if k != "block_mask"},
        supports=supports, description="causal sliding window of w keys through the flash kernels, O(N w)"))


_register()
