"""MetaLA (Chou et al. 2024, "MetaLA: Unified optimal linear approximation to softmax attention map"; survey
Table 6, forget gate, Eq. 76): GLA's vector-gated state with the key replaced by one minus the gate, plus a
self-augmentation term for the current token:

    S_t = Diag(alpha_t) S_{t-1} + (1 - alpha_t)^T v_t                         `[K, V]`
    o_t = scale * q_t S_t + sigmoid((q_t . (w_aug * (1 - alpha_t))) v_t)       (sigmoid elementwise)

alpha_t = e^{g_t} with g the log forget gate `[B, T, H, K]` (<= 0), w_aug `[H, K]` a learnable weight. Tying
the key to the gate is the paper's "least parameter" condition (no key projection); the augmentation adds
the current token's value without writing it into the state. `scale` multiplies the state read only, not
the augmentation (default K^-1/2).

The recurrence is the engine's vector gate with k = 1 - alpha, so every form of `gated_linear_attn` serves
it (the Triton chunk kernels included); the augmentation is a per-token elementwise term in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import check_tensor
from .gated import FORMS, _per_sequence, gated_linear_attn


def _check(q, v, g, aug_weight):
    check_tensor("q", q, ndim=4, layout="[B, T, H, K]")
    B, T, H, K = q.shape
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), layout="[B, T, H, V]")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with (B, T, H) = {(B, T, H)} like q, got {tuple(v.shape)}")
    check_tensor("g", g, ndim=4, dtypes=(q.dtype, torch.float32), layout="[B, T, H, K]")
    if g.shape != q.shape:
        raise ValueError(f"g (log forget gate) must be [B, T, H, K] = {tuple(q.shape)} like q, got {tuple(g.shape)}")
    check_tensor("aug_weight", aug_weight, ndim=2, layout="[H, K]")
    if aug_weight.shape != (H, K):
        raise ValueError(f"aug_weight must be [H, K] = {(H, K)}, got {tuple(aug_weight.shape)}")


def self_augmentation(q, v, key, aug_weight):
    """sigmoid((q_t . (w_aug * key_t)) v_t) `[B, T, H, V]`, in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    w = (q.to(acc) * key.to(acc) * aug_weight.to(acc)).sum(-1, keepdim=True)  # [B, T, H, 1]
    return torch.sigmoid(w * v.to(acc))


def metala(q, v, g, aug_weight, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
           form="chunk", chunk_size=64):
    """MetaLA attention.

    q: `[B, T, H, K]`, v: `[B, T, H, V]`, g: log forget gate `[B, T, H, K]` (<= 0), aug_weight: `[H, K]`;
    initial_state `[B, H, K, V]` (`[N, H, K, V]` with `cu_seqlens`, packed sequences with B = 1). Returns o
    `[B, T, H, V]` in v's dtype, and with `output_final_state` also the final state (float32). `form`:
    "chunk" (the engine's Triton kernels), "parallel" (masked quadratic), "recurrent" (token by token: the
    decode step).
    """
    _check(q, v, g, aug_weight)
    key = -torch.expm1(g.float())  # 1 - e^g without the cancellation of 1 - exp(g) near g = 0
    out = gated_linear_attn(q, key.to(q.dtype), v, g, None, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, form=form,
                            chunk_size=chunk_size)
    o, state = out if output_final_state else (out, None)
    o = (o.to(torch.float64 if o.dtype == torch.float64 else torch.float32)
         + self_augmentation(q, v, key, aug_weight)).to(v.dtype)
    return (o, state) if output_final_state else o


def metala_reference(q, v, g, aug_weight, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **_ignored):
    """Eq. 76 token by token in the inputs' dtype (float64 in the checks); packed sequences each from
    their own initial state."""
    # _per_sequence cuts five token-major tensors: (q, v, g) and two unused slots; aug_weight passes whole
    return _per_sequence(_recurrence, q, v, g, None, None, cu_seqlens=cu_seqlens, initial_state=initial_state,
                         output_final_state=output_final_state, aug_weight=aug_weight, scale=scale)


def _recurrence(q, v, g, _unused_k, _unused_beta, *, aug_weight, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for t in range(T):
        alpha = torch.exp(g[:, t].to(q.dtype))  # [B, H, K]
        key = 1 - alpha
        S = alpha.unsqueeze(-1) * S + key.unsqueeze(-1) * v[:, t].unsqueeze(-2)
        read = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        aug = torch.sigmoid((q[:, t] * aug_weight * key).sum(-1, keepdim=True) * v[:, t])
        outs.append(read + aug)
    o = torch.stack(outs, 1)
    return (o, S) if output_final_state else o


def metala_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """q, v, g = logsigmoid(x) / 16 (the authors' gate: alpha close to 1), aug_weight ~ N(0, 0.5^2)."""
    from ..inputs import randn

    B, T, H, K, V = shape.batch, shape.seq_q, shape.heads, shape.head_dim, shape.Dv
    g = F.logsigmoid(torch.randn((B, T, H, K), generator=generator)) / 16
    out = {"q": randn((B, T, H, K), dtype, device, generator), "v": randn((B, T, H, V), dtype, device, generator),
           "g": g.to(device=device, dtype=dtype), "aug_weight": randn((H, K), dtype, device, generator, std=0.5)}
    if initial_state:
        out["initial_state"] = randn((B, H, K, V), torch.float32, device, generator, std=0.5)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import CHUNKWISE, MATRIX_STATE, Method, register

    register(Method(
        name="metala", family="linear",
        cite="Chou et al. 2024, MetaLA (survey Table 6, forget gate, Eq. 76)",
        fn=metala, reference=metala_reference,
        make_inputs=partial(with_test_options, partial(metala_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=CHUNKWISE, state_or_cache=MATRIX_STATE, forms=FORMS,
        options={"scale": None, "initial_state": None, "output_final_state": False, "cu_seqlens": None,
                 "form": "chunk", "chunk_size": 64},
        supports=frozenset({"causal", "backward", "varlen", "decode", "state"}),
        grad_inputs=("q", "v", "g", "aug_weight", "initial_state"),
        description="GLA with the key tied to the forget gate (k = 1 - alpha) plus a self-augmentation term"))


_register()
