"""Feature maps phi(x) that kernelise attention: sim(q, k) = phi(q) . phi(k).

`elu_plus_one` (Katharopoulos et al., 2020) is a fused elementwise Triton kernel with its own backward;
on tensors Triton cannot run on it falls back to PyTorch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output_like
from ..hardware._flash_common import cdiv
from .._triton_mode import can_run_triton

_BLOCK = 1024


@triton.jit
def _elu_plus_one_fwd(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    y = tl.where(x > 0, x + 1.0, tl.exp(x))  # elu(x) + 1
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=live)


@triton.jit
def _elu_plus_one_bwd(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=live, other=0.0).to(tl.float32)
    dx = tl.where(x > 0, dy, dy * tl.exp(x))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=live)


def _launch(kernel, out: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    n = out.numel()
    kernel[(cdiv(n, _BLOCK),)](*tensors, out, n, BLOCK=_BLOCK)
    return out


class _EluPlusOne(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _launch(_elu_plus_one_fwd, empty_output_like(x), x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _launch(_elu_plus_one_bwd, empty_output_like(x), x, dy.contiguous())


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise, any shape; Triton-fused where Triton can run."""
    if can_run_triton(x) and x.dtype != torch.float64:
        return _EluPlusOne.apply(x)
    return torch.nn.functional.elu(x) + 1.0


def elu_plus_one_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(x) + 1.0


def normalized_linear_attn(fq, fk, v, form_fn, *, scale, normalize, eps, initial_state, output_final_state):
    """o_t = fq_t S_t / (fq_t z_t) on already feature-mapped fq, fk `[B, T, H, M]` with any form of the
    ungated recurrence (`form_fn`: the engine or a reference). v gets a column of ones so that the same state
    carries the normaliser z = sum fk (state `[B, H, M, Dv + 1]` when `normalize`); `scale` cancels then."""
    if normalize:
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    o, state = form_fn(fq, fk, v, scale=scale, initial_state=initial_state, output_final_state=True)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return (o, state) if output_final_state else o
