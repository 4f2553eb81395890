"""Linear Transformer (Katharopoulos et al., 2020; survey Table 5, "kernelised linear attention").

    o_t = phi(q_t) S_t / (phi(q_t) z_t),   S_t = S_{t-1} + phi(k_t)^T v_t,   z_t = z_{t-1} + phi(k_t)^T

with phi(x) = elu(x) + 1. It is the gated recurrence with no gate, run on v augmented by a column of
ones so that the same state carries the normaliser z (state `[B, H, Dk, Dv + 1]` when `normalize`).
"""
from __future__ import annotations

from ..reference import linear_parallel, linear_recurrent
from ..validate import check_choice, check_qkv, check_scale
from .engine import chunk_gated_linear_attn
from .feature_maps import elu_plus_one, elu_plus_one_reference, normalized_linear_attn

FORMS = ("chunk", "parallel", "recurrent")


def _run(q, k, v, phi, form_fn, *, scale, normalize, eps, initial_state, output_final_state):
    return normalized_linear_attn(phi(q), phi(k), v, form_fn, scale=scale, normalize=normalize, eps=eps,
                                  initial_state=initial_state, output_final_state=output_final_state)


def linear_transformer(q, k, v, *, scale=None, normalize=True, eps=1e-6, form="chunk",
                       initial_state=None, output_final_state=False):
    """Causal linear attention with the elu+1 feature map.

    q, k: `[B, T, H, D]`, v: `[B, T, H, Dv]`; initial_state: `[B, H, D, Dv (+1 if normalize)]`.
    Returns o `[B, T, H, Dv]` (and the final state with `output_final_state`). Time O(N d^2) recurrent,
    O(N^2 d) parallel, O(N C d + N d^2) chunk; state O(d^2) per head. `form`: "chunk" (Triton chunkwise
    kernels), "parallel" (masked quadratic) or "recurrent".
    """
    check_qkv(q, k, v, same_length=True)
    check_scale(scale)
    check_choice("form", form, FORMS)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"linear_transformer needs as many key heads as query heads, got H={q.shape[2]}, "
                         f"Hkv={k.shape[2]}")
    form_fn = {"chunk": chunk_gated_linear_attn, "parallel": linear_parallel, "recurrent": linear_recurrent}[form]
    return _run(q, k, v, elu_plus_one, form_fn, scale=scale, normalize=normalize, eps=eps,
                initial_state=initial_state, output_final_state=output_final_state)


def linear_transformer_reference(q, k, v, *, scale=None, normalize=True, eps=1e-6, initial_state=None,
                                 output_final_state=False, **_ignored):
    """The recurrence token by token, in the dtype of the inputs (float64 for ground truth)."""
    return _run(q, k, v, elu_plus_one_reference, linear_recurrent, scale=scale, normalize=normalize, eps=eps,
                initial_state=initial_state, output_final_state=output_final_state)


def _register() -> None:
    from functools import partial

    from ..inputs import linear_inputs
    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="linear_transformer", family="linear",
        cite="Katharopoulos et al. 2020 (survey Table 5, linear attention without gate)",
        fn=linear_transformer, reference=linear_transformer_reference,
        make_inputs=partial(linear_inputs, state_cols_extra=1, output_final_state=True),
        complexity=Complexity("O(N d^2)", "O(N d)", 1.0, 1.0),
        state_or_cache=StateOrCache("H d (d + 1)", False, lambda s: s.heads * s.head_dim * (s.Dv + 1)),
        forms=FORMS, options={"scale": None, "normalize": True, "eps": 1e-6, "form": "chunk",
                              "initial_state": None, "output_final_state": False},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("q", "k", "v", "initial_state"),
        description="elu+1 feature map, running sums of phi(k)^T v and phi(k) (normaliser)"))


_register()
