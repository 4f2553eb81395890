"""The survey's unified gated linear recurrence, written from its equations.

    S_t = G_t * S_{t-1} + beta_t k_t^T v_t                      (gates: none / scalar / vector)
    S_t = G_t * S_{t-1} + beta_t k_t^T (v_t - k_t (G_t * S_{t-1}))   (delta rule, optionally gated)
    o_t = scale * q_t S_t

State S: `[B, H, Dk, Dv]`. Gates live in log space (FLA's convention): `g <= 0`, `G_t = exp(g_t)`, either
`[B, T, H]` (one scalar per head, multiplying the whole state) or `[B, T, H, Dk]` (one per key channel,
multiplying the rows of S). `beta`: `[B, T, H]`, the write strength (delta rule: the learning rate).

Two forms, both plain PyTorch and dtype-generic (float64 on CPU is the ground truth):
- `recurrent_form`: token by token, exactly the equations above.
- `parallel_form`: the masked quadratic form. With cumulative log gates Gc_t = sum_{m<=t} g_m, the decayed
  product <x_i, y_j>_D = sum_d x_id y_jd exp(Gc_id - Gc_jd). Without delta rule u_j = beta_j v_j; with it
  the u_j solve the unit lower-triangular system
      u_t + beta_t sum_{j<t} <k_t, k_j>_D u_j = beta_t (v_t - (k_t * exp(Gc_t)) S_0),
  and o_t = scale * [(q_t * exp(Gc_t)) S_0 + sum_{j<=t} <q_t, k_j>_D u_j].
"""
from __future__ import annotations

import torch


def _gate_kind(g: torch.Tensor | None, q: torch.Tensor) -> str:
    if g is None:
        return "none"
    return "scalar" if g.dim() == 3 else "vector"


def _expand_gate(g: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Log gate as `[B, T, H, Dk]` (zeros when there is no gate)."""
    B, T, H, Dk = q.shape
    if g is None:
        return q.new_zeros(B, T, H, Dk)
    return g.unsqueeze(-1).expand(B, T, H, Dk) if g.dim() == 3 else g


def recurrent_form(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                   delta_rule=False, **_ignored):
    """Token-by-token recurrence. q, k: `[B, T, H, Dk]`, v: `[B, T, H, Dv]`; returns o `[B, T, H, Dv]`
    (and the final state `[B, H, Dk, Dv]` with `output_final_state`)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    gate = _expand_gate(g, q)
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q.dtype).clone()
    outs = []
    for t in range(T):
        S = S * torch.exp(gate[:, t]).unsqueeze(-1)  # G_t * S_{t-1}: scale the rows (key channels)
        k_t, v_t = k[:, t], v[:, t]  # [B, H, Dk], [B, H, Dv]
        b_t = 1.0 if beta is None else beta[:, t].unsqueeze(-1)  # [B, H, 1]
        if delta_rule:
            v_t = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S)  # prediction error of the decayed state
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, b_t * v_t)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1)
    return (o, S) if output_final_state else o


def parallel_form(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                  delta_rule=False, **_ignored):
    """Masked quadratic form of the same recurrence (see the module docstring). Same signature/returns."""
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    Gc = torch.cumsum(_expand_gate(g, q), dim=1)  # [B, T, H, Dk]
    # decay[b, h, i, j, d] = exp(Gc_id - Gc_jd), kept only for j <= i so exp never overflows
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = Gc.permute(0, 2, 1, 3).unsqueeze(3) - Gc.permute(0, 2, 1, 3).unsqueeze(2)  # [B, H, T(i), T(j), Dk]
    decay = torch.exp(diff.masked_fill(~causal.view(1, 1, T, T, 1), -float("inf")))
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, *]
    qk = torch.einsum("bhid,bhjd,bhijd->bhij", qh, kh, decay)  # <q_i, k_j>_D, j <= i
    b = torch.ones(B, H, T, dtype=q.dtype, device=q.device) if beta is None else beta.permute(0, 2, 1)
    S0 = None if initial_state is None else initial_state.to(q.dtype)
    q_dec = qh * torch.exp(Gc.permute(0, 2, 1, 3))  # q_t * exp(Gc_t)
    k_dec = kh * torch.exp(Gc.permute(0, 2, 1, 3))
    if delta_rule:
        rhs = vh if S0 is None else vh - k_dec @ S0
        kk = torch.einsum("bhid,bhjd,bhijd->bhij", kh, kh, decay).tril(-1)
        system = torch.eye(T, dtype=q.dtype, device=q.device) + b.unsqueeze(-1) * kk
        u = torch.linalg.solve_triangular(system, b.unsqueeze(-1) * rhs, upper=False, unitriangular=True)
    else:
        u = b.unsqueeze(-1) * vh
    o = qk @ u
    if S0 is not None:
        o = o + q_dec @ S0
    o = (scale * o).permute(0, 2, 1, 3)
    if not output_final_state:
        return o
    # S_T = exp(Gc_T) * S_0 + sum_j exp(Gc_T - Gc_j) k_j^T u_j
    last = Gc[:, -1].unsqueeze(1)  # [B, 1, H, Dk]
    k_to_end = (k * torch.exp(last - Gc)).permute(0, 2, 3, 1)  # [B, H, Dk, T]
    S = k_to_end @ u
    if S0 is not None:
        S = S + torch.exp(last.squeeze(1)).unsqueeze(-1) * S0
    return o, S
