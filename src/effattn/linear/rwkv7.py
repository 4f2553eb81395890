"""RWKV-7 "Goose" (Peng et al., 2025; survey Table 6, forget gate, and Sec. "RWKV Series"): the generalised
delta rule, a diagonal-plus-rank-one transition with vector decay and in-context learning rate:

    wkv_t = wkv_{t-1} (diag(w_t) - kappa_t^T (alpha_t * kappa_t)) + v_t^T k_t,      o_t = wkv_t r_t

(paper notation: state `[V, K]`, kappa the L2-normalised "removal key", alpha the in-context learning rate).
FLA's operator names the rank-one factors a = -kappa, b = kappa * alpha, takes w in log space (decay
e^{w}, w <= 0) and keeps the state transposed, S = wkv^T `[K, V]`:

    S_t = (diag(e^{w_t}) + b_t a_t^T) S_{t-1} + k_t^T v_t,      o_t = scale * r_t S_t.

The bonus term, group norm and gates of the time-mix block are the layer's (effattn.nn.rwkv_layers).

Chunkwise form (the WY/UT idea for diagonal-plus-low-rank transitions). Inside a chunk of C tokens with
chunk-local cumulative log decays Gc_i = sum_{m<=i} w_m and Gp_i = Gc_i - w_i, name u_t = a_t^T S_{t-1}
`[V]`: then S_t = e^{w_t} S_{t-1} + b_t u_t + k_t^T v_t is a plain vector-gated recurrence with two writes,
and u solves the strictly lower-triangular system (h the state at the chunk start)

    u_i = (a_i e^{Gp_i}) h + sum_{j<i} <a_i, b_j>_ij u_j + sum_{j<i} <a_i, k_j>_ij v_j,
    <x_i, y_j>_ij = sum_d x_id y_jd e^{Gp_id - Gc_jd},

so u = W h + U with W = (I - A_ab)^{-1} (a e^{Gp}), U = (I - A_ab)^{-1} A_ak v. The chunk maps
h -> h' = (diag(e^{Gc_C}) + (b e^{Gc_C - Gc})^T W) h + (b e^{Gc_C - Gc})^T U + (k e^{Gc_C - Gc})^T v and
o = scale [(r e^{Gc} + P_rb W) h + P_rb U + P_rk v] with P_xy[i, j] = sum_d x_id y_jd e^{Gc_id - Gc_jd},
j <= i. Decays are taken pairwise (never e^{-Gc} alone), so any w <= 0 is safe. Everything but the scan
over chunks (a [K, K] x [K, V] product per chunk) runs for all chunks at once; autograd gives the backward
(`chunk_torch`: float64, and the layers on CPU). For 16- and 32-bit inputs the same form runs as Triton
kernels (rwkv7_chunk.py: the per-chunk products for all chunks at once, then the scan with the state in
registers; rwkv7_chunk_bwd.py: a reverse scan for the state gradients, then every input's gradient for all
chunks at once).
`fused_recurrent_rwkv7` is the decoding kernel (Triton, state in registers, no backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import cdiv, next_pow2
from ..validate import check_choice, check_positive_int, check_qkv, check_scale, check_tensor
from .rwkv7_chunk import rwkv7_chunk_forward
from .rwkv7_chunk_bwd import rwkv7_chunk_train

FORMS = ("chunk", "recurrent")


def _check(r, w, k, v, a, b, initial_state):
    B, _, _, H, Hkv, K, V = check_qkv(r, k, v, same_length=True)
    if Hkv != H:
        raise ValueError(f"k and v must have as many heads as r (H={H}), got Hkv={Hkv}")
    for name, t in (("w", w), ("a", a), ("b", b)):
        check_tensor(name, t, ndim=4, dtypes=(r.dtype, torch.float32), layout="[B, T, H, K]")
        if t.shape != r.shape:
            raise ValueError(f"{name} must be [B, T, H, K] = {tuple(r.shape)}, got {tuple(t.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, layout="[B, H, K, V]")
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}")


def pair_decay(x, ys, Gx, Gy, strict: bool):
    """sum_d x_id y_jd e^{Gx_id - Gy_jd} for j <= i (j < i if strict), 0 above, for each y of `ys`: x, y, G
    `[..., C, K]` -> `[..., C, C]` each. The exponent is masked before exp, so no term overflows whatever the
    decays; the `[..., C, C, K]` decay is built once for all ys."""
    C = x.shape[-2]
    keep = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    decay = torch.exp((Gx.unsqueeze(-2) - Gy.unsqueeze(-3)).masked_fill(~keep.unsqueeze(-1), -float("inf")))
    return [torch.einsum("...id,...jd,...ijd->...ij", x, y, decay) for y in ys]


def affine_scan(M, R, h0, *, matrix: bool):
    """States at the start of every chunk under h_{n+1} = M_n h_n + R_n (M_n `[..., N, K, K]` applied as a
    matrix, or `[..., N, K, 1]`-broadcastable and applied elementwise when not `matrix`), R_n `[..., N, K, V]`,
    h_0 `[..., K, V]`. Returns (h_0..h_{N-1} `[..., N, K, V]`, h_N). A Hillis-Steele scan over the affine maps,
    (M2, R2) o (M1, R1) = (M2 M1, M2 R1 + R2): log2(N) batched steps instead of N sequential ones."""
    mul = torch.matmul if matrix else torch.mul
    N, d = M.shape[-3], 1
    while d < N:
        M, R = (torch.cat([M[..., :d, :, :], mul(M[..., d:, :, :], M[..., :-d, :, :])], dim=-3),
                torch.cat([R[..., :d, :, :], mul(M[..., d:, :, :], R[..., :-d, :, :]) + R[..., d:, :, :]], dim=-3))
        d *= 2
    ends = mul(M, h0.unsqueeze(-3)) + R  # h_1..h_N
    return torch.cat([h0.unsqueeze(-3), ends[..., :-1, :, :]], dim=-3), ends[..., -1, :, :]


def chunk_torch(r, w, k, v, a, b, scale, h0, C):
    """The chunkwise form (module docstring) in PyTorch, float32/float64, differentiable by autograd; returns
    o `[B, T, H, V]`, final state. Layers call it directly on CPU, where the Triton forward only has the
    interpreter."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    pad = (-T) % C  # padded tokens have w = a = b = k = v = 0: identity transitions, so the state carries over
    N = (T + pad) // C

    def blocks(x):  # [B, T, H, D] -> [B, H, N, C, D]
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    r, w, k, v, a, b = (blocks(x) for x in (r, w, k, v, a, b))
    Gc = w.cumsum(-2)
    Gp = Gc - w
    A_ab, A_ak = pair_decay(a, (b, k), Gp, Gc, strict=True)
    eye = torch.eye(C, dtype=acc, device=r.device)
    Wu = torch.linalg.solve_triangular(eye - A_ab, torch.cat([a * torch.exp(Gp), A_ak @ v], -1), upper=False,
                                       unitriangular=True)
    W, U = Wu.split([K, V], -1)
    last = Gc[..., -1:, :]  # [B, H, N, 1, K]
    bd, kd = b * torch.exp(last - Gc), k * torch.exp(last - Gc)
    M = torch.diag_embed(torch.exp(last.squeeze(-2))) + bd.transpose(-1, -2) @ W  # [B, H, N, K, K]
    R = bd.transpose(-1, -2) @ U + kd.transpose(-1, -2) @ v  # [B, H, N, K, V]
    hs, h = affine_scan(M, R, r.new_zeros(B, H, K, V) if h0 is None else h0.to(acc), matrix=True)
    P_rb, P_rk = pair_decay(r, (b, k), Gc, Gc, strict=False)
    o = scale * ((r * torch.exp(Gc) + P_rb @ W) @ hs + P_rb @ U + P_rk @ v)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o, h


def _recurrent(r, w, k, v, a, b, scale, h0):
    """Token by token in the `[K, V]` state convention (the decode step); float32/float64 accumulation."""
    B, T, H, K = r.shape
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (x.to(acc) for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, K, v.shape[-1]) if h0 is None else h0.to(acc)
    outs = []
    for t in range(T):
        aS = torch.einsum("bhk,bhkv->bhv", a[:, t], S)  # a_t^T S_{t-1}, read before the decay
        S = (torch.exp(w[:, t]).unsqueeze(-1) * S + b[:, t].unsqueeze(-1) * aS.unsqueeze(-2)
             + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2))
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    return torch.stack(outs, 1), S


@triton.jit
def _fused_recurrent_rwkv7(r, w, k, v, a, b, o, h0, ht, T, scale, H: tl.constexpr, K: tl.constexpr,
                           V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                           STORE_HT: tl.constexpr):
    """One program per (value block, sequence, head): its `[K, BV]` slice of S stays in registers for all T
    tokens; the rank-one term needs a_t^T S_{t-1} over all K rows, which the slice holds (V is split, K not)."""
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    p_kv = ((i_b * H + i_h) * K + ok[:, None]) * V + ov[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + p_kv, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    for t in range(T):
        base = (i_b * T + t) * H + i_h
        b_r = tl.load(r + base * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_w = tl.load(w + base * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(k + base * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_a = tl.load(a + base * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_b = tl.load(b + base * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + base * V + ov, mask=mv, other=0.0).to(tl.float32)
        b_sa = tl.sum(b_a[:, None] * b_h, 0)  # a_t^T S_{t-1}, before the decay
        b_h = b_h * tl.exp(b_w)[:, None] + b_b[:, None] * b_sa[None, :] + b_k[:, None] * b_v[None, :]
        tl.store(o + base * V + ov, (tl.sum(b_r[:, None] * b_h, 0) * scale).to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + p_kv, b_h.to(ht.dtype.element_ty), mask=mk[:, None] & mv[None, :])


def fused_recurrent_rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False):
    """The RWKV-7 recurrence token by token in one Triton kernel, for decoding (inference: no autograd).

    Same arguments and returns as `rwkv7` (r, w, k, a, b `[B, T, H, K]`, v `[B, T, H, V]`, initial_state
    `[B, H, K, V]`; the final state is float32). Time O(T K V), state O(K V) per head, read and written once.
    """
    check_scale(scale)
    check_choice("output_final_state", output_final_state, (True, False))
    _check(r, w, k, v, a, b, initial_state)
    if r.dtype == torch.float64:
        raise TypeError("fused_recurrent_rwkv7 computes in float32: pass float16/bfloat16/float32 tensors")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (r, w, k, v, a, b, initial_state)):
        raise ValueError("fused_recurrent_rwkv7 is for decoding and has no backward; inputs require grad: use "
                         "rwkv7 for training (or call under torch.no_grad())")
    B, T, H, K = r.shape
    V = v.shape[-1]
    o = empty_output((B, T, H, V), v.dtype, v.device)
    ht = empty_output((B, H, K, V), torch.float32, v.device) if output_final_state else None
    BV = min(32, max(16, next_pow2(V)))
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    _fused_recurrent_rwkv7[(cdiv(V, BV), B, H)](
        c(r), c(w), c(k), c(v), c(a), c(b), o, c(initial_state), ht, T, 1.0 if scale is None else float(scale),
        H=H, K=K, V=V, BK=max(16, next_pow2(K)), BV=BV, USE_H0=initial_state is not None,
        STORE_HT=output_final_state)
    return (o, ht) if output_final_state else o


def rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False, form="chunk",
          chunk_size=16):
    """RWKV-7 time mixing (the generalised delta rule), FLA's argument order and names.

    r, k, a, b: `[B, T, H, K]`, w: log decay `[B, T, H, K]` (<= 0), v: `[B, T, H, V]`; initial_state
    `[B, H, K, V]`; scale multiplies the output (default 1, as in the paper). Returns o `[B, T, H, V]` in v's
    dtype (and the final state `[B, H, K, V]`, float32 (float64 for float64 inputs), with `output_final_state`).
    `form`: "chunk" (chunkwise WY form, O(T C K (C + V) + T K^2 + T K V), memory O(T C K); for chunk sizes that
    are powers of two >= 16 Triton kernels, forward and backward (the backward keeps the state at every chunk's
    start, T / C x K x V floats a head); float64 in PyTorch under autograd) or "recurrent" (the decode step,
    token by token). Paper notation: a = -kappa, b = kappa * alpha (in-context learning rate).
    """
    check_choice("form", form, FORMS)
    check_scale(scale)
    check_positive_int("chunk_size", chunk_size)
    check_choice("output_final_state", output_final_state, (True, False))
    _check(r, w, k, v, a, b, initial_state)
    scale = 1.0 if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (r, w, k, v, a, b, initial_state))
    if form == "chunk" and r.dtype != torch.float64 and chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0:
        run = rwkv7_chunk_train if needs_grad else rwkv7_chunk_forward
        o, state = run(r, w, k, v, a, b, scale, initial_state, chunk_size)
    elif form == "chunk":
        o, state = chunk_torch(r, w, k, v, a, b, scale, initial_state, chunk_size)
    else:
        o, state = _recurrent(r, w, k, v, a, b, scale, initial_state)
    o = o.to(v.dtype)
    return (o, state) if output_final_state else o


def rwkv7_reference(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False, **_ignored):
    """The paper's recurrence in its own layout, wkv `[V, K]`: wkv_t = wkv_{t-1} (diag(e^{w_t}) + a_t^T b_t)
    + v_t^T k_t, o_t = wkv_t r_t. Inputs' dtype (float64 for ground truth); the state is returned as
    wkv^T `[B, H, K, V]` like the fast forms."""
    B, T, H, K = r.shape
    scale = 1.0 if scale is None else scale
    wkv = r.new_zeros(B, H, v.shape[-1], K) if initial_state is None else initial_state.to(r.dtype).transpose(-1, -2)
    outs = []
    for t in range(T):
        transition = torch.diag_embed(torch.exp(w[:, t])) + a[:, t].unsqueeze(-1) * b[:, t].unsqueeze(-2)
        wkv = wkv @ transition + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2)
        outs.append(scale * (wkv @ r[:, t].unsqueeze(-1)).squeeze(-1))
    o = torch.stack(outs, 1)
    return (o, wkv.transpose(-1, -2)) if output_final_state else o


def rwkv7_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """RWKV-7's own parameterisation: kappa L2-normalised, alpha in (0, 1), a = -kappa, b = kappa * alpha,
    w = -e^{-1/2} sigmoid(x) (the model's decay range), plus r, k, v and a state."""
    from ..inputs import randn

    B, T, H, K, V = shape.batch, shape.seq_q, shape.heads, shape.head_dim, shape.Dv
    kappa = F.normalize(torch.randn((B, T, H, K), generator=generator), dim=-1)
    alpha = torch.sigmoid(torch.randn((B, T, H, K), generator=generator))
    w = -0.6065 * torch.sigmoid(torch.randn((B, T, H, K), generator=generator) + 1)
    out = {"r": randn((B, T, H, K), dtype, device, generator), "w": w.to(device=device, dtype=dtype),
           "k": randn((B, T, H, K), dtype, device, generator, std=K ** -0.5),
           "v": randn((B, T, H, V), dtype, device, generator),
           "a": (-kappa).to(device=device, dtype=dtype), "b": (kappa * alpha).to(device=device, dtype=dtype)}
    if initial_state:
        out["initial_state"] = randn((B, H, K, V), torch.float32, device, generator, std=0.5)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import MATRIX_STATE, Complexity, Method, register

    register(Method(
        name="rwkv7", family="linear",
        cite="Peng et al. 2025, RWKV-7 \"Goose\" with expressive dynamic state evolution (survey Table 6, forget gate)",
        fn=rwkv7, reference=rwkv7_reference,
        make_inputs=partial(with_test_options, partial(rwkv7_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=Complexity("O(N C d + N d^2)", "O(N C d + N/C d^2)", 1.0, 1.0),
        state_or_cache=MATRIX_STATE,
        forms=FORMS, options={"scale": None, "initial_state": None, "output_final_state": False, "form": "chunk",
                              "chunk_size": 16},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("r", "w", "k", "v", "a", "b", "initial_state"),
        description="generalised delta rule: diagonal vector decay plus rank-one a b^T transition, in-context "
                    "learning rate"))


_register()
