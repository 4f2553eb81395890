"""Gated Slot Attention (Zhang et al., 2024, "Gated slot attention for efficient linear-time sequence
modeling"; survey Table 6, forget gate, Eq. 74-75): M memory slots written with a data-dependent forget gate,
read through a softmax over the slots:

    K~_t = Diag(alpha_t) K~_{t-1} + s_t^T k_t      `[M, K]`
    V~_t = Diag(alpha_t) V~_{t-1} + s_t^T v_t      `[M, V]`
    o_t  = V~_t^T softmax(scale * K~_t q_t)

The paper writes s_t = 1 - alpha_t; FLA's operator (and ours) takes s `[B, T, H, M]` and g = log alpha
`[B, T, H, M]` (<= 0) separately, so the layer chooses the tie. States follow FLA: hk = K~^T `[K, M]`,
hv = V~ `[M, V]`.

As two passes of the gated linear recurrence (Eq. 75):
    pass 1  hk_t = hk_{t-1} Diag(alpha_t) + k_t^T s_t,  o'_t = scale * q_t hk_t   (gate on the *value* side)
    pass 2  hv_t = Diag(alpha_t) hv_{t-1} + s_t^T v_t,  o_t = softmax(o'_t) hv_t  (the engine: vector gate on
            its key channels, keys s, queries softmax(o'), scale 1)
Pass 2 runs on the engine's Triton chunk kernels. Pass 1 gates the value columns, which the engine's kernels
do not; it runs chunkwise on its own Triton kernels, forward and backward, with the softmax over the slots fused
into its last kernel (gsa_chunk.py; float64 inputs take the PyTorch chunk form): inside a chunk with local
cumulative gates Gc,
    o'_i = scale * [(q_i hk_c) * e^{Gc_i} + sum_{j<=i} (q_i . k_j) s_j * e^{Gc_i - Gc_j}],
    hk_{c+1} = hk_c * e^{Gc_C} + k^T (s * e^{Gc_C - Gc}),
decays taken pairwise and masked before exp, so any g <= 0 is safe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import linear_recurrent
from ..validate import check_choice, check_positive_int, check_qkv, check_scale, check_tensor
from .engine import chunk_gated_linear_attn
from .gsa_chunk import gsa_pass1_forward
from .rwkv7 import affine_scan

FORMS = ("chunk", "recurrent")


def _check(q, k, v, s, g, hk0, hv0):
    B, T, _, H, Hkv, K, V = check_qkv(q, k, v, same_length=True)
    if Hkv != H:
        raise ValueError(f"k and v must have as many heads as q (H={H}), got Hkv={Hkv}")
    check_tensor("s", s, ndim=4, dtypes=(q.dtype, torch.float32), layout="[B, T, H, M]")
    if s.shape[:3] != (B, T, H):
        raise ValueError(f"s must be [B, T, H, M] with (B, T, H) = {(B, T, H)}, got {tuple(s.shape)}")
    M = s.shape[-1]
    check_tensor("g", g, ndim=4, dtypes=(q.dtype, torch.float32), layout="[B, T, H, M]")
    if g.shape != s.shape:
        raise ValueError(f"g must be [B, T, H, M] = {tuple(s.shape)} like s, got {tuple(g.shape)}")
    for name, t, want in (("initial_state_k", hk0, (B, H, K, M)), ("initial_state_v", hv0, (B, H, M, V))):
        if t is not None:
            check_tensor(name, t, ndim=4)
            if t.shape != want:
                raise ValueError(f"{name} must be {want}, got {tuple(t.shape)}")


def _pass1_chunk(q, k, s, g, scale, hk0, C):
    """o'_t = scale * q_t hk_t with hk_t = hk_{t-1} Diag(e^{g_t}) + k_t^T s_t, chunkwise; float32/64."""
    B, T, H, K = q.shape
    M = s.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad = (-T) % C  # padded tokens: g = 0 (no decay) and k = s = 0 (no write), so the state carries over
    N = (T + pad) // C

    def blocks(x):  # [B, T, H, D] -> [B, H, N, C, D]
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, s, g = (blocks(x) for x in (q, k, s, g))
    Gc = g.cumsum(-2)
    last = Gc[..., -1, :]  # [B, H, N, M]
    R = k.transpose(-1, -2) @ (s * torch.exp(last.unsqueeze(-2) - Gc))  # [B, H, N, K, M]
    hs, h = affine_scan(torch.exp(last).unsqueeze(-2), R, q.new_zeros(B, H, K, M) if hk0 is None else hk0.to(acc),
                        matrix=False)  # hk_{c+1} = hk_c * e^{Gc_C} + R_c
    keep = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((Gc.unsqueeze(-2) - Gc.unsqueeze(-3)).masked_fill(~keep.unsqueeze(-1), -float("inf")))
    qk = (q @ k.transpose(-1, -2)).masked_fill(~keep, 0)
    o = (q @ hs) * torch.exp(Gc) + torch.einsum("...ij,...jm,...ijm->...im", qk, s, decay)
    return scale * o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, M)[:, :T], h


def _pass1_recurrent(q, k, s, g, scale, hk0):
    B, T, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, s, g = (x.to(acc) for x in (q, k, s, g))
    h = q.new_zeros(B, H, K, s.shape[-1]) if hk0 is None else hk0.to(acc)
    outs = []
    for t in range(T):
        h = h * torch.exp(g[:, t]).unsqueeze(-2) + k[:, t].unsqueeze(-1) * s[:, t].unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkm->bhm", q[:, t], h))
    return torch.stack(outs, 1), h


def gsa(q, k, v, s, g, *, scale=None, initial_state_k=None, initial_state_v=None, output_final_state=False,
        form="chunk", chunk_size=64):
    """Gated slot attention.

    q, k: `[B, T, H, K]`, v: `[B, T, H, V]`, s: slot write weights `[B, T, H, M]`, g: log forget gate
    `[B, T, H, M]` (<= 0); initial_state_k `[B, H, K, M]`, initial_state_v `[B, H, M, V]`; scale (default
    K^-1/2) multiplies q. Returns o `[B, T, H, V]` in v's dtype, and with `output_final_state` also the final
    states hk `[B, H, K, M]` and hv `[B, H, M, V]` (float32; float64 for float64 inputs).
    `form`: "chunk" (pass 1 on gsa_chunk.py's Triton kernels, pass 2 on the engine's, forward and backward;
    O(T C (K + M) + T M (K + V))) or "recurrent" (token by token: the decode step).
    """
    check_choice("form", form, FORMS)
    check_scale(scale)
    check_positive_int("chunk_size", chunk_size, power_of_two=form == "chunk", minimum=16 if form == "chunk" else 1)
    check_choice("output_final_state", output_final_state, (True, False))
    _check(q, k, v, s, g, initial_state_k, initial_state_v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if form == "chunk":
        if q.dtype == torch.float64:
            ok, hk = _pass1_chunk(q, k, s, g, scale, initial_state_k, chunk_size)
            p = ok.softmax(-1)
        else:
            p, hk = gsa_pass1_forward(q, k, s, g, scale, initial_state_k)  # softmax(o') fused, in q's dtype
        o, hv = chunk_gated_linear_attn(p, s.to(q.dtype), v, g, scale=1.0, initial_state=initial_state_v,
                                        output_final_state=True, chunk_size=chunk_size)
    else:
        ok, hk = _pass1_recurrent(q, k, s, g, scale, initial_state_k)
        acc = ok.dtype
        o, hv = linear_recurrent(ok.softmax(-1), s.to(acc), v.to(acc), g.to(acc), scale=1.0,
                                 initial_state=initial_state_v, output_final_state=True)
    o = o.to(v.dtype)
    return (o, hk, hv) if output_final_state else o


def gsa_reference(q, k, v, s, g, *, scale=None, initial_state_k=None, initial_state_v=None,
                  output_final_state=False, **_ignored):
    """Eq. 74 token by token with the paper's slot-major states K~ `[M, K]`, V~ `[M, V]` (inputs' dtype)."""
    B, T, H, K = q.shape
    M, V = s.shape[-1], v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    Kt = q.new_zeros(B, H, M, K) if initial_state_k is None else initial_state_k.to(q.dtype).transpose(-1, -2)
    Vt = q.new_zeros(B, H, M, V) if initial_state_v is None else initial_state_v.to(q.dtype)
    outs = []
    for t in range(T):
        alpha = torch.exp(g[:, t]).unsqueeze(-1)  # Diag(alpha_t) scales the slot rows
        Kt = alpha * Kt + s[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2)
        Vt = alpha * Vt + s[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        attn = torch.softmax(scale * (Kt @ q[:, t].unsqueeze(-1)).squeeze(-1), dim=-1)  # over the M slots
        outs.append((Vt.transpose(-1, -2) @ attn.unsqueeze(-1)).squeeze(-1))
    o = torch.stack(outs, 1)
    return (o, Kt.transpose(-1, -2), Vt) if output_final_state else o


def gsa_inputs(shape, dtype, device, generator, *, slots=None, initial_state=True, **options):
    """q, k, v plus GSA's gate: g = logsigmoid(x) / 8 and s = 1 - e^g (the paper's tie), M = `slots`
    (default head_dim - 8, off the block sizes)."""
    from ..inputs import randn

    B, T, H, K, V = shape.batch, shape.seq_q, shape.heads, shape.head_dim, shape.Dv
    M = max(1, K - 8) if slots is None else slots
    g = F.logsigmoid(torch.randn((B, T, H, M), generator=generator) + 1) / 8
    out = {"q": randn((B, T, H, K), dtype, device, generator), "k": randn((B, T, H, K), dtype, device, generator),
           "v": randn((B, T, H, V), dtype, device, generator), "s": (1 - torch.exp(g)).to(device=device, dtype=dtype),
           "g": g.to(device=device, dtype=dtype)}
    if initial_state:
        out["initial_state_k"] = randn((B, H, K, M), torch.float32, device, generator, std=0.5)
        out["initial_state_v"] = randn((B, H, M, V), torch.float32, device, generator, std=0.5)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import CHUNKWISE, Method, StateOrCache, register

    register(Method(
        name="gsa", family="linear",
        cite="Zhang et al. 2024, Gated Slot Attention (survey Table 6, forget gate, Eq. 74-75)",
        fn=gsa, reference=gsa_reference,
        make_inputs=partial(with_test_options, partial(gsa_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=CHUNKWISE,
        state_or_cache=StateOrCache("H M (d_k + d_v)", False, lambda sh: sh.heads * max(1, sh.head_dim - 8) *
                                    (sh.head_dim + sh.Dv)),
        forms=FORMS, options={"scale": None, "initial_state_k": None, "initial_state_v": None,
                              "output_final_state": False, "form": "chunk", "chunk_size": 64},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("q", "k", "v", "s", "g", "initial_state_k", "initial_state_v"),
        description="M gated memory slots read by a softmax: two gated linear recurrences with a softmax between"))


_register()
