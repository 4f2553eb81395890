"""Random Feature Attention (Peng et al., 2021, "Random Feature Attention"). Not a row of the survey's tables; it is
the survey's kernelised linear attention (Sec. 7.1 and 7.4: a feature map phi with sim(q, k) = phi(q) . phi(k),
Eqs. 58-59) with an optional forget gate (Eq. 15).

Random Fourier features (Rahimi & Recht, 2007) of l2-normalised queries and keys:

    phi(x) = [sin(W x^), cos(W x^)] / sqrt(M),    x^ = x / |x|,    W `[M, D]` ~ N(0, 1) / sigma

so that E[phi(x) . phi(y)] = exp(-|x^ - y^|^2 / (2 sigma^2)) = exp((x^ . y^ - 1) / sigma^2), the softmax kernel of
unit vectors at temperature sigma^2 (the constant cancels in the ratio). The causal output (the paper's RFA)

    o_t = phi(q_t) S_t / (phi(q_t) z_t),   S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)

and gated RFA (the paper's recency-bias variant): with a forget gate g_t (log space, FLA's convention: g <= 0)

    S_t = e^{g_t} S_{t-1} + (1 - e^{g_t}) phi(k_t) v_t^T,   z_t = e^{g_t} z_{t-1} + (1 - e^{g_t}) phi(k_t).

Both run on the engine's scalar-gate (or ungated) recurrence over the features phi(q), (1 - e^g) phi(k) and v with a
column of ones (the normaliser z shares the state: `[B, H, 2M, Dv + 1]`). Projections are seeded; redraw them
with `FavorProjection(M, D, seed, redraw_every, draw=gaussian_random_features)`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch

from ..reference import linear_recurrent
from ..validate import check_choice, check_positive_int, check_qkv, check_tensor
from .engine import chunk_gated_linear_attn
from .feature_maps import normalized_linear_attn
from .performer import _projection

FORMS = ("chunk", "recurrent")


def gaussian_random_features(num_features: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """W `[num_features, head_dim]` float64 with i.i.d. N(0, 1) entries (seeded)."""
    check_positive_int("num_features", num_features)
    check_positive_int("head_dim", head_dim)
    return torch.randn(num_features, head_dim, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def _features(x, w, sigma):
    """phi(x) `[B, T, H, 2M]` in float32 (float64 stays float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(acc)
    proj = (x / x.norm(dim=-1, keepdim=True)) @ (w.to(device=x.device, dtype=acc) / sigma).T
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1) / math.sqrt(w.shape[0])


def _check(q, k, v, g, sigma, form):
    B, T, _, H, Hkv, _, _ = check_qkv(q, k, v, same_length=True)
    check_choice("form", form, FORMS)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number (the kernel width), got {sigma!r}")
    if Hkv != H:
        raise ValueError(f"rfa needs as many key heads as query heads, got H={H}, Hkv={Hkv}")
    if g is not None:
        check_tensor("g", g, ndim=3, layout="[B, T, H]")
        if g.shape != (B, T, H):
            raise ValueError(f"g must be [B, T, H] = {(B, T, H)} (a log forget gate, <= 0), got {tuple(g.shape)}")


def rfa(q, k, v, g=None, *, projection=None, num_features=None, seed=0, sigma=1.0, eps=1e-6, form="chunk",
        initial_state=None, output_final_state=False, chunk_size=64):
    """Causal (gated) random feature attention.

    q, k: `[B, T, H, D]`, v: `[B, T, H, Dv]`; g: optional log forget gate `[B, T, H]` (gated RFA); projection
    `[M, D]` (default `gaussian_random_features(num_features or D, D, seed)`); sigma: the kernel width (softmax
    temperature sigma^2 on unit q, k); initial_state `[B, H, 2M, Dv + 1]` (last column: the normaliser). Returns o
    `[B, T, H, Dv]` (and the final state with `output_final_state`). O(T M Dv) time, O(M Dv) state per head.
    `form`: "chunk" (the engine's Triton kernels, chunk length `chunk_size`) or "recurrent".
    """
    _check(q, k, v, g, sigma, form)
    if num_features is not None:
        check_positive_int("num_features", num_features)
    w = _projection(q, projection, num_features, seed, gaussian_random_features)
    fq, fk = _features(q, w, sigma), _features(k, w, sigma)
    if g is not None:
        fk = fk * -torch.expm1(g.to(fk.dtype)).unsqueeze(-1)  # (1 - e^g) phi(k)
    form_fn = partial(chunk_gated_linear_attn, chunk_size=chunk_size) if form == "chunk" else linear_recurrent
    if g is not None:
        form_fn = partial(form_fn, g=g.to(q.dtype) if form == "recurrent" else g)
    return normalized_linear_attn(fq.to(q.dtype), fk.to(q.dtype), v, form_fn, scale=1.0, normalize=True, eps=eps,
                                  initial_state=initial_state, output_final_state=output_final_state)


def rfa_reference(q, k, v, g=None, *, projection=None, num_features=None, seed=0, sigma=1.0, eps=1e-6,
                  initial_state=None, output_final_state=False, **_ignored):
    """The paper's recurrence token by token (S and z kept apart), in the inputs' dtype."""
    w = _projection(q, projection, num_features, seed, gaussian_random_features).to(q.dtype)

    def phi(x):
        proj = (x / x.norm(dim=-1, keepdim=True)) @ w.T / sigma
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1) / math.sqrt(w.shape[0])

    fq, fk = phi(q), phi(k)
    B, T, H, M2 = fq.shape
    Dv = v.shape[-1]
    state = q.new_zeros(B, H, M2, Dv + 1) if initial_state is None else initial_state.to(q.dtype)
    S, z = state[..., :Dv], state[..., Dv]
    outs = []
    for t in range(T):
        keep = q.new_ones(B, H, 1) if g is None else torch.exp(g[:, t]).view(B, H, 1)  # e^{g_t}
        write = 1 - keep if g is not None else keep
        S = keep.unsqueeze(-1) * S + torch.einsum("bhm,bhv->bhmv", write * fk[:, t], v[:, t])
        z = keep * z + write * fk[:, t]
        num = torch.einsum("bhm,bhmv->bhv", fq[:, t], S)
        outs.append(num / (torch.einsum("bhm,bhm->bh", fq[:, t], z).unsqueeze(-1) + eps))
    o = torch.stack(outs, dim=1)
    return (o, torch.cat([S, z.unsqueeze(-1)], dim=-1)) if output_final_state else o


def rfa_inputs(shape, dtype, device, generator, *, gate=True, **options):
    """linear_inputs with a scalar log gate and a state of 2M = 2D features whose normaliser column is positive
    (a real z sums weighted features phi(k) . phi(q) ~ a positive kernel; a random sign puts the ratio's
    denominator near 0)."""
    from ..inputs import linear_inputs

    shape = replace(shape, kv_heads=None)  # one key head per query head
    out = linear_inputs(shape, dtype, device, generator, gate="scalar" if gate else None, initial_state=False,
                        **options)
    B, H, Dv = shape.batch, shape.heads, shape.Dv
    M = options.get("num_features") or shape.head_dim
    state = torch.randn((B, H, 2 * M, Dv + 1), generator=generator) * 0.5
    state[..., -1] = state[..., -1].abs() + 0.5
    out["initial_state"] = state.to(device)
    return out


def _register() -> None:
    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="rfa", family="linear",
        cite="Peng et al. 2021, Random Feature Attention (survey Sec. 7.1/7.4 feature map phi, Eqs. 15, 58-59)",
        fn=rfa, reference=rfa_reference, make_inputs=partial(rfa_inputs, output_final_state=True),
        complexity=Complexity("O(N M d)", "O(N d + M d)", 1.0, 1.0),
        state_or_cache=StateOrCache("H 2M (d + 1)", False, lambda s: s.heads * 2 * s.head_dim * (s.Dv + 1)),
        forms=FORMS, options={"projection": None, "num_features": None, "seed": 0, "sigma": 1.0, "eps": 1e-6,
                              "form": "chunk", "initial_state": None, "output_final_state": False, "chunk_size": 64},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("q", "k", "v", "g", "initial_state"),
        description="random Fourier features [sin, cos](Wx/|x|) of unit q, k; optional forget gate (gated RFA)"))


_register()
