"""TTT-Linear and TTT-MLP (Sun et al., 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States"; survey Sec. 7.7, Eqs. 92-93, test-time training).

The hidden state is the weights W of an inner model, trained while the sequence is read on the
self-supervised multi-view reconstruction loss of the paper (Sec. 2.3; the 1/2 as in the authors' code)

    f(x; W) = x + LN(f_res(x; W)),          l(W; t) = 1/2 || f(k_t; W) - v_t ||^2       (k = theta_K x, v = theta_V x)
    f_res:  TTT-Linear  x W + b;            TTT-MLP  GELU(x W1 + b1) W2 + b2            (tanh GELU, hidden F)

LN (with the residual, Sec. 2.7) is a per-head LayerNorm with learnable weight and bias: outer parameters. Mini-batch
gradient descent (paper Sec. 2.4): with t' the first token of t's mini-batch of b tokens and i = t - t',

    W_t = W_{t'} - c_i sum_{s=t'}^{t} eta_s grad_W l(W_{t'}; s),     z_t = f(q_t; W_t),

and the next mini-batch starts from the last W_t of this one. eta_s `[B, T, H]` is the inner learning rate per
token and head (the layer makes it data-dependent: base_lr * sigmoid(x theta_lr) / d); c_i = 1/(i+1) averages the
gradients seen so far in the mini-batch (the authors' `token_idx`); `token_weights` `[b]` replaces it (ones: the plain
sum; the layer learns an offset to 1/(i+1), as the authors' code does).

The state `[B, H, 2, P]` keeps what decoding needs to continue a mini-batch: [:, :, 0] the inner parameters at the
last mini-batch boundary W_{t'} and [:, :, 1] the pending sum sum_s eta_s grad l(W_{t'}; s) of the unfinished
mini-batch (zero at a boundary). Each linear map is stored with its bias appended as a last row (x W + b =
[x, 1] W~) and flattened: P = (d+1) d (linear) or (d+1) F + (F+1) d (MLP). `offset` is the position of the first
token in the stream (only offset % b matters), so a call may start and end mid-mini-batch.

Forms (the layer norm inside the inner loop maps to no linear-engine gate; "fused", TTT-Linear's dual form on
Triton kernels, a sequential walk over the mini-batches and parallel passes, is in ttt_fused.py):
- "primal": every token's W_t materialised, O(b d^2) memory per token of a mini-batch.
- "dual" (paper Sec. 2.5): per mini-batch with matmuls only, W_t never formed:
      Z_bar = X~q W~_{t'} - c * (X~q A + (tril(X~q X~k^T) * eta) G),    A' = A + X~k^T (eta * G),
  where G = dl/dZ at the mini-batch's keys, X~ = [X, 1]. The same for each layer of the MLP.
The reference runs the primal mini-batch loop with the inner gradients from autograd, not the analytic ones.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._triton_mode import can_run_triton
from ..validate import check_choice, check_positive_int, check_qkv, check_tensor
from .ttt_fused import LN_EPS, fused_fits, ttt_linear_fused

FORMS = ("fused", "dual", "primal")  # "fused": TTT-Linear only


# ------------------------------------------------------------------------------------------- state packing
def param_shapes(model: str, d: int, hidden: int | None = None) -> list[tuple[int, int]]:
    """Shapes of the inner model's bias-augmented matrices W~ (`[in + 1, out]` each)."""
    return [(d + 1, d)] if model == "linear" else [(d + 1, hidden), (hidden + 1, d)]


def state_size(model: str, d: int, hidden: int | None = None) -> int:
    return sum(a * b for a, b in param_shapes(model, d, hidden))


def pack_state(params, pending=None) -> torch.Tensor:
    """`[B, H, 2, P]` from the inner matrices W~ `[B, H, in + 1, out]` (and the pending sums, default zero)."""
    flat = torch.cat([p.flatten(2) for p in params], dim=-1)
    rest = torch.zeros_like(flat) if pending is None else torch.cat([p.flatten(2) for p in pending], dim=-1)
    return torch.stack([flat, rest], dim=2)


def unpack_state(state: torch.Tensor, shapes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of `pack_state`: (W~ list, pending list), each `[B, H, in + 1, out]`."""
    sizes = [a * b for a, b in shapes]
    out = []
    for row in (state[:, :, 0], state[:, :, 1]):
        out.append([p.unflatten(-1, s) for p, s in zip(row.split(sizes, dim=-1), shapes)])
    return out[0], out[1]


def mlp_hidden(state: torch.Tensor, d: int) -> int:
    """F from a TTT-MLP state: P = (d+1) F + (F+1) d."""
    P = state.shape[-1]
    if (P - d) % (2 * d + 1) or P <= d:
        raise ValueError(f"initial_state's last dim P={P} is no TTT-MLP size (d+1) F + (F+1) d for d={d}")
    return (P - d) // (2 * d + 1)


# --------------------------------------------------------------------------------- analytic inner gradients
def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _ln(z, w, b):
    mu = z.mean(-1, keepdim=True)
    std = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + LN_EPS)
    xhat = (z - mu) / std
    return xhat * w + b, xhat, std


def _ln_l2_grad(z, target, w, b):
    """d/dz of 1/2 |LN(z) - target|^2: the layer norm's backward written out (LN y = w xhat + b)."""
    y, xhat, std = _ln(z, w, b)
    gx = (y - target) * w
    D = z.shape[-1]
    return (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).sum(-1, keepdim=True) / D) / std


def _gelu_grad(x):
    """Derivative of the tanh GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _key_grads(params, k, target, w, b):
    """Per token: the inputs X~ of each inner linear map at the keys and G = dl/dZ of its output."""
    xs, zs = [_aug(k)], []
    for i, p in enumerate(params):
        zs.append(xs[-1] @ p)
        if i + 1 < len(params):
            xs.append(_aug(F.gelu(zs[-1], approximate="tanh")))
    gs = [_ln_l2_grad(zs[-1], target, w, b)]
    for i in range(len(params) - 1, 0, -1):  # back through GELU to the previous map's output
        gs.insert(0, (gs[0] @ params[i][..., :-1, :].transpose(-1, -2)) * _gelu_grad(zs[i - 1]))
    return xs, gs


def _dual_map(xq, xk, p, pend, g, eta, c):
    """One inner map over a segment, dual form: xq, xk `[B, H, n, in + 1]`, g `[B, H, n, out]`, eta, c."""
    att = torch.tril(xq @ xk.transpose(-1, -2)) * eta.unsqueeze(-2)  # eta_s (x~q_t . x~k_s), s <= t
    z = xq @ p - c.unsqueeze(-1) * (xq @ pend + att @ g)
    return z, pend + xk.transpose(-1, -2) @ (eta.unsqueeze(-1) * g)


def _primal_map(xq, xk, p, pend, g, eta, c):
    """Same map, primal form: W~_t = W~_{t'} - c_t (A + sum_{s<=t} eta_s x~k_s^T g_s) formed for every t."""
    upd = pend.unsqueeze(2) + torch.cumsum((eta.unsqueeze(-1) * xk).unsqueeze(-1) * g.unsqueeze(-2), dim=2)
    w_t = p.unsqueeze(2) - c[..., None, None] * upd
    return (xq.unsqueeze(-2) @ w_t).squeeze(-2), upd[:, :, -1]


def _segment(map_fn, params, pend, q, k, v, eta, c, w, b):
    """Tokens of one (possibly partial) mini-batch: outputs z and the new pending sums."""
    xk, gs = _key_grads(params, k, v - k, w, b)
    x, new = _aug(q), []
    for i, (p, a, g) in enumerate(zip(params, pend, gs)):
        z, a2 = map_fn(x, xk[i], p, a, g, eta, c)
        new.append(a2)
        if i + 1 < len(params):
            x = _aug(F.gelu(z, approximate="tanh"))
    return q + _ln(z, w, b)[0], new


def _token_coeffs(b: int, token_weights, like: torch.Tensor) -> torch.Tensor:
    """c_i, i < b: 1 / (i + 1) or the given weights."""
    if token_weights is not None:
        return token_weights.to(like.dtype)
    return _default_coeffs(b, like.dtype, like.device)


@functools.lru_cache(maxsize=32)
def _default_coeffs(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 / (i + 1), i < b (made once per size, dtype and device: a call reads it, never writes it)."""
    return 1.0 / torch.arange(1, b + 1, dtype=dtype, device=device)


def _scan(segment_fn, params, pend, q, k, v, eta, b, offset, token_weights):
    """Walk the sequence in segments that end at mini-batch boundaries; q, k, v `[B, H, T, d]`, eta `[B, H, T]`."""
    T, pos, start, outs = q.shape[2], offset % b, 0, []
    coeff = _token_coeffs(b, token_weights, q)
    while start < T:
        n = min(b - pos, T - start)
        sl = slice(start, start + n)
        z, pend = segment_fn(params, pend, q[:, :, sl], k[:, :, sl], v[:, :, sl], eta[:, :, sl], coeff[pos:pos + n])
        outs.append(z)
        if pos + n == b:  # mini-batch complete: W_{t'+b} = W_{t'} - c_{b-1} A, nothing pending
            params = [p - coeff[-1] * a for p, a in zip(params, pend)]
            pend = [torch.zeros_like(a) for a in pend]
        pos, start = (pos + n) % b, start + n
    return torch.cat(outs, dim=2), params, pend


# ------------------------------------------------------------------------------------------- public functions
def _check(q, k, v, eta, ln_weight, ln_bias, initial_state, mini_batch_size, offset, token_weights, form, model):
    B, T, _, H, Hkv, D, Dv = check_qkv(q, k, v, same_length=True)
    if Hkv != H or Dv != D:
        raise ValueError(f"TTT needs k, v with the heads and head dim of q ([B, T, H={H}, D={D}]: the inner model "
                         f"f(x) = x + LN(.) is residual), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_tensor("eta", eta, ndim=3, layout="[B, T, H]")
    if eta.shape != (B, T, H):
        raise ValueError(f"eta must be [B, T, H] = {(B, T, H)}, got {tuple(eta.shape)}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, ndim=2, layout="[H, D]")
        if t.shape != (H, D):
            raise ValueError(f"{name} must be [H, D] = {(H, D)}, got {tuple(t.shape)}")
    check_positive_int("mini_batch_size", mini_batch_size)
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, layout="[mini_batch_size]")
        if token_weights.shape[0] != mini_batch_size:
            raise ValueError(f"token_weights must be [mini_batch_size={mini_batch_size}], "
                             f"got {tuple(token_weights.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (tokens already seen), got {offset!r}")
    check_choice("form", form, FORMS if model == "linear" else FORMS[1:])
    if initial_state is None:
        if model == "mlp":
            raise ValueError("ttt_mlp needs initial_state [B, H, 2, P] (an all-zero MLP never learns)")
        return None
    check_tensor("initial_state", initial_state, ndim=4, layout="[B, H, 2, P]")
    hidden = mlp_hidden(initial_state, D) if model == "mlp" else None
    P = state_size(model, D, hidden)
    if initial_state.shape != (B, H, 2, P):
        raise ValueError(f"initial_state must be [B, H, 2, P] = {(B, H, 2, P)}, got {tuple(initial_state.shape)}")
    return hidden


def _run(model, q, k, v, eta, ln_weight, ln_bias, initial_state, mini_batch_size, offset, token_weights, form,
         output_final_state):
    hidden = _check(q, k, v, eta, ln_weight, ln_bias, initial_state, mini_batch_size, offset, token_weights, form,
                    model)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # the inner loop runs in float32
    B, T, H, D = q.shape
    shapes = param_shapes(model, D, hidden)
    state = (torch.zeros(B, H, 2, state_size(model, D), dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    params, pend = unpack_state(state, shapes)
    b = mini_batch_size
    # "fused": the Triton kernels from the first mini-batch boundary; the tokens before it (the rest of a
    # mini-batch begun before this call) take the dual form
    fused = form == "fused" and acc == torch.float32 and can_run_triton(q) and fused_fits(D, b)
    lead = (min(T, b - offset % b) if offset % b else 0) if fused else T
    outs = []
    if lead:
        w, bias = (t.to(acc)[None, :, None] for t in (ln_weight, ln_bias))
        map_fn = _primal_map if form == "primal" else _dual_map

        def segment(params, pend, q_, k_, v_, eta_, c):
            return _segment(map_fn, params, pend, q_, k_, v_, eta_, c, w, bias)

        qh, kh, vh = (t[:, :lead].to(acc).transpose(1, 2) for t in (q, k, v))
        z, params, pend = _scan(segment, params, pend, qh, kh, vh, eta[:, :lead].to(acc).transpose(1, 2), b, offset,
                                token_weights)
        outs.append(z.transpose(1, 2).to(q.dtype))
    if lead < T:
        coeffs = _token_coeffs(b, token_weights, state)
        p0 = pend[0] if initial_state is not None and not lead else None  # (after a head segment: zero)
        o, w_end, pending = ttt_linear_fused(q[:, lead:], k[:, lead:], v[:, lead:], eta[:, lead:], ln_weight,
                                             ln_bias, params[0], p0, coeffs, b)
        outs.append(o)
        params, pend = [w_end], [pending]
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return (o, pack_state(params, pend)) if output_final_state else o


def ttt_linear(q, k, v, eta, ln_weight, ln_bias, *, initial_state=None, mini_batch_size=16, offset=0,
               token_weights=None, form="fused", output_final_state=False):
    """TTT-Linear: q, k, v `[B, T, H, D]`; eta: inner learning rate `[B, T, H]`; ln_weight, ln_bias: the inner
    model's LayerNorm `[H, D]`; initial_state `[B, H, 2, (D+1) D]` (module docstring; default zeros);
    mini_batch_size b; offset: tokens of the stream before q (decoding); token_weights: c_i `[b]` (default
    1 / (i + 1)). Returns o `[B, T, H, D]` (and the final
    state, float32, with `output_final_state`). Time O(T b D + T D^2) ("fused", "dual"), state O(D^2) per head.
    form "fused": Triton kernels (ttt_fused.py) for 16/32-bit inputs on CUDA (or the interpreter) with D <= 64
    and b <= 64, or D <= 128 and b <= 32; otherwise, and for the tokens of a mini-batch begun before the call,
    "dual"."""
    return _run("linear", q, k, v, eta, ln_weight, ln_bias, initial_state, mini_batch_size, offset, token_weights,
                form, output_final_state)


def ttt_mlp(q, k, v, eta, ln_weight, ln_bias, *, initial_state=None, mini_batch_size=16, offset=0,
            token_weights=None, form="dual", output_final_state=False):
    """TTT-MLP: as `ttt_linear` with the inner model GELU(x W1 + b1) W2 + b2; initial_state `[B, H, 2, P]`,
    P = (D+1) F + (F+1) D (F, the hidden width, read from P; required). Time O(T b F + T D F)."""
    return _run("mlp", q, k, v, eta, ln_weight, ln_bias, initial_state, mini_batch_size, offset, token_weights,
                form, output_final_state)


# ------------------------------------------------------------------------------------------------- reference
def _ref_f_res(params, x):
    h = x  # [B, H, n, d]: each token with its own weights, params [B, H, n, in + 1, out]
    for i, p in enumerate(params):
        h = (h.unsqueeze(-2) @ p[..., :-1, :]).squeeze(-2) + p[..., -1, :]
        if i + 1 < len(params):
            h = F.gelu(h, approximate="tanh")
    return h


def _ref_f(params, x, w, b):
    z = _ref_f_res(params, x)
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return x + (z - mu) / torch.sqrt(var + LN_EPS) * w + b


def _reference(model, q, k, v, eta, ln_weight, ln_bias, *, initial_state=None, mini_batch_size=16, offset=0,
               token_weights=None, output_final_state=False, **_ignored):
    """The paper's mini-batch gradient descent in the inputs' dtype. Per mini-batch (or the part of it in this
    call), every token's gradient G_s = grad_W l(W_{t'}; s) comes from autograd (each token differentiates its
    own copy of W_{t'}; create_graph, so outer gradients see through the inner loop), then token by token
    W_t = W_{t'} - c_i sum_{s<=t} eta_s G_s and z_t = f(q_t; W_t)."""
    B, T, H, D = q.shape
    hidden = None if model == "linear" else mlp_hidden(initial_state, D)
    shapes = param_shapes(model, D, hidden)
    state = (q.new_zeros(B, H, 2, state_size(model, D)) if initial_state is None else initial_state.to(q.dtype))
    anchor, pend = unpack_state(state, shapes)  # W_{t'} and sum_s eta_s G_s so far in this mini-batch
    w, b = ln_weight.to(q.dtype)[:, None], ln_bias.to(q.dtype)[:, None]
    qh, kh, vh, eh = (t.transpose(1, 2) for t in (q, k, v, eta))  # [B, H, T, ...]
    outs, t = [], 0
    while t < T:
        i0 = (offset + t) % mini_batch_size
        n = min(mini_batch_size - i0, T - t)  # tokens of this mini-batch in the call
        with torch.enable_grad():
            copies = [p.unsqueeze(2).expand(B, H, n, *p.shape[2:]) for p in anchor]
            probes = [torch.zeros_like(c, requires_grad=True) for c in copies]
            at = [c + z for c, z in zip(copies, probes)]  # d/d probe_s = grad of token s at W_{t'}
            loss = 0.5 * ((_ref_f(at, kh[:, :, t:t + n], w, b) - vh[:, :, t:t + n]) ** 2).sum()
            grads = torch.autograd.grad(loss, probes, create_graph=True)
        c = (torch.tensor([1.0 / (i + 1) for i in range(i0, i0 + n)], dtype=q.dtype, device=q.device)
             if token_weights is None else token_weights.to(q.dtype)[i0:i0 + n])[:, None, None]  # c_i
        steps = [eh[:, :, t:t + n, None, None] * g for g in grads]  # eta_s G_s
        acc = [a.unsqueeze(2) + torch.cumsum(e, dim=2) for a, e in zip(pend, steps)]  # sum_{s<=t} eta_s G_s
        w_t = [p.unsqueeze(2) - c * a for p, a in zip(anchor, acc)]  # W_t = W_{t'} - c_i sum_{s<=t} eta_s G_s
        outs.append(_ref_f(w_t, qh[:, :, t:t + n], w, b))
        pend = [a[:, :, -1] for a in acc]
        if i0 + n == mini_batch_size:  # the mini-batch is complete: the next starts from its last W_t
            anchor, pend = [x[:, :, -1] for x in w_t], [torch.zeros_like(a) for a in pend]
        t += n
    o = torch.cat(outs, dim=2).transpose(1, 2)
    return (o, pack_state(anchor, pend)) if output_final_state else o


def ttt_linear_reference(q, k, v, eta, ln_weight, ln_bias, **kwargs):
    return _reference("linear", q, k, v, eta, ln_weight, ln_bias, **kwargs)


def ttt_mlp_reference(q, k, v, eta, ln_weight, ln_bias, **kwargs):
    return _reference("mlp", q, k, v, eta, ln_weight, ln_bias, **kwargs)


def ttt_inputs(shape, dtype, device, generator, *, model="linear", hidden=None, pending=True, **options):
    """q, k, v `[B, T, H, D]` (q, k at unit RMS / sqrt(D) scale as after the layer's projections), eta =
    sigmoid(N(0, 1)) / D, LN weight ~ 1 and bias ~ 0 with noise, a random initial state (weights std 0.1; with
    `pending` a pending sum as mid-mini-batch), the paper's mini_batch_size 16 and offset 5, so the first and last
    mini-batches of a call are partial, token weights (0.5 .. 1.5) / (i + 1); TTT-MLP's hidden width 4D."""
    from ..inputs import randn

    B, T, H, D = shape.batch, shape.seq_q, shape.heads, shape.head_dim
    hidden = 4 * D if hidden is None and model == "mlp" else hidden
    P = state_size(model, D, hidden)
    state = randn((B, H, 2, P), torch.float32, device, generator, std=0.1)
    if not pending:
        state[:, :, 1] = 0
    out = {"q": randn((B, T, H, D), dtype, device, generator), "k": randn((B, T, H, D), dtype, device, generator),
           "v": randn((B, T, H, D), dtype, device, generator),
           "eta": (torch.sigmoid(torch.randn((B, T, H), generator=generator)) / D).to(device=device, dtype=dtype),
           "ln_weight": (1 + 0.1 * torch.randn((H, D), generator=generator)).to(device=device, dtype=dtype),
           "ln_bias": (0.1 * torch.randn((H, D), generator=generator)).to(device=device, dtype=dtype),
           "initial_state": state, "mini_batch_size": 16, "offset": 5,
           "token_weights": ((torch.rand(16, generator=generator) + 0.5) / torch.arange(1, 17)).to(device)}
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..registry import Complexity, Method, StateOrCache, register

    common = {"family": "linear", "supports": frozenset({"causal", "backward", "decode", "state"}),
              "grad_inputs": ("q", "k", "v", "eta", "ln_weight", "ln_bias", "initial_state", "token_weights")}
    opts = {"initial_state": None, "mini_batch_size": 16, "offset": 0, "token_weights": None,
            "output_final_state": False}
    cite = ("Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States "
            "(survey Sec. 7.7, Eqs. 92-93, test-time training)")
    register(Method(
        name="ttt_linear", cite=cite, fn=ttt_linear, reference=ttt_linear_reference,
        make_inputs=partial(ttt_inputs, output_final_state=True),
        complexity=Complexity("O(N b d + N d^2)", "O(N d + N/b d^2)", 1.0, 1.0),
        state_or_cache=StateOrCache("2 H (d + 1) d", False, lambda s: 2 * s.heads * (s.head_dim + 1) * s.head_dim),
        forms=FORMS, options={**opts, "form": "fused"},
        description="inner linear model + LayerNorm trained by mini-batch GD on reconstruction; Triton dual form",
        **common))
    register(Method(
        name="ttt_mlp", cite=cite, fn=ttt_mlp, reference=ttt_mlp_reference,
        make_inputs=partial(ttt_inputs, model="mlp", output_final_state=True),
        complexity=Complexity("O(N b F + N d F)", "O(N d + N/b d F)", 1.0, 1.0),
        state_or_cache=StateOrCache("2 H (2 d F + F + d), F = 4d", False,
                                    lambda s: 2 * s.heads * state_size("mlp", s.head_dim, 4 * s.head_dim)),
        forms=FORMS[1:], options={**opts, "form": "dual"},
        description="inner 2-layer GELU MLP + LayerNorm trained by mini-batch GD on reconstruction", **common))


_register()
