"""RWKV time-mix layers (survey Table 6, forget gate): RWKV-6 "Finch" and RWKV-7 "Goose".

Both mix each token with the previous one (token shift: xx_t = x_{t-1} - x_t, x_{-1} from the cache or 0),
project r, k, v, a decay w and gates from the mixed inputs, run the WKV operator on a matrix state per head,
normalise per head (GroupNorm, eps 64e-5 as in the RWKV code) and gate the output:

    RWKV6  data-dependent lerp x + xx * (mu + tanh((x + xx mu_x) A) B), decay w = -exp(w0 + tanh(x_w W1) W2),
           WKV with bonus u (effattn.linear.rwkv6), output silu(x_g W_g) * GroupNorm(o)
    RWKV7  static lerps x + xx mu, decay w = -e^{-1/2} sigmoid(.) via -exp(-softplus(-(w0 + tanh(x_w W1) W2)) - 1/2),
           in-context learning rate alpha = sigmoid(a0 + x_a A1 A2), removal key kappa = normalize(k * k_k),
           k <- k (1 + (alpha - 1) k_a), generalised delta rule (effattn.linear.rwkv7) with a = -kappa,
           b = kappa * alpha, bonus ((r * k * r_k).sum) v after the norm, output gate sigmoid(x_g G1) G2.
           This is the first layer's form: the value residual to the first layer's v (layers > 0 of the
           paper) needs the model to pass v_first and is not part of a single layer.

Caches hold the state `[B, H, K, V]`, the last token `[B, dim]` (token shift) and the offset. RWKV6 runs rwkv6's
chunk form (the engine's kernels and the fused epilogue; on CPU under Triton's interpreter the PyTorch chunk form
through `effattn.nn.recurrence`); RWKV7 the chunkwise rwkv7 form (likewise the PyTorch one on CPU), and its
one-token steps without autograd the fused recurrent decoding kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..linear.rwkv6 import read_before_write, rwkv6
from .._triton_mode import interpreting
from ..linear.rwkv7 import chunk_torch as rwkv7_chunk_torch
from ..linear.rwkv7 import fused_recurrent_rwkv7, rwkv7
from ..validate import check_positive_int
from .common import CachedLayer, layer_dims, split_heads
from .recurrence import gated_recurrence


def _shift(x: torch.Tensor, cache: dict | None) -> torch.Tensor:
    """xx_t = x_{t-1} - x_t, the previous token of the first one taken from the cache (zeros at the start)."""
    last = x.new_zeros(x.shape[0], 1, x.shape[2]) if cache is None else cache["shift"].to(x.dtype).unsqueeze(1)
    return torch.cat([last, x[:, :-1]], dim=1) - x


def _acc(x: torch.Tensor) -> torch.dtype:
    """The decay's dtype: at least float32 (its exp of an exp loses bf16's few bits), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def _lowrank(dim_in: int, rank: int, dim_out: int, std: float = 0.1) -> tuple[nn.Parameter, nn.Parameter]:
    """Small random factors (not zero, so both receive gradients from the first step)."""
    return (nn.Parameter(torch.randn(dim_in, rank) * std * dim_in ** -0.5),
            nn.Parameter(torch.randn(rank, dim_out) * std * rank ** -0.5))


class _TimeMix(CachedLayer):
    cache_keys = ("state", "shift")

    def __init__(self, dim: int, heads: int, head_dim: int | None) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = layer_dims(dim, heads, head_dim)
        inner = heads * self.head_dim
        self.r_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        self.ln_x = nn.GroupNorm(heads, inner, eps=64e-5)
        # w0: log(-log decay) from -6 (slow) to -1 (fast) across channels, as RWKV's decay_speed
        self.w0 = nn.Parameter(torch.linspace(-6.0, -1.0, inner))

    def _norm(self, o: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        return self.ln_x(o.reshape(B * T, -1)).view(B, T, -1)


class RWKV6TimeMix(_TimeMix):
    """RWKV-6 "Finch" time mixing (Peng et al., 2024, Eagle and Finch): data-dependent token-shift lerps
    (rank `mix_rank`), data-dependent decay (rank `decay_rank`), bonus u, GroupNorm, silu output gate."""

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, mix_rank: int = 32,
                 decay_rank: int = 64) -> None:
        super().__init__(dim, heads, head_dim)
        inner = self.heads * self.head_dim
        check_positive_int("mix_rank", mix_rank)
        self.mu_x = nn.Parameter(torch.rand(dim) * 0.5)
        self.mu = nn.Parameter(torch.rand(5, dim) * 0.5)  # w, k, v, r, g
        self.mix_w1 = nn.Parameter(torch.randn(dim, 5 * mix_rank) * 0.1 * dim ** -0.5)
        self.mix_w2 = nn.Parameter(torch.randn(5, mix_rank, dim) * 0.1 * mix_rank ** -0.5)
        self.decay_w1, self.decay_w2 = _lowrank(dim, check_positive_int("decay_rank", decay_rank), inner)
        self.u = nn.Parameter(torch.randn(heads, self.head_dim) * 0.1)  # RWKV's time_faaaa
        self.g_proj = nn.Linear(dim, inner, bias=False)

    def _run(self, x, cache):
        B, T, _ = x.shape
        xx = _shift(x, cache)
        m = torch.tanh((x + xx * self.mu_x) @ self.mix_w1).view(B, T, 5, -1)
        m = torch.einsum("btfr,frd->btfd", m, self.mix_w2) + self.mu  # data-dependent lerp weights
        xw, xk, xv, xr, xg = (x + xx * m[:, :, i] for i in range(5))
        r, k, v = (split_heads(p(z), self.heads) for p, z in ((self.r_proj, xr), (self.k_proj, xk),
                                                               (self.v_proj, xv)))
        w = -torch.exp((self.w0 + torch.tanh(xw @ self.decay_w1) @ self.decay_w2).to(_acc(x)))  # log decay < 0
        w = split_heads(w.to(x.dtype), self.heads)
        h0 = None if cache is None else cache["state"]
        if not x.is_cuda and interpreting():  # on CPU under Triton's interpreter: the PyTorch chunk form
            run = lambda q: gated_recurrence(q, k, v, w, op="gla", scale=1.0, initial_state=h0)  # noqa: E731
            o, state = read_before_write(run, r, k, v, self.u, scale=1.0, initial_state=h0)
        else:  # one autograd node: the engine's kernels and the fused epilogue, gradients rounded once
            o, state = rwkv6(r, k, v, w, self.u, scale=1.0, initial_state=h0, output_final_state=True)
        y = self._norm(o.flatten(2)) * F.silu(self.g_proj(xg))
        return self.o_proj(y), {"state": state, "shift": x[:, -1]}


class RWKV7TimeMix(_TimeMix):
    """RWKV-7 "Goose" time mixing (Peng et al., 2025): static token-shift lerps, the generalised delta rule
    with vector decay and in-context learning rate, bonus, GroupNorm and a low-rank sigmoid output gate."""

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, decay_rank: int = 64,
                 iclr_rank: int = 64, gate_rank: int = 128) -> None:
        super().__init__(dim, heads, head_dim)
        inner = self.heads * self.head_dim
        self.mu = nn.Parameter(torch.rand(6, dim) * 0.5)  # r, w, k, v, a, g
        self.w1, self.w2 = _lowrank(dim, check_positive_int("decay_rank", decay_rank), inner)
        self.a0 = nn.Parameter(torch.zeros(inner))
        self.a1, self.a2 = _lowrank(dim, check_positive_int("iclr_rank", iclr_rank), inner)
        self.g1, self.g2 = _lowrank(dim, check_positive_int("gate_rank", gate_rank), inner, std=1.0)
        self.k_k = nn.Parameter(torch.full((inner,), 0.85))
        self.k_a = nn.Parameter(torch.ones(inner))
        self.r_k = nn.Parameter(torch.randn(heads, self.head_dim) * 0.1)

    def _run(self, x, cache):
        xx = _shift(x, cache)
        xr, xw, xk, xv, xa, xg = (x + xx * self.mu[i] for i in range(6))
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2).to(_acc(x))) - 0.5
        w = -torch.exp(w)  # log decay in (-e^{-1/2}, 0)
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kappa = F.normalize(split_heads(k * self.k_k, self.heads), dim=-1)
        k = k * (1 + (alpha - 1) * self.k_a)
        r, k, v, alpha = (split_heads(t, self.heads) for t in (r, k, v, alpha))
        # decoding one token without autograd: the fused recurrent kernel (state read and written once); on CPU
        # under Triton's interpreter, sequences take the PyTorch chunk form, as the engine's layers do
        w, a, b = split_heads(w.to(x.dtype), self.heads), -kappa, kappa * alpha
        state = None if cache is None else cache["state"]
        if x.shape[1] == 1 and not torch.is_grad_enabled() and x.dtype != torch.float64:
            o, state = fused_recurrent_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=state, output_final_state=True)
        elif not x.is_cuda and interpreting():
            o, state = rwkv7_chunk_torch(r, w, k, v, a, b, 1.0, state, 16)
            o = o.to(x.dtype)
        else:
            o, state = rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=state, output_final_state=True)
        y = self._norm(o.flatten(2)) + ((r * k * self.r_k).sum(-1, keepdim=True) * v).flatten(2)
        return self.o_proj(y * g), {"state": state, "shift": x[:, -1]}
