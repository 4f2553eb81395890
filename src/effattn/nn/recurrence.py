"""How the state-carrying layers run the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t (delta rule
optional): through the registered method of that name when the registry has it (its fast kernels), else
through the linear engine's plain-PyTorch chunkwise form (the parallel form inside a chunk of C tokens,
the state passed between chunks), so the layers train on CPU, where Triton only has its slow interpreter.

The layers never call a kernel directly, so a faster registered op speeds every layer up without edits.
"""
from __future__ import annotations

import inspect

import torch

from ..linear.chunk_torch import chunk_form
from .._triton_mode import interpreting
from ..registry import REGISTRY

# Chunk length of the PyTorch fallback: the parallel form inside a chunk, the state passed between chunks.
CHUNK = 32


def _reference(q, k, v, g, beta, *, delta_rule, scale, initial_state):
    """The engine's plain-PyTorch chunkwise form (effattn.linear.chunk_torch): memory O(B H C (C + Dk))."""
    return chunk_form(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True,
                      delta_rule=delta_rule, chunk_size=CHUNK)



def _usable(op: str | None, tensors: tuple[str, ...], q: torch.Tensor) -> bool:
    """The registered op exists, trains, takes FLA's keyword arguments we pass, and runs natively: on CPU
    under Triton's interpreter a kernel is orders of magnitude slower than the chunked reference."""
    if op is None or op not in REGISTRY or not REGISTRY.get(op).trains or (not q.is_cuda and interpreting()):
        return False
    try:
        params = inspect.signature(REGISTRY.get(op).fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in tensors + ("scale", "initial_state", "output_final_state"))


def gated_recurrence(q, k, v, g=None, beta=None, *, op: str | None = None, delta_rule: bool = False,
                     scale: float | None = None, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence from `initial_state` and return (o `[B, T, H, Dv]`, final state `[B, H, Dk, Dv]`).

    q, k: `[B, T, H, Dk]`, v: `[B, T, H, Dv]`, g: log gate `[B, T, H]` or `[B, T, H, Dk]`, beta: `[B, T, H]`.
    `op` names the registered method computing exactly this recurrence with FLA's signature
    (`fn(q, k, v, g=..., beta=..., scale=..., initial_state=..., output_final_state=True)`); it is used when
    registered, trainable and native (CUDA, or CPU without Triton's interpreter), otherwise the chunked
    reference runs.
    """
    extra = {name: t.contiguous() for name, t in (("g", g), ("beta", beta)) if t is not None}
    if _usable(op, tuple(extra), q):
        return REGISTRY.get(op).fn(q.contiguous(), k.contiguous(), v.contiguous(), **extra, scale=scale,
                                   initial_state=initial_state, output_final_state=True)
    return _reference(q, k, v, g, beta, delta_rule=delta_rule, scale=scale, initial_state=initial_state)
