"""RWKV6 "Finch" (Peng et al., 2024, "Eagle and Finch"; survey Table 5, forget gate): matrix-valued state,
data-dependent per-channel decay w_t, bonus u for the current token:

    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),      S_t = diag(w_t) S_{t-1} + k_t^T v_t     (S `[K, V]`)

w is taken in log space like the engine's gates (FLA's convention: w_t = log of the decay <= 0, e.g.
-exp(x)). The time-mix projections, token shift and output gate that produce r, k, v, w are the layer's,
not this operator's.

On the engine (vector gate g = w, no delta rule): E_t = diag(e^{w_t}) E_{t-1} + k_t^T v_t with E_{-1} = S_{-1}
is exactly S_t. The engine returns q_t E_t, but RWKV6 reads the state *before* the current token:
    r_t S_{t-1} = r_t E_{t-1}  = (engine output at step t-1 for the query r_t).
So the engine runs with the queries shifted one step left (q'_j = r_{j+1}, q'_{T-1} = 0, output unused)
and its output is shifted back; the first token reads the initial state directly, r_0 S_{-1}. The
current token enters only through the bonus, a per-token diagonal term added outside the engine:
    r_t diag(u) k_t^T v_t = (sum_d r_td u_d k_td) v_t.
The shift back and the bonus run as one Triton kernel each way (rwkv_bonus.py) on the chunk form, which is one
autograd node with the engine's kernels: the gradients of r, k and v from both parts add in float32 and round once.
(Undoing the decay instead, r_t S_{t-1} = (r_t / e^{w_t}) (E_t - k_t^T v_t), divides by decays that can be
~0: the shift is exact and stable.)
Limit inherited from the engine's vector-gate chunk kernels: the log decay summed over one chunk must stay
above ~-88 (float32 exp range; tested down to per-step decays of e^-36 at chunk 16); "recurrent" has no limit.
"""
from __future__ import annotations

import torch

from .._triton_mode import can_run_triton
from ..reference import linear_recurrent
from ..validate import check_choice, check_positive_int, check_qkv, check_scale, check_tensor
from .engine import chunk_gated_linear_attn
from .rwkv_bonus import rwkv_chunk

FORMS = ("chunk", "recurrent")


def _check(r, k, v, w, u, initial_state):
    B, T, _, H, Hkv, K, V = check_qkv(r, k, v, same_length=True)
    if Hkv != H:
        raise ValueError(f"k and v must have as many heads as r (H={H}), got Hkv={Hkv}")
    check_tensor("w", w, ndim=4, dtypes=(r.dtype, torch.float32), layout="[B, T, H, K]")
    if w.shape != r.shape:
        raise ValueError(f"w must be [B, T, H, K] = {tuple(r.shape)}, got {tuple(w.shape)}")
    check_tensor("u", u, ndim=2, layout="[H, K]")
    if u.shape != (H, K):
        raise ValueError(f"u must be [H, K] = {(H, K)}, got {tuple(u.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, layout="[B, H, K, V]")
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, got "
                             f"{tuple(initial_state.shape)}")


def rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False, form="chunk", chunk_size=64):
    """RWKV6 time mixing (the WKV operator).

    r, k: `[B, T, H, K]`, v: `[B, T, H, V]`, w: log decay `[B, T, H, K]` (<= 0), u: bonus `[H, K]`;
    initial_state `[B, H, K, V]`; scale multiplies the output (default 1, as in the paper). Returns o
    `[B, T, H, V]` (and the final state `[B, H, K, V]`, float32 from "chunk", with `output_final_state`).
    `form`: "chunk" (the engine's Triton vector-gate kernels, O(T C K + T K V)) or "recurrent" (the decode
    step; token by token).
    """
    check_choice("form", form, FORMS)
    check_scale(scale)
    _check(r, k, v, w, u, initial_state)
    scale = 1.0 if scale is None else float(scale)
    if form == "chunk" and r.dtype != torch.float64 and can_run_triton(r):
        check_positive_int("chunk_size", chunk_size, power_of_two=True, minimum=16)
        o, state = rwkv_chunk(r, k, v, w, u, initial_state, scale, chunk_size)
        return (o, state) if output_final_state else o
    if form == "chunk":  # float64: the engine's kernels and the epilogue in PyTorch
        run = lambda q: chunk_gated_linear_attn(q, k, v, w, scale=scale, initial_state=initial_state,  # noqa: E731
                                                output_final_state=True, chunk_size=chunk_size,
                                                output_dtype=torch.float32)  # rounded once, after the bonus
    else:  # accumulate in float32 (float64 kept): the state sums the whole sequence
        acc = torch.promote_types(r.dtype, torch.float32)
        run = lambda q: linear_recurrent(q.to(acc), k.to(acc), v.to(acc), w.to(acc), scale=scale,  # noqa: E731
                                         initial_state=initial_state, output_final_state=True)
    o, state = read_before_write(run, r, k, v, u, scale=scale, initial_state=initial_state)
    return (o, state) if output_final_state else o


def read_before_write(run, r, k, v, u, *, scale, initial_state):
    """RWKV's o_t = r_t (S_{t-1} + diag(u) k_t^T v_t) from a gated recurrence that reads the state after the
    write: `run(q) -> (o, final state)` runs S_t = diag(e^{w_t}) S_{t-1} + k_t^T v_t from initial_state with
    queries q (any engine form, or a layer's dispatcher). Queries go in shifted one step left (module
    docstring); returns (o `[B, T, H, V]` in v's dtype, final state). The shift back and the bonus in PyTorch
    (rwkv6's chunk form runs them as Triton kernels, rwkv_bonus.py)."""
    o_next, state = run(torch.cat([r[:, 1:], torch.zeros_like(r[:, :1])], dim=1))  # q'_j = r_{j+1}
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    first = None if initial_state is None else (  # r_0 S_{-1}
        scale * torch.einsum("bhk,bhkv->bhv", r[:, 0].to(acc), initial_state.to(acc)))
    first = v.new_zeros(v.shape[0], 1, *v.shape[2:], dtype=acc) if first is None else first.unsqueeze(1)
    past = torch.cat([first, o_next[:, :-1].to(acc)], dim=1)  # r_t S_{t-1}
    bonus = scale * (r.to(acc) * u.to(acc) * k.to(acc)).sum(-1, keepdim=True) * v.to(acc)
    return (past + bonus).to(v.dtype), state


def rwkv6_reference(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False, **_ignored):
    """The paper's recurrence token by token, in the inputs' dtype (float64 for ground truth)."""
    B, T, H, K = r.shape
    scale = 1.0 if scale is None else scale
    S = r.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(r.dtype)
    outs = []
    for t in range(T):
        kv = k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)  # k_t^T v_t  [B, H, K, V]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t], S + u.unsqueeze(-1) * kv))
        S = torch.exp(w[:, t]).unsqueeze(-1) * S + kv  # diag(w_t) S_{t-1} + k_t^T v_t
    o = torch.stack(outs, dim=1)
    return (o, S) if output_final_state else o


def rwkv5(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False, form="chunk", chunk_size=64):
    """RWKV5 "Eagle" (Peng et al., 2024): RWKV6's operator with a fixed, data-independent decay.

    w: log decay `[H, K]` (<= 0), the same at every token; everything else as `rwkv6` (r, k `[B, T, H, K]`,
    v `[B, T, H, V]`, u `[H, K]`, initial_state `[B, H, K, V]`). The decay is broadcast over (B, T) onto the
    engine's vector gate, so "chunk" runs the same Triton kernels; its gradient sums over (B, T).
    """
    check_tensor("w", w, ndim=2, dtypes=(r.dtype, torch.float32), layout="[H, K]")
    if r.dim() == 4 and w.shape != r.shape[2:]:
        raise ValueError(f"w must be [H, K] = {tuple(r.shape[2:])}, got {tuple(w.shape)}")
    return rwkv6(r, k, v, w.expand(r.shape), u, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, form=form, chunk_size=chunk_size)


def rwkv5_reference(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False, **_ignored):
    """The paper's sum form: wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(w)^{t-1-i} k_i^T v_i (+ diag(w)^t S_0),
    o_t = r_t wkv_t, all pairs at once (quadratic in T), in the inputs' dtype."""
    T = r.shape[1]
    scale = 1.0 if scale is None else scale
    t = torch.arange(T, dtype=r.dtype, device=r.device)
    lag = (t.view(T, 1) - 1 - t.view(1, T))  # t - 1 - i
    past = (lag >= 0).to(r.dtype)
    decay = torch.exp(lag.clamp(min=0).view(T, T, 1, 1) * w) * past.view(T, T, 1, 1)  # [T(t), T(i), H, K]
    att = torch.einsum("bthk,bihk,tihk->bhti", r, k, decay)
    att = att + torch.diag_embed(torch.einsum("bthk,hk,bthk->bht", r, u, k))  # the bonus on the diagonal
    o = torch.einsum("bhti,bihv->bthv", att, v)
    if initial_state is not None:
        o = o + torch.einsum("bthk,thk,bhkv->bthv", r, torch.exp(t.view(T, 1, 1) * w), initial_state.to(r.dtype))
    o = scale * o
    if not output_final_state:
        return o
    S = torch.einsum("ihk,bihk,bihv->bhkv", torch.exp((T - 1 - t).view(T, 1, 1) * w), k, v)
    if initial_state is not None:
        S = S + torch.exp(T * w).unsqueeze(-1) * initial_state.to(r.dtype)
    return o, S


def rwkv5_inputs(shape, dtype, device, generator, **options):
    """rwkv6_inputs with one decay per (head, channel): w `[H, K]` a log gate (mostly mild, some strong)."""
    from ..inputs import log_gate

    out = rwkv6_inputs(shape, dtype, device, generator, **options)
    out["w"] = log_gate((shape.heads, shape.head_dim), dtype, device, generator)
    return out


def rwkv6_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """linear_inputs renamed (q -> r, vector gate g -> w) plus the bonus u `[H, K]`."""
    from ..inputs import linear_inputs, randn

    out = linear_inputs(shape, dtype, device, generator, gate="vector", initial_state=initial_state, **options)
    out["r"], out["w"] = out.pop("q"), out.pop("g")
    out["u"] = randn((shape.heads, shape.head_dim), dtype, device, generator, std=0.5)
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import CHUNKWISE, MATRIX_STATE, Method, register

    register(Method(
        name="rwkv6", family="linear",
        cite="Peng et al. 2024, Eagle and Finch (RWKV5/6) (survey Table 5, forget gate)",
        fn=rwkv6, reference=rwkv6_reference,
        # chunk_size 16: several chunks (and a remainder) even at the registry's short test lengths
        make_inputs=partial(with_test_options, partial(rwkv6_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=CHUNKWISE,
        state_or_cache=MATRIX_STATE,
        forms=FORMS, options={"scale": None, "initial_state": None, "output_final_state": False, "form": "chunk",
                              "chunk_size": 64},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("r", "k", "v", "w", "u", "initial_state"),
        description="data-dependent vector decay w_t on a matrix state, bonus u for the current token"))

    register(Method(
        name="rwkv5", family="linear",
        cite="Peng et al. 2024, Eagle and Finch (RWKV5/6) (survey Table 6, forget gate)",
        fn=rwkv5, reference=rwkv5_reference,
        make_inputs=partial(with_test_options, partial(rwkv5_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=CHUNKWISE,
        state_or_cache=MATRIX_STATE,
        forms=FORMS, options={"scale": None, "initial_state": None, "output_final_state": False, "form": "chunk",
                              "chunk_size": 64},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("r", "k", "v", "w", "u", "initial_state"),
        description="fixed per-channel decay w on a matrix state, bonus u for the current token"))

_register()
