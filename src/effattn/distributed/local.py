"""Local attention with its log-sum-exp: the building block every context-parallel schedule calls.

A ring step attends a rank's queries to one block of keys/values, so it needs (a) the block's output
together with its LSE, to merge blocks exactly, and (b) a backward that takes the *final* output and LSE
(not the block's): with P = exp(S - lse) and delta = rowsum(dO * O), the gradients of one block are

    dV = P^T dO,   dS = P * (dO V^T - delta),   dQ = scale * dS K,   dK = scale * dS^T Q

(flash-attention's backward, Dao 2023, Alg. 2), and summing them over blocks gives the exact gradient.

Backends, each a `LocalAttention(forward, backward)` pair with the signatures of `torch_forward` and
`torch_backward`:
- "torch": plain PyTorch, blockwise over queries, any float dtype and device; what CPU/gloo runs.
- "flash": the library's Triton FlashAttention-2 kernels (hardware/flash_fwd.py, flash_bwd.py), GQA
  without repeating K/V; CUDA (or CPU under TRITON_INTERPRET=1).
- "cudnn": PyTorch's cuDNN attention (`aten._scaled_dot_product_cudnn_attention` and its backward), the
  fastest exact kernel on the H100/H200 for fwd+bwd; same conditions and causal alignment as "sdpa".
- "sdpa": PyTorch's CUDA flash-attention kernel (`aten._scaled_dot_product_flash_attention` and its
  backward, which takes out and LSE), for fp16/bf16 on CUDA. Its causal mask is top-left aligned, so
  causal calls must be square (T == S), which the ring's diagonal steps are.
"auto" picks "flash" on CUDA where it applies, then "sdpa", then "torch". Nothing here knows about ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..validate import check_choice

_aten = torch.ops.aten  # a module global, so a test can put the CPU flash kernel behind the same calls

# Query rows per block of the torch backend: scores of one block are [B, Hkv, group, QUERY_BLOCK, S].
QUERY_BLOCK = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _grouped(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, Hkv, group, T, D]: query heads of a group share one K/V head (no K/V repeat)."""
    B, T, H, D = x.shape
    return x.view(B, T, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)


def _block_scores(qb, k, scale, causal, row0, T, S):
    """Scaled scores of query rows [row0, row0 + rows) against all S keys, masked bottom-right causal."""
    s = torch.einsum("bkgtd,bskd->bkgts", qb, k) * scale
    if causal:
        rows = torch.arange(row0, row0 + qb.shape[3], device=s.device).view(-1, 1) + (S - T)
        s = s.masked_fill(torch.arange(S, device=s.device).view(1, -1) > rows, -math.inf)
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Rows that see no key have lse = -inf: exp(-inf - -inf) is NaN, and their probabilities are 0.
    return torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)


def torch_forward(q, k, v, *, causal: bool = False, scale: float):
    """Blockwise softmax attention. q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`.

    Returns o `[B, T, H, Dv]` and lse `[B, H, T]`, both in float32 (float64 for float64 inputs); rows
    with no visible key get o = 0 and lse = -inf. Memory O(QUERY_BLOCK * S) per head, never T x S.
    """
    B, T, H, _ = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    acc = _acc_dtype(q.dtype)
    qg, kf, vf = _grouped(q, Hkv).to(acc), k.to(acc), v.to(acc)
    o = torch.empty(B, Hkv, H // Hkv, T, Dv, dtype=acc, device=q.device)
    lse = torch.empty(B, Hkv, H // Hkv, T, dtype=acc, device=q.device)
    for r0 in range(0, T, QUERY_BLOCK):
        s = _block_scores(qg[:, :, :, r0:r0 + QUERY_BLOCK], kf, scale, causal, r0, T, S)
        blk = torch.logsumexp(s, dim=-1)
        lse[:, :, :, r0:r0 + QUERY_BLOCK] = blk
        o[:, :, :, r0:r0 + QUERY_BLOCK] = torch.einsum("bkgts,bskd->bkgtd", _probs(s, blk), vf)
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, H, Dv), lse.reshape(B, H, T)


def torch_backward(do, q, k, v, o, lse, *, causal: bool = False, scale: float):
    """Gradients of one key/value block given the final o `[B, T, H, Dv]`, lse `[B, H, T]` and dO.

    Returns dq `[B, T, H, D]`, dk `[B, S, Hkv, D]`, dv `[B, S, Hkv, Dv]` in float32 (float64 for
    float64 inputs); dk/dv sum the query heads of each group.
    """
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    acc = _acc_dtype(q.dtype)
    qg, dog, og = (_grouped(x, Hkv).to(acc) for x in (q, do, o))
    kf, vf = k.to(acc), v.to(acc)
    lse = lse.to(acc).view(B, Hkv, H // Hkv, T)
    delta = (dog * og).sum(-1)  # rowsum(dO * O), [B, Hkv, g, T]
    dq = torch.empty_like(qg)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for r0 in range(0, T, QUERY_BLOCK):
        rows = slice(r0, r0 + QUERY_BLOCK)
        p = _probs(_block_scores(qg[:, :, :, rows], kf, scale, causal, r0, T, S), lse[:, :, :, rows])
        dv += torch.einsum("bkgts,bkgtd->bskd", p, dog[:, :, :, rows])
        ds = p * (torch.einsum("bkgtd,bskd->bkgts", dog[:, :, :, rows], vf) - delta[:, :, :, rows, None])
        dq[:, :, :, rows] = torch.einsum("bkgts,bskd->bkgtd", ds, kf) * scale
        dk += torch.einsum("bkgts,bkgtd->bskd", ds, qg[:, :, :, rows]) * scale
    return dq.permute(0, 3, 1, 2, 4).reshape(q.shape[:3] + (qg.shape[-1],)), dk, dv


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, H, S, D] for the CUDA kernel, which wants equal head counts. Local only:
    ring buffers always carry the Hkv heads."""
    x = x.transpose(1, 2)
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def sdpa_forward(q, k, v, *, causal: bool = False, scale: float):
    """PyTorch's CUDA flash kernel: o `[B, T, H, Dv]` in q's dtype and lse `[B, H, T]` float32."""
    group = q.shape[2] // k.shape[2]
    out = _aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), _expand_heads(k, group), _expand_heads(v, group), 0.0, causal, False, scale=scale)
    return out[0].transpose(1, 2), out[1]


def sdpa_backward(do, q, k, v, o, lse, *, causal: bool = False, scale: float):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    # The kernel's RNG state arguments are read only with dropout; take well-formed ones from a 1-token call.
    tiny = _aten._scaled_dot_product_flash_attention(
        q[:1, :1, :1].transpose(1, 2), q[:1, :1, :1].transpose(1, 2), q[:1, :1, :1].transpose(1, 2), 0.0, False,
        False)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        do.transpose(1, 2), q.transpose(1, 2), _expand_heads(k, group), _expand_heads(v, group),
        o.to(q.dtype).transpose(1, 2), lse.float().contiguous(), None, None, T, S, 0.0, causal,
        tiny[6], tiny[7], scale=scale)
    if group > 1:  # the kernel saw each K/V head repeated for its group: sum the group's gradients
        dk, dv = dk.unflatten(1, (Hkv, group)).sum(2), dv.unflatten(1, (Hkv, group)).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def cudnn_forward(q, k, v, *, causal: bool = False, scale: float):
    """PyTorch's cuDNN attention (the fastest SDPA backend on Hopper): o `[B, T, H, Dv]`, lse `[B, H, T]`."""
    group = q.shape[2] // k.shape[2]
    out = _aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), _expand_heads(k, group), _expand_heads(v, group), None, True, 0.0, causal, False,
        scale=scale)
    B, T, H = q.shape[:3]
    return out[0].transpose(1, 2), out[1].reshape(B, H, T)  # cuDNN keeps a trailing 1 on the LSE


def cudnn_backward(do, q, k, v, o, lse, *, causal: bool = False, scale: float):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    empty = q.new_empty(0)  # the philox state, read only with dropout
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        do.contiguous().transpose(1, 2), q.transpose(1, 2), _expand_heads(k, group), _expand_heads(v, group),
        # cuDNN wants dO laid out like O: both dense [B, T, H, Dv]. No bias; undefined sequence offsets, since
        # defined ones (even empty) select cuDNN's nested-tensor path.
        o.to(q.dtype).contiguous().transpose(1, 2), lse.float().contiguous().unsqueeze(-1), empty, empty, None,
        None, None,
        T, S, 0.0, causal, scale=scale)
    if group > 1:
        dk, dv = dk.unflatten(1, (Hkv, group)).sum(2), dv.unflatten(1, (Hkv, group)).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_NO_MASK = dict(window=None, sinks=0, softcap=None, cu_seqlens=None, max_seqlen=None, sparse=None)


def flash_forward(q, k, v, *, causal: bool = False, scale: float):
    """The Triton flash forward: o `[B, T, H, Dv]` in q's dtype, lse `[B, H, T]` float32."""
    from ..hardware.flash_fwd import flash_fwd
    return flash_fwd(q, k, v, scale=scale, causal=causal, **_NO_MASK)


def flash_backward(do, q, k, v, o, lse, *, causal: bool = False, scale: float):
    """The Triton flash backward from the given (final) o and lse; dq/dk/dv in the inputs' dtypes."""
    from ..hardware.flash_bwd import flash_bwd
    # flash_bwd reads lse as a dense [B, H, T] (a slice of the ring's lse along T gives wrong gradients).
    return flash_bwd(do, None, q, k, v, o.to(q.dtype), lse.contiguous(), scale=scale, causal=causal, **_NO_MASK)


@dataclass(frozen=True)
class LocalAttention:
    """forward(q, k, v, *, causal, scale) -> (o, lse); backward(do, q, k, v, o, lse, *, causal, scale)
    -> (dq, dk, dv). Outputs may be in any float dtype: callers accumulate in float32."""

    name: str
    forward: Callable
    backward: Callable


BACKENDS = {
    "torch": LocalAttention("torch", torch_forward, torch_backward),
    "flash": LocalAttention("flash", flash_forward, flash_backward),
    "sdpa": LocalAttention("sdpa", sdpa_forward, sdpa_backward),
    "cudnn": LocalAttention("cudnn", cudnn_forward, cudnn_backward),
}


def sdpa_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    D, Dv = q.shape[-1], v.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D == Dv and D % 8 == 0 and D <= 256)


def flash_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    from .._triton_mode import can_run_triton
    from ..hardware.flash import DTYPES, HEAD_DIMS
    return can_run_triton(q) and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS


def local_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> LocalAttention:
    """The backend named `backend` ("auto", "torch", "flash", "sdpa" or "cudnn") for these inputs."""
    check_choice("backend", backend, ("auto", *BACKENDS))
    if backend == "auto":
        backend = ("flash" if q.is_cuda and flash_applies(q, v) else "sdpa" if sdpa_applies(q, v) else "torch")
    elif backend == "flash" and not flash_applies(q, v):
        from ..hardware.flash import DTYPES, HEAD_DIMS
        raise ValueError(f"backend='flash' needs Triton-capable tensors (CUDA, or CPU under TRITON_INTERPRET=1) "
                         f"of dtype in {DTYPES} with D and Dv in {HEAD_DIMS}, got q {q.dtype} on {q.device} "
                         f"with D={q.shape[-1]}, Dv={v.shape[-1]}")
    elif backend in ("sdpa", "cudnn") and not sdpa_applies(q, v):
        raise ValueError(f"backend={backend!r} needs CUDA fp16/bf16 tensors with D == Dv, D % 8 == 0 and D <= 256, "
                         f"got q {q.dtype} on {q.device} with D={q.shape[-1]}, Dv={v.shape[-1]}")
    return BACKENDS[backend]


def merge_into(o_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """In place: (o_acc, lse_acc) <- the exact softmax merge of two partials over disjoint key sets.

    o `[B, T, H, Dv]`, lse `[B, H, T]`: lse' = log(e^lse_acc + e^lse), o' = sum_i e^(lse_i - lse') o_i.
    """
    new = torch.logaddexp(lse_acc, lse)
    w_acc = torch.exp(lse_acc - new).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse.to(new.dtype) - new).nan_to_num(0.0).transpose(1, 2).unsqueeze(-1)
    o_acc.mul_(w_acc).add_(o.to(o_acc.dtype) * w_new)
    lse_acc.copy_(new)
