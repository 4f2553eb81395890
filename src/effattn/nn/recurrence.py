"""How the state-carrying layers run the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t (delta rule
optional): through the registered method of that name when the registry has it (its fast kernels), else
through the reference equations run chunk by chunk (the parallel form inside a chunk of C tokens, the
state passed between chunks; the decay as a `[B, H, C, C]` matrix for scalar gates, factorised into two
matmuls for vector gates), so memory stays O(B H C (C + Dk)) and the layers train on CPU before any
kernel exists.

The layers never call a kernel directly, so a faster registered op speeds every layer up without edits.
"""
from __future__ import annotations

import inspect

import torch

from ..reference import linear_parallel, linear_recurrent
from .._triton_mode import interpreting
from ..registry import REGISTRY

# Reference chunk length: the parallel form inside a chunk, the state passed between chunks.
CHUNK = 32
MAX_SPAN = 40.0  # largest in-chunk log decay the factorised vector-gate product takes (e^40 fits float32)


def _chunk_form(q, k, v, g, beta, *, delta_rule, scale, initial_state, output_final_state=True):
    """`linear_parallel` on one chunk without its `[B, H, C, C, Dk]` decay tensor. Scalar (or no) gate: the
    decay is a `[B, H, C, C]` matrix D_ij = exp(Gc_i - Gc_j), j <= i. Vector gate: the decayed product
    <x_i, y_j>_D = (x_i * exp(Gc_i - Gc_C)) . (y_j * exp(Gc_C - Gc_j)), two matmuls (the second factor is
    <= 1; the caller keeps the first finite). Same equations as the reference; returns (o, final state)."""
    B, C, H, Dk = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, C, *]
    if g is None:
        gc = q.new_zeros(B, H, C, 1)
    elif g.dim() == 3:
        gc = g.transpose(1, 2).cumsum(-1).unsqueeze(-1)  # [B, H, C, 1]
    else:
        gc = g.transpose(1, 2).cumsum(2)  # [B, H, C, Dk]
    last = gc[:, :, -1:]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if gc.shape[-1] == 1:
        decay = torch.exp((gc - gc.transpose(-1, -2)).masked_fill(~causal, -float("inf")))
        scores = lambda x, y: (x @ y.transpose(-1, -2)) * decay  # noqa: E731
    else:
        up, down = torch.exp(gc - last), torch.exp(last - gc)
        scores = lambda x, y: ((x * up) @ (y * down).transpose(-1, -2)).masked_fill(~causal, 0.0)  # noqa: E731
    b = None if beta is None else beta.transpose(1, 2).unsqueeze(-1)  # [B, H, C, 1]
    S0 = initial_state
    if delta_rule:
        rhs = vh if S0 is None else vh - (kh * gc.exp()) @ S0
        ones = torch.ones_like(vh[..., :1]) if b is None else b
        system = torch.eye(C, dtype=q.dtype, device=q.device) + ones * scores(kh, kh).tril(-1)
        u = torch.linalg.solve_triangular(system, ones * rhs, upper=False, unitriangular=True)
    else:
        u = vh if b is None else b * vh
    o = scores(qh, kh) @ u
    if S0 is not None:
        o = o + (qh * gc.exp()) @ S0
    S = (kh * (last - gc).exp()).transpose(-1, -2) @ u  # S_C = exp(Gc_C) S_0 + sum_j exp(Gc_C - Gc_j) k_j^T u_j
    if S0 is not None:
        S = S + last.exp().transpose(-1, -2) * S0
    return (scale * o).transpose(1, 2), S


def _reference(q, k, v, g, beta, *, delta_rule, scale, initial_state):
    T, Dk = q.shape[1], q.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    if T == 1:
        return linear_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=True, delta_rule=delta_rule)
    state = None if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for s in range(0, T, CHUNK):
        piece = slice(s, min(s + CHUNK, T))
        g_c = None if g is None else g[:, piece]
        # A vector gate decaying more than e^-MAX_SPAN inside the chunk would overflow the factorised
        # product: that chunk takes the reference's explicit decay tensor instead.
        form = _chunk_form
        if g_c is not None and g_c.dim() == 4 and float(-g_c.detach().sum(1).min()) > MAX_SPAN:
            form = linear_parallel
        o, state = form(q[:, piece], k[:, piece], v[:, piece], g_c, None if beta is None else beta[:, piece],
                        scale=scale, initial_state=state, delta_rule=delta_rule, output_final_state=True)
        outs.append(o)
    return torch.cat(outs, dim=1), state


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
