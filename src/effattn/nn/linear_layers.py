"""Layers of the linear-attention class whose parameterisation is their own (survey Sec. 5, Table 5).

All run the one gated recurrence (`effattn.nn.recurrence.gated_recurrence`, the registered fast op when
there is one) and differ in how x becomes q, k, v, the log gate g and beta, and in the output path:

    RetNet      g = log(gamma_h) fixed per head (multi-scale), rotary q/k, GroupNorm per head, swish gate
    GLA         g = logsigmoid(x W_g1 W_g2 + b) / 16 per key channel, RMSNorm per head, swish output gate
    DeltaNet    short conv + SiLU on q, k, v; L2-normalised q, k; beta = sigmoid(x W_b); delta rule
    Gated DN    DeltaNet plus g = -exp(A_log) softplus(x W_a + dt_bias) (Mamba2's gate) and output gate
    Mamba2      conv on (x, B, C); dt = softplus(.); g = -exp(A_log) dt; v = dt x; k = B; q = C; + D x;
                y = RMSNorm(o * silu(z))

Each keeps in its cache the recurrent state `[B, H, Dk, Dv]`, the short-conv tail and the token offset.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..linear.metala import self_augmentation
from ..validate import check_positive_int
from .common import CachedLayer, RMSNorm, ShortConv, layer_dims, split_heads
from .recurrence import gated_recurrence
from .rotary import RotaryEmbedding


def _conv(conv: ShortConv, x: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    return conv(x, None if cache is None else cache["conv"])


def _state(cache: dict | None):
    return None if cache is None else cache["state"]


class MultiScaleRetention(CachedLayer):
    """RetNet's multi-scale retention (Sun et al., 2023; survey Table 5): per-head decay
    gamma_h = 1 - 2^(-5 - h), Retention(X) = (Q K^T * D) V with D_nm = gamma^(n - m), GroupNorm per head,
    MSR(X) = (swish(X W_G) * Y) W_O. Values are `head_dim_v` wide (the paper doubles them)."""

    cache_keys = ("state",)

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, head_dim_v: int | None = None,
                 rotary: bool = True) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = layer_dims(dim, heads, head_dim)
        self.head_dim_v = check_positive_int("head_dim_v", 2 * self.head_dim if head_dim_v is None else head_dim_v)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * self.head_dim_v, bias=False)
        self.g_proj = nn.Linear(dim, heads * self.head_dim_v, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim_v, dim, bias=False)
        self.group_norm = nn.GroupNorm(heads, heads * self.head_dim_v, affine=True)
        self.register_buffer("log_gamma", torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(heads))), persistent=False)
        self.rope = RotaryEmbedding(self.head_dim) if rotary else None

    def _run(self, x, cache):
        B, T, _ = x.shape
        offset = 0 if cache is None else cache["offset"]
        q, k = split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(x), self.heads)
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        v = split_heads(self.v_proj(x), self.heads)
        g = self.log_gamma.to(x.dtype).expand(B, T, self.heads)
        o, state = gated_recurrence(q, k, v, g, op="simple_gla", initial_state=_state(cache))
        y = self.group_norm(o.reshape(B * T, -1)).view(B, T, -1)  # GroupNorm: one group per head, per token
        return self.o_proj(F.silu(self.g_proj(x)) * y), {"state": state}


class GatedLinearAttention(CachedLayer):
    """GLA (Yang et al., 2024; survey Table 5): data-dependent forget gate per key channel,
    g_t = logsigmoid(x_t W_g1 W_g2 + b) / tau (low rank 16, tau = 16), keys `head_dim` wide (default half of
    the values, as in the paper), o = RMSNorm_head(o) * swish(x W_r), then W_O."""

    cache_keys = ("state",)

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, head_dim_v: int | None = None,
                 gate_rank: int = 16, gate_tau: float = 16.0) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim_v = layer_dims(dim, heads, head_dim_v)
        self.head_dim = check_positive_int("head_dim", max(1, self.head_dim_v // 2) if head_dim is None else head_dim)
        self.gate_tau = gate_tau
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * self.head_dim_v, bias=False)
        self.gk = nn.Sequential(nn.Linear(dim, check_positive_int("gate_rank", gate_rank), bias=False),
                                nn.Linear(gate_rank, heads * self.head_dim, bias=True))
        self.r_proj = nn.Linear(dim, heads * self.head_dim_v, bias=False)
        self.o_norm = RMSNorm(self.head_dim_v)
        self.o_proj = nn.Linear(heads * self.head_dim_v, dim, bias=False)

    def _run(self, x, cache):
        q, k = split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(x), self.heads)
        v = split_heads(self.v_proj(x), self.heads)
        g = split_heads(F.logsigmoid(self.gk(x).float()).to(x.dtype) / self.gate_tau, self.heads)
        o, state = gated_recurrence(q, k, v, g, op="gla", initial_state=_state(cache))
        y = self.o_norm(o).flatten(2) * F.silu(self.r_proj(x))
        return self.o_proj(y), {"state": state}


class MetaLA(CachedLayer):
    """MetaLA (Chou et al., 2024; survey Table 6, Eq. 76): a short causal conv + SiLU on x, then q and the
    log forget gate g = logsigmoid(h W_a) / tau from it and no key projection (k = 1 - e^g), GLA's
    vector-gated state, the self-augmentation sigmoid((q . (w_aug * k)) v) with w_aug `[H, K]` (zero at
    init, as the authors'), a per-head LayerNorm without affine, a SiLU output gate, then W_O. Keys are
    `head_dim` wide (default half the values: the authors' q and gate projections are dim / 2 wide)."""

    cache_keys = ("state", "conv")

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, head_dim_v: int | None = None,
                 gate_tau: float = 16.0, conv_size: int = 4) -> None:
        super().__init__()
        self.dim, self.heads, self.gate_tau = dim, heads, gate_tau
        self.head_dim_v = layer_dims(dim, heads, head_dim_v)
        self.head_dim = check_positive_int("head_dim", max(1, self.head_dim_v // 2) if head_dim is None else head_dim)
        self.conv = ShortConv(dim, conv_size)
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.a_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * self.head_dim_v, bias=False)
        self.gate_proj = nn.Linear(dim, heads * self.head_dim_v, bias=True)
        self.aug_weight = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.o_norm = nn.LayerNorm(self.head_dim_v, elementwise_affine=False)
        self.o_proj = nn.Linear(heads * self.head_dim_v, dim, bias=False)

    def _run(self, x, cache):
        h, conv = _conv(self.conv, x, cache)
        q, v = split_heads(self.q_proj(h), self.heads), split_heads(self.v_proj(h), self.heads)
        g = split_heads(F.logsigmoid(self.a_proj(h).float()).to(x.dtype) / self.gate_tau, self.heads)
        k = -torch.expm1(g)  # 1 - alpha, the key MetaLA ties to the gate
        o, state = gated_recurrence(q, k, v, g, op="gla", initial_state=_state(cache))
        o = o + self_augmentation(q, v, k, self.aug_weight).to(o.dtype)
        y = self.o_norm(o).flatten(2) * F.silu(self.gate_proj(h))
        return self.o_proj(y), {"state": state, "conv": conv}


class DeltaNet(CachedLayer):
    """DeltaNet (Schlag et al., 2021; Yang et al., 2024b; survey Table 5): the delta rule
    S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}) with q, k, v from a short causal conv + SiLU,
    L2-normalised q, k and beta_t = sigmoid(x_t W_b); per-head RMSNorm on the output, then W_O.
    `gated=True` is Gated DeltaNet (Yang et al., 2025): S_{t-1} is first decayed by
    exp(g_t), g_t = -exp(A_log) softplus(x_t W_a + dt_bias), and the output is gated by silu(x W_gate)."""

    cache_keys = ("state", "conv")

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, conv_size: int = 4,
                 gated: bool = False) -> None:
        super().__init__()
        self.dim, self.heads, self.gated = dim, heads, gated
        self.head_dim = layer_dims(dim, heads, head_dim)
        inner = heads * self.head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=False)
        self.conv = ShortConv(3 * inner, conv_size)
        self.b_proj = nn.Linear(dim, heads, bias=True)
        self.o_norm = RMSNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        if gated:
            self.a_proj = nn.Linear(dim, heads, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
            # dt starts in [1e-3, 1e-1] as in Mamba: softplus^-1(dt) = dt + log(1 - exp(-dt))
            dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.gate_proj = nn.Linear(dim, inner, bias=False)

    def _run(self, x, cache):
        qkv, conv = _conv(self.conv, self.qkv_proj(x), cache)
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b_proj(x))
        if self.gated:
            g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
            o, state = gated_recurrence(q, k, v, g.to(x.dtype), beta, op="gated_delta_net", delta_rule=True,
                                        initial_state=_state(cache))
            y = self.o_norm(o).flatten(2) * F.silu(self.gate_proj(x))
        else:
            o, state = gated_recurrence(q, k, v, None, beta, op="delta_net", delta_rule=True,
                                        initial_state=_state(cache))
            y = self.o_norm(o).flatten(2)
        return self.o_proj(y), {"state": state, "conv": conv}


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang et al., 2025): `DeltaNet(..., gated=True)`."""

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, conv_size: int = 4) -> None:
        super().__init__(dim, heads, head_dim=head_dim, conv_size=conv_size, gated=True)


class Mamba2(CachedLayer):
    """A Mamba2 block (Dao & Gu, 2024; survey Table 5, SSD): the selective state space with a scalar gate
    per head is the gated recurrence with q = C, k = B (shared by all heads), v = dt x, g = A dt,
    scale 1, plus the skip D x; inputs pass a short causal conv, the output is RMSNorm(y * silu(z)).

    d_inner = expand * dim split into `heads` (default d_inner // head_dim, head_dim default 16) of
    `head_dim`; the state per head is `[d_state, head_dim]`."""

    cache_keys = ("state", "conv")

    def __init__(self, dim: int, heads: int | None = None, *, head_dim: int | None = None, d_state: int = 16,
                 expand: int = 2, conv_size: int = 4) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_inner = check_positive_int("expand", expand) * dim
        if heads is None:
            head_dim = 16 if head_dim is None else head_dim
            heads = max(1, self.d_inner // head_dim)
        elif head_dim is None:
            head_dim = self.d_inner // check_positive_int("heads", heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        if heads * head_dim != self.d_inner:
            raise ValueError(f"heads * head_dim must equal expand * dim = {self.d_inner}, got heads={heads}, "
                             f"head_dim={head_dim}")
        self.dim, self.heads = dim, heads
        conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + conv_dim + heads, bias=False)  # z, (x, B, C), dt
        self.conv = ShortConv(conv_dim, conv_size)
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def _run(self, x, cache):
        B, T, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * self.d_state, self.heads], dim=-1)
        xbc, conv = _conv(self.conv, xbc, cache)
        xs, Bm, Cm = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        xs = split_heads(xs, self.heads)  # [B, T, H, P]
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        g = (-self.A_log.exp() * dt).to(x.dtype)
        k = Bm.unsqueeze(2).expand(B, T, self.heads, self.d_state)
        q = Cm.unsqueeze(2).expand(B, T, self.heads, self.d_state)
        o, state = gated_recurrence(q, k, xs * dt.unsqueeze(-1).to(x.dtype), g, op="simple_gla", scale=1.0,
                                    initial_state=_state(cache))
        y = (o + self.D.to(x.dtype)[:, None] * xs).flatten(2)
        return self.out_proj(self.norm(y * F.silu(z))), {"state": state, "conv": conv}
