"""How the state-carrying layers run the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t (delta rule
optional): through the registered method of that name when the registry has it (its fast kernels), else
through the float64-grade reference forms, chunked so memory stays O(B H C^2 Dk) for chunk size C.

The layers never call a kernel directly, so a faster registered op speeds every layer up without edits.
"""
from __future__ import annotations

import inspect

import torch

from ..reference import linear_parallel, linear_recurrent
from ..registry import REGISTRY

# Reference chunk length: the parallel form inside a chunk, the state passed between chunks.
CHUNK = 64


def _reference(q, k, v, g, beta, *, delta_rule, scale, initial_state):
    T = q.shape[1]
    if T == 1:
        return linear_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=True, delta_rule=delta_rule)
    state, outs = initial_state, []
    for s in range(0, T, CHUNK):
        piece = slice(s, min(s + CHUNK, T))
        o, state = linear_parallel(q[:, piece], k[:, piece], v[:, piece],
                                   None if g is None else g[:, piece], None if beta is None else beta[:, piece],
                                   scale=scale, initial_state=state, output_final_state=True,
                                   delta_rule=delta_rule)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def _usable(op: str | None, tensors: tuple[str, ...]) -> bool:
    """The registered op exists, trains, and takes FLA's keyword arguments we pass."""
    if op is None or op not in REGISTRY or not REGISTRY.get(op).trains:
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
    registered and trainable, otherwise the reference forms run.
    """
    extra = {name: t.contiguous() for name, t in (("g", g), ("beta", beta)) if t is not None}
    if _usable(op, tuple(extra)):
        return REGISTRY.get(op).fn(q.contiguous(), k.contiguous(), v.contiguous(), **extra, scale=scale,
                                   initial_state=initial_state, output_final_state=True)
    return _reference(q, k, v, g, beta, delta_rule=delta_rule, scale=scale, initial_state=initial_state)
