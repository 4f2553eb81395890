"""Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"; survey Table 5,
forget + select): the S6 selective scan.

Per channel d of the inner width D, a diagonal state h `[N]` with A[d] `[N]` (negative), an input-dependent
step Delta_t[d] = softplus(dt_t[d] + dt_bias[d]) and input-dependent B_t, C_t `[N]` shared by all channels
(Algorithm 2 of the paper). Zero-order hold gives A_bar = exp(Delta A); B_bar = Delta B is the paper's
simplification (Sec. 3.5.2; the official kernels use it too):

    h_t = exp(Delta_t A) * h_{t-1} + Delta_t B_t x_t        (h `[D, N]`, elementwise in (d, n))
    y_t = C_t . h_t + D x_t,      out_t = y_t * silu(z_t)   (z: the optional gate branch)

Unlike Mamba2 the decay is per (channel, state index), not a scalar per head, so it is not the engine's
scalar gate; as a vector gate it would need a `[N, 1]` state per channel, where the engine's matmul tiles
waste all but one column. It has its own Triton kernels instead: selective_scan.py (a token-by-token walk over time chunks, and a
chunked associative scan).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import FLOAT_DTYPES, check_choice, check_tensor
from .selective_scan import selective_scan

FORMS = ("chunk", "recurrent")


def _check(x, dt, A, B, C, D, z, dt_bias, initial_state):
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, layout="[B, T, D]")
    Bt, T, Dn = x.shape
    check_tensor("dt", dt, ndim=3, layout="[B, T, D]")
    if dt.shape != x.shape:
        raise ValueError(f"dt must be [B, T, D] = {tuple(x.shape)}, got {tuple(dt.shape)}")
    check_tensor("A", A, ndim=2, layout="[D, N]")
    if A.shape[0] != Dn:
        raise ValueError(f"A must be [D={Dn}, N], got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, ndim=3, layout="[B, T, N]")
        if t.shape != (Bt, T, N):
            raise ValueError(f"{name} must be [B, T, N] = {(Bt, T, N)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, layout="[D]")
            if t.shape[0] != Dn:
                raise ValueError(f"{name} must be [D={Dn}], got {tuple(t.shape)}")
    if z is not None:
        check_tensor("z", z, ndim=3, layout="[B, T, D]")
        if z.shape != x.shape:
            raise ValueError(f"z must be [B, T, D] = {tuple(x.shape)}, got {tuple(z.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=3, layout="[B, D, N]")
        if initial_state.shape != (Bt, Dn, N):
            raise ValueError(f"initial_state must be [B, D, N] = {(Bt, Dn, N)}, got {tuple(initial_state.shape)}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_state", initial_state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def mamba_step(x, dt, A, B, C, h, *, dt_bias=None):
    """One token of the recurrence (the decode step): x, dt `[B, D]`, B, C `[B, N]`, h `[B, D, N]` (float32 or
    float64). Returns (y `[B, D]` without D skip or gate, in h's dtype; the new state)."""
    acc = h.dtype
    delta = F.softplus(dt.to(acc) if dt_bias is None else dt.to(acc) + dt_bias.to(acc))  # [B, D]
    h = torch.exp(delta.unsqueeze(-1) * A.to(acc)) * h + (delta * x.to(acc)).unsqueeze(-1) * B.to(acc).unsqueeze(1)
    return torch.einsum("bdn,bn->bd", h, C.to(acc)), h


def mamba(x, dt, A, B, C, D=None, z=None, *, dt_bias=None, initial_state=None, output_final_state=False,
          form="chunk"):
    """Mamba's selective scan (S6) with D skip and optional SiLU gate.

    x: `[B, T, D]`; dt: raw step `[B, T, D]` (softplus(dt + dt_bias) is applied here); A: `[D, N]` (negative,
    -exp(A_log)); B, C: `[B, T, N]`; D, dt_bias: `[D]` or None; z: gate `[B, T, D]` or None; initial_state
    `[B, D, N]`. Returns out `[B, T, D]` in x's dtype (and the final state `[B, D, N]`, float32 (float64 for
    float64 input), with `output_final_state`). Time O(T D N), state O(D N).
    `form`: "chunk" (the Triton chunked scan of selective_scan.py, fwd + bwd) or "recurrent" (`mamba_step`
    token by token in PyTorch: the decode step). float64 input always runs "recurrent" (the kernels
    accumulate in float32).
    """
    check_choice("form", form, FORMS)
    check_choice("output_final_state", output_final_state, (True, False))
    _check(x, dt, A, B, C, D, z, dt_bias, initial_state)
    acc = _acc(x)
    if form == "chunk" and x.dtype != torch.float64:
        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        y, h = selective_scan(x, dt, A.float(), B, C, f32(dt_bias), f32(initial_state), output_final_state)
        y = y.to(acc)
    else:  # the recurrent form (and float64, which the kernels do not take)
        h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1], dtype=acc) if initial_state is None \
            else initial_state.to(acc)
        ys = []
        for t in range(x.shape[1]):
            y_t, h = mamba_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h, dt_bias=dt_bias)
            ys.append(y_t)
        y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.to(acc) * x.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(x.dtype)
    return (y, h) if output_final_state else y


def mamba_reference(x, dt, A, B, C, D=None, z=None, *, dt_bias=None, initial_state=None, output_final_state=False,
                    **_ignored):
    """The paper's recurrence (Algorithm 2 with ZOH, B_bar = Delta B) in the inputs' dtype (float64: truth)."""
    Bt, T, Dn = x.shape
    delta = F.softplus(dt if dt_bias is None else dt + dt_bias)  # Delta_t = softplus(dt_t + bias)
    h = x.new_zeros(Bt, Dn, A.shape[1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        A_bar = torch.exp(delta[:, t, :, None] * A)  # exp(Delta A)                  [B, D, N]
        B_bar = delta[:, t, :, None] * B[:, t, None, :]  # Delta B                    [B, D, N]
        h = A_bar * h + B_bar * x[:, t, :, None]
        y = (h * C[:, t, None, :]).sum(-1)  # C h
        if D is not None:
            y = y + D * x[:, t]
        if z is not None:
            y = y * z[:, t] * torch.sigmoid(z[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1)
    return (y, h) if output_final_state else y


def mamba_inputs(shape, dtype, device, generator, *, initial_state=True, gate=True, **options):
    """x, dt, z `[B, T, D = 8 H]`, A = -exp(N(0, 0.5)) `[D, N = head_dim // 4]`, B, C `[B, T, N]`, D, dt_bias.
    (Narrow on purpose: Triton's interpreter runs the registry-wide tests of the scan kernel.)"""
    from ..inputs import randn

    Bt, T, Dn, N = shape.batch, shape.seq_q, 8 * shape.heads, max(1, shape.head_dim // 4)
    r = lambda *s, std=1.0: randn(s, dtype, device, generator, std=std)  # noqa: E731
    out = {"x": r(Bt, T, Dn), "dt": r(Bt, T, Dn) - 1.0, "A": -torch.exp(r(Dn, N, std=0.5)), "B": r(Bt, T, N),
           "C": r(Bt, T, N), "D": r(Dn), "dt_bias": r(Dn, std=0.5)}
    if gate:
        out["z"] = r(Bt, T, Dn)
    if initial_state:
        out["initial_state"] = randn((Bt, Dn, N), torch.float32, device, generator, std=0.5)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="mamba", family="linear",
        cite="Gu & Dao 2023, Mamba: selective state spaces (S6) (survey Table 5, forget + select)",
        fn=mamba, reference=mamba_reference,
        make_inputs=partial(mamba_inputs, output_final_state=True),
        complexity=Complexity("O(N D n)", "O(N D + D n)", 1.0, 1.0),
        state_or_cache=StateOrCache("D_inner n (as drawn: D_inner = 8 H, n = d / 4)", False,
                                    lambda s: 8 * s.heads * max(1, s.head_dim // 4)),
        forms=FORMS, options={"D": None, "z": None, "dt_bias": None, "initial_state": None,
                              "output_final_state": False, "form": "chunk"},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"),
        description="diagonal A per channel and state index, input-dependent Delta, B, C; ZOH; D skip, SiLU gate"))


_register()
