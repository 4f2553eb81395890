"""How the state-carrying layers run the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t (delta rule
optional): through the registered method of that name when the registry has it (its fast kernels), else
through the reference equations run chunk by chunk (the parallel form inside a chunk of C tokens, the
state passed between chunks; for scalar gates with a `[B, H, C, C]` decay matrix), so memory stays
O(B H C^2) and the layers train on CPU before any kernel exists.

The layers never call a kernel directly, so a faster registered op speeds every layer up without edits.
"""
from __future__ import annotations

import inspect

import torch

from ..reference import linear_parallel, linear_recurrent
from ..registry import REGISTRY

# Reference chunk length: the parallel form inside a chunk, the state passed between chunks.
CHUNK = 64


def _scalar_gate_chunk(q, k, v, g, beta, *, delta_rule, scale, initial_state, output_final_state=True):
    """`linear_parallel` for a scalar (or no) gate, with the decay as a `[B, H, C, C]` matrix instead of
    `[B, H, C, C, Dk]`: D_ij = exp(Gc_i - Gc_j) for j <= i (same equations, Dk times less work).
    Always returns (o, final state)."""
    B, C, H, Dk = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, C, *]
    gc = torch.zeros(B, H, C, dtype=q.dtype, device=q.device) if g is None else g.transpose(1, 2).cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((gc.unsqueeze(-1) - gc.unsqueeze(-2)).masked_fill(~causal, -float("inf")))
    b = None if beta is None else beta.transpose(1, 2).unsqueeze(-1)  # [B, H, C, 1]
    S0 = initial_state
    if delta_rule:
        rhs = vh if S0 is None else vh - (kh * gc.exp().unsqueeze(-1)) @ S0
        system = torch.eye(C, dtype=q.dtype, device=q.device) + b * ((kh @ kh.transpose(-1, -2)) * decay).tril(-1)
        u = torch.linalg.solve_triangular(system, b * rhs, upper=False, unitriangular=True)
    else:
        u = vh if b is None else b * vh
    o = ((qh @ kh.transpose(-1, -2)) * decay) @ u
    if S0 is not None:
        o = o + (qh * gc.exp().unsqueeze(-1)) @ S0
    last = gc[..., -1:]  # S_C = exp(Gc_C) S_0 + sum_j exp(Gc_C - Gc_j) k_j^T u_j
    S = (kh * (last - gc).exp().unsqueeze(-1)).transpose(-1, -2) @ u
    if S0 is not None:
        S = S + last.exp().unsqueeze(-1) * S0
    return (scale * o).transpose(1, 2), S


def _reference(q, k, v, g, beta, *, delta_rule, scale, initial_state):
    T, Dk = q.shape[1], q.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    if T == 1:
        return linear_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=True, delta_rule=delta_rule)
    chunk_form = linear_parallel if g is not None and g.dim() == 4 else _scalar_gate_chunk
    state = None if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for s in range(0, T, CHUNK):
        piece = slice(s, min(s + CHUNK, T))
        o, state = chunk_form(q[:, piece], k[:, piece], v[:, piece], None if g is None else g[:, piece],
                              None if beta is None else beta[:, piece], scale=scale, initial_state=state,
                              delta_rule=delta_rule, output_final_state=True)
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
