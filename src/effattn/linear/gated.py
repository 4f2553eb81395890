"""The methods that are direct instances of the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t.

| method            | gate G_t                                   | write              | paper                          |
|-------------------|--------------------------------------------|--------------------|--------------------------------|
| lightning         | none, or a fixed decay lambda (per head)   | k^T v              | Qin et al. 2024 (Lightning-2)  |
| retnet            | fixed gamma_h = 1 - 2^(-5 - h) per head    | k^T v              | Sun et al. 2023                |
| simple_gla        | data-dependent scalar per head, e^{g_t}    | k^T v              | Mamba2 / GLA scalar variant    |
| gla               | data-dependent vector per key channel      | k^T v              | Yang et al. 2024 (GLA)         |
| delta_net         | none                                       | delta rule, beta   | Schlag et al. 2021; Yang 2024  |
| gated_delta_net   | data-dependent scalar per head             | delta rule, beta   | Yang et al. 2025               |

Every function takes FLA's arguments `(q, k, v, g=None, beta=None, *, scale, initial_state,
output_final_state, cu_seqlens)` plus `form`: "chunk" (Triton, default), "chunk_torch", "parallel" or
"recurrent" (the float64-capable references of effattn.reference.linear; per sequence with cu_seqlens).
"""
from __future__ import annotations

import torch

from ..reference import linear_parallel, linear_recurrent
from ..validate import check_choice
from .chunk_torch import chunk_form
from .engine import chunk_gated_linear_attn, validate_linear

FORMS = ("chunk", "parallel", "recurrent")  # registered (and tested over the registry)
ALL_FORMS = FORMS + ("chunk_torch",)  # the pure-PyTorch chunkwise form, tested in tests/linear


def _per_sequence(form_fn, q, k, v, g, beta, *, cu_seqlens, initial_state, output_final_state, **kw):
    """Run a reference form on each packed sequence of `cu_seqlens` (they do not handle packing)."""
    if cu_seqlens is None:
        return form_fn(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state, **kw)
    cu = cu_seqlens.tolist()
    outs, states = [], []
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        cut = lambda t: None if t is None else t[:, a:b]  # noqa: E731
        h0 = None if initial_state is None else initial_state[i:i + 1]
        o, s = form_fn(cut(q), cut(k), cut(v), cut(g), cut(beta), initial_state=h0, output_final_state=True, **kw)
        outs.append(o)
        states.append(s)
    o = torch.cat(outs, dim=1)
    return (o, torch.cat(states)) if output_final_state else o


def gated_linear_attn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None, delta_rule=False, form="chunk", chunk_size=64):
    """The engine behind every method of this module, in the chosen `form` (module docstring)."""
    check_choice("form", form, ALL_FORMS)
    if form == "chunk":
        return chunk_gated_linear_attn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       delta_rule=delta_rule, chunk_size=chunk_size)
    validate_linear(q, k, v, g, beta, scale, initial_state, cu_seqlens, delta_rule=delta_rule,
                    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if form == "chunk_torch":
        return chunk_form(q, k, v, g, beta, scale=scale, initial_state=initial_state, delta_rule=delta_rule,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    if form == "parallel" and q.dtype in (torch.float16, torch.bfloat16):
        # the masked quadratic form sums T terms per output and solves a T x T system (delta rule): in
        # float32, as a kernel would accumulate (and torch has no 16-bit triangular solve)
        up = lambda t: None if t is None else t.float()  # noqa: E731
        out = gated_linear_attn(up(q), up(k), up(v), up(g), up(beta), scale=scale, initial_state=up(initial_state),
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                delta_rule=delta_rule, form=form)
        return (out[0].to(q.dtype), out[1]) if output_final_state else out.to(q.dtype)
    form_fn = linear_parallel if form == "parallel" else linear_recurrent
    return _per_sequence(form_fn, q, k, v, g, beta, cu_seqlens=cu_seqlens, initial_state=initial_state,
                         output_final_state=output_final_state, scale=scale, delta_rule=delta_rule)


def _no_gate(name, g):
    if g is not None:
        raise ValueError(f"{name} has a fixed decay and takes no data-dependent gate g, got g {tuple(g.shape)}")


def _need(name, arg, t, layout):
    if t is None:
        raise ValueError(f"{name} needs {arg} {layout}, got None")


def _fixed_gate(q, log_decay: torch.Tensor) -> torch.Tensor:
    """A fixed per-head log decay `[H]` as the scalar gate g `[B, T, H]`."""
    B, T, H, _ = q.shape
    return log_decay.to(device=q.device, dtype=q.dtype).view(1, 1, H).expand(B, T, H).contiguous()


def _decay_per_head(name, value, H) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(H)
    if t.numel() != H or not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"{name} must be a number or [H={H}] values in (0, 1], got {value!r}")
    return torch.log(t)


def lightning(q, k, v, g=None, beta=None, *, decay=None, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, form="chunk", chunk_size=64):
    """Lightning Attention (-2): o_t = q_t S_t, S_t = lambda S_{t-1} + k_t^T v_t, no gate when decay is None.

    decay: None, a number or `[H]` values lambda in (0, 1]. q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`.
    Intra-chunk quadratic + inter-chunk state passing (the paper's tiling); O(T C Dk + T Dk Dv)."""
    _no_gate("lightning", g)
    if decay is not None:
        g = _fixed_gate(q, _decay_per_head("decay", decay, q.shape[2]))
    return gated_linear_attn(q, k, v, g, beta, scale=scale, initial_state=initial_state, form=form,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def retnet_gamma(H: int) -> torch.Tensor:
    """RetNet's multi-scale decays gamma_h = 1 - 2^(-5 - h), h = 0..H-1 (Sun et al. 2023, Sec. 2.2)."""
    return 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))


def retnet(q, k, v, g=None, beta=None, *, gamma=None, scale=None, initial_state=None, output_final_state=False,
           cu_seqlens=None, form="chunk", chunk_size=64):
    """Retention: S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t (gamma default: `retnet_gamma(H)`)."""
    _no_gate("retnet", g)
    gamma = retnet_gamma(q.shape[2]) if gamma is None else gamma
    g = _fixed_gate(q, _decay_per_head("gamma", gamma, q.shape[2]))
    return gated_linear_attn(q, k, v, g, beta, scale=scale, initial_state=initial_state, form=form,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def simple_gla(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, form="chunk", chunk_size=64):
    """Scalar data-dependent gate: S_t = e^{g_t} S_{t-1} + k_t^T v_t, g `[B, T, H]` <= 0."""
    _need("simple_gla", "g", g, "[B, T, H]")
    if g.dim() != 3:
        raise ValueError(f"simple_gla takes a scalar gate g [B, T, H], got {tuple(g.shape)} (gla: vector gate)")
    return gated_linear_attn(q, k, v, g, beta, scale=scale, initial_state=initial_state, form=form,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def gla(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        form="chunk", chunk_size=64):
    """Gated Linear Attention: S_t = Diag(e^{g_t}) S_{t-1} + k_t^T v_t, g `[B, T, H, Dk]` <= 0."""
    _need("gla", "g", g, "[B, T, H, Dk]")
    if g.dim() != 4:
        raise ValueError(f"gla takes a vector gate g [B, T, H, Dk], got {tuple(g.shape)} (simple_gla: scalar)")
    return gated_linear_attn(q, k, v, g, beta, scale=scale, initial_state=initial_state, form=form,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def delta_net(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, form="chunk", chunk_size=64):
    """DeltaNet: S_t = S_{t-1} (I - beta_t k_t^T k_t) + beta_t k_t^T v_t (k L2-normalised by the caller)."""
    _no_gate("delta_net", g)
    _need("delta_net", "beta", beta, "[B, T, H]")
    return gated_linear_attn(q, k, v, None, beta, scale=scale, initial_state=initial_state, form=form,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, delta_rule=True,
                             chunk_size=chunk_size)


def gated_delta_net(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, form="chunk", chunk_size=64):
    """Gated DeltaNet: S_t = e^{g_t} S_{t-1} (I - beta_t k_t^T k_t) + beta_t k_t^T v_t, g `[B, T, H]`."""
    _need("gated_delta_net", "g", g, "[B, T, H]")
    _need("gated_delta_net", "beta", beta, "[B, T, H]")
    return gated_linear_attn(q, k, v, g, beta, scale=scale, initial_state=initial_state, form=form,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens, delta_rule=True,
                             chunk_size=chunk_size)


METHODS = {  # name: (fn, gate, delta rule, extra options, cite)
    "lightning": (lightning, None, False, {"decay": 0.95},
                  "Qin et al. 2024, Lightning Attention-2 (survey Table 5, linear attention, fixed decay)"),
    "retnet": (retnet, None, False, {"gamma": None}, "Sun et al. 2023, RetNet (survey Table 5, fixed decay)"),
    "simple_gla": (simple_gla, "scalar", False, {}, "Yang et al. 2024 / Mamba2 SSD (survey Table 5, scalar gate)"),
    "gla": (gla, "vector", False, {}, "Yang et al. 2024, GLA (survey Table 5, vector gate)"),
    "delta_net": (delta_net, None, True, {}, "Schlag et al. 2021; Yang et al. 2024 (survey Table 5, delta rule)"),
    "gated_delta_net": (gated_delta_net, "scalar", True, {},
                        "Yang et al. 2025, Gated DeltaNet (survey Table 5, gated delta rule)"),
}


def _reference(fn):
    def reference(q, k, v, g=None, beta=None, form=None, chunk_size=None, **kw):
        """The token-by-token recurrence (effattn.reference.linear) in the inputs' dtype."""
        return fn(q, k, v, g, beta, form="recurrent", **kw)
    return reference


def _register() -> None:
    from functools import partial

    from ..inputs import linear_inputs, with_test_options
    from ..registry import CHUNKWISE, MATRIX_STATE, Method, register

    for name, (fn, gate, delta, extra, cite) in METHODS.items():
        grads = ("q", "k", "v") + (("g",) if gate else ()) + (("beta",) if delta else ()) + ("initial_state",)
        register(Method(
            name=name, family="linear", cite=cite, fn=fn, reference=_reference(fn),
            # chunk_size 16 at test sizes: several chunks (and a remainder) even at the registry's short lengths
            make_inputs=partial(with_test_options, partial(linear_inputs, gate=gate, beta=delta, normalize_qk=delta,
                                                           output_final_state=True, **extra), {"chunk_size": 16}),
            complexity=CHUNKWISE,
            state_or_cache=MATRIX_STATE,
            forms=FORMS, options={"scale": None, "initial_state": None, "output_final_state": False,
                                  "cu_seqlens": None, "form": "chunk", "chunk_size": 64, **extra},
            supports=frozenset({"causal", "backward", "varlen", "decode", "state"}), grad_inputs=grads,
            description=fn.__doc__.splitlines()[0]))


_register()
