"""Mamba2 (Dao & Gu, 2024, "Transformers are SSMs"; survey Table 5, forget + select): the SSD layer.

Per head h with a scalar A_h < 0, step size dt_t = softplus(dt_raw_t + dt_bias_h) and inputs B_t, C_t `[N]`
shared by the heads of a group (like GQA's key/value heads):

    h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t^T x_t        (state `[N, P]`)
    y_t = C_t h_t + D_h x_t

This is the engine's scalar-gate recurrence S_t = e^{g_t} S_{t-1} + k_t^T v_t, o_t = q_t S_t with
g = A dt, k = B, v = dt x, q = C, scale 1, plus the D skip outside the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import linear_recurrent
from ..validate import check_choice, check_tensor
from .engine import chunk_gated_linear_attn

FORMS = ("chunk", "recurrent")


def _check(x, dt, A, B, C, D, dt_bias):
    check_tensor("x", x, ndim=4, layout="[B, T, H, P]")
    Bt, T, H, _ = x.shape
    check_tensor("B", B, ndim=4, dtypes=(x.dtype,), layout="[B, T, G, N]")
    G = B.shape[2]
    if B.shape[:2] != (Bt, T) or H % G:
        raise ValueError(f"B must be [B={Bt}, T={T}, G, N] with G dividing H={H}, got {tuple(B.shape)}")
    check_tensor("C", C, ndim=4, dtypes=(x.dtype,), layout="[B, T, G, N]")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    check_tensor("dt", dt, ndim=3, layout="[B, T, H]")
    if dt.shape != (Bt, T, H):
        raise ValueError(f"dt must be [B, T, H] = {(Bt, T, H)}, got {tuple(dt.shape)}")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, layout="[H]")
            if t.shape[0] != H:
                raise ValueError(f"{name} must be [H={H}], got {tuple(t.shape)}")
    return H // G


def _discretize(dt, A, dt_bias):
    """dt = softplus(dt_raw + dt_bias) and the log decay A dt, in float32 (float64 stays float64)."""
    acc = torch.float64 if dt.dtype == torch.float64 else torch.float32
    dt = dt.to(acc) if dt_bias is None else dt.to(acc) + dt_bias.to(acc)
    dt = F.softplus(dt)
    return dt, dt * A.to(acc)


def mamba2(x, dt, A, B, C, D=None, *, dt_bias=None, initial_state=None, output_final_state=False, form="chunk",
           chunk_size=64):
    """Mamba2's SSD scan.

    x: `[B, T, H, P]`; dt: raw step `[B, T, H]` (softplus(dt + dt_bias) is applied here); A: `[H]` (negative,
    e.g. -exp(A_log)); B, C: `[B, T, G, N]` shared by H / G heads each; D, dt_bias: `[H]` or None;
    initial_state `[B, H, N, P]`. Returns y `[B, T, H, P]` (and the final state `[B, H, N, P]` in float32 with
    `output_final_state`). `form`: "chunk" (the engine's Triton scalar-gate kernels; O(T C N + T N P) per
    head) or "recurrent" (token by token, the decode step).
    """
    check_choice("form", form, FORMS)
    heads_per_group = _check(x, dt, A, B, C, D, dt_bias)
    dt, g = _discretize(dt, A, dt_bias)
    q, k = (t.repeat_interleave(heads_per_group, dim=2) for t in (C, B))
    v = (x.to(dt.dtype) * dt.unsqueeze(-1)).to(x.dtype)
    if form == "chunk":
        y, state = chunk_gated_linear_attn(q, k, v, g, scale=1.0, initial_state=initial_state,
                                           output_final_state=True, chunk_size=chunk_size)
    else:
        y, state = linear_recurrent(q, k, v, g.to(x.dtype), scale=1.0, initial_state=initial_state,
                                    output_final_state=True)
    if D is not None:
        y = y + D.to(x.dtype).view(1, 1, -1, 1) * x
    return (y, state) if output_final_state else y


def mamba2_reference(x, dt, A, B, C, D=None, *, dt_bias=None, initial_state=None, output_final_state=False,
                     **_ignored):
    """The paper's recurrence token by token, in the inputs' dtype (float64 for ground truth)."""
    Bt, T, H, P = x.shape
    rep = H // B.shape[2]
    dt = F.softplus(dt if dt_bias is None else dt + dt_bias)  # [B, T, H]
    h = x.new_zeros(Bt, H, B.shape[-1], P) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        b_t, c_t = (m[:, t].repeat_interleave(rep, dim=1) for m in (B, C))  # [B, H, N]
        decay = torch.exp(dt[:, t] * A).view(Bt, H, 1, 1)  # exp(dt_t A_h)
        h = decay * h + dt[:, t].view(Bt, H, 1, 1) * b_t.unsqueeze(-1) * x[:, t].unsqueeze(-2)  # + dt B^T x
        y = torch.einsum("bhn,bhnp->bhp", c_t, h)
        if D is not None:
            y = y + D.view(1, H, 1) * x[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1)
    return (y, h) if output_final_state else y


def mamba2_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """x `[B, T, H, P=Dv]`, B/C `[B, T, G=Hkv, N=head_dim]`, dt raw ~ N(-1, 1), A = -exp(N(0, 0.5)), D, dt_bias."""
    from ..inputs import randn

    Bt, T, H, G, N, P = shape.batch, shape.seq_q, shape.heads, shape.Hkv, shape.head_dim, shape.Dv
    r = lambda *s, std=1.0: randn(s, dtype, device, generator, std=std)  # noqa: E731
    out = {"x": r(Bt, T, H, P), "dt": r(Bt, T, H) - 1.0, "A": -torch.exp(r(H, std=0.5)), "B": r(Bt, T, G, N),
           "C": r(Bt, T, G, N), "D": r(H), "dt_bias": r(H, std=0.5)}
    if initial_state:
        out["initial_state"] = randn((Bt, H, N, P), torch.float32, device, generator, std=0.5)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import CHUNKWISE, Method, StateOrCache, register

    register(Method(
        name="mamba2", family="linear",
        cite="Dao & Gu 2024, Mamba2 / SSD (survey Table 5, forget + select)",
        fn=mamba2, reference=mamba2_reference,
        # chunk_size 16: several chunks (and a remainder) even at the registry's short test lengths
        make_inputs=partial(with_test_options, partial(mamba2_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=CHUNKWISE,
        state_or_cache=StateOrCache("H N P", False, lambda s: s.heads * s.head_dim * s.Dv),
        forms=FORMS, options={"D": None, "dt_bias": None, "initial_state": None, "output_final_state": False,
                              "form": "chunk", "chunk_size": 64},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"),
        description="scalar decay exp(dt A) per head, input-dependent dt, B, C (grouped), D skip"))


_register()
