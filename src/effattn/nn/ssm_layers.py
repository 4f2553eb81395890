"""Selective state-space and xLSTM layers (survey Table 5, forget + select) around the registered ops
`effattn.linear.mamba` (S6) and `effattn.linear.mlstm`.

    Mamba     x, z = in_proj(u); x = silu(conv(x)); dt, B, C = x_proj(x); Delta = softplus(dt_proj(dt));
              y = S6(x; A = -exp(A_log), Delta, B, C) + D x;  out = out_proj(y * silu(z))      (Gu & Dao, 2023)
    mLSTM     x_m, z = up(u); x_c = silu(conv(x_m)); q, k from x_c, v from x_m; i, f from [q, k, v];
              h = mLSTM(q, k, v, i, f); out = down((norm_head(h) + skip * x_c) * silu(z))  (Beck et al., 2024)

Each keeps in its cache the recurrent state and the short-conv tail (see effattn.nn.common for the contract).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._triton_mode import interpreting
from ..linear.mamba import mamba
from ..linear.mlstm import mlstm
from ..validate import check_choice, check_positive_int
from .common import CachedLayer, RMSNorm, ShortConv, layer_dims, split_heads


def _dt_bias(channels: int) -> torch.Tensor:
    """softplus^-1 of steps drawn log-uniformly in [1e-3, 1e-1] (Mamba's initialisation)."""
    dt = torch.exp(torch.empty(channels).uniform_(math.log(1e-3), math.log(1e-1)))
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(CachedLayer):
    """A Mamba (S6) block. d_inner = expand * dim channels, each with a diagonal state of `d_state`;
    `heads` is accepted for `make_mixer(name, dim, heads)` and unused (S6 has no heads). `form` None runs the
    Triton chunked kernel on CUDA and the recurrent form elsewhere (the interpreter would be slower);
    "chunk" or "recurrent" forces one."""

    cache_keys = ("state", "conv")

    def __init__(self, dim: int, heads: int | None = None, *, d_state: int = 16, expand: int = 2,
                 conv_size: int = 4, dt_rank: int | None = None, form: str | None = None) -> None:
        super().__init__()
        check_choice("form", form, (None, "chunk", "recurrent"))
        self.form = form
        self.dim = check_positive_int("dim", dim)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_inner = check_positive_int("expand", expand) * dim
        self.dt_rank = check_positive_int("dt_rank", math.ceil(dim / 16) if dt_rank is None else dt_rank)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)  # x, z
        self.conv = ShortConv(self.d_inner, conv_size)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)  # dt (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=False)
        self.dt_bias = nn.Parameter(_dt_bias(self.d_inner))
        # S4D-real initialisation A[d, n] = -(n + 1)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def _run(self, u, cache):
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, conv = self.conv(x, None if cache is None else cache["conv"])
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        form = self.form or ("chunk" if x.is_cuda and not interpreting() else "recurrent")
        y, state = mamba(x, self.dt_proj(dt), -torch.exp(self.A_log.float()), Bm, Cm, self.D, z,
                         dt_bias=self.dt_bias, initial_state=None if cache is None else cache["state"],
                         output_final_state=True, form=form)
        return self.out_proj(y), {"state": state, "conv": conv}


class MLSTMBlock(CachedLayer):
    """xLSTM's mLSTM block (pre up-projection, Fig. 10 of the paper): up-projection by `proj_factor` into a
    cell branch and a gate branch; causal conv + SiLU feeding q and k; v from the unconvolved branch; input
    and forget gates from [q, k, v] (forget bias initialised in [3, 6] so the cell starts remembering);
    per-head RMSNorm, a learnable skip from the conv output, SiLU gate, down-projection. q and k use dense
    projections (the paper's are block-diagonal with blocks of 4)."""

    cache_keys = ("state", "conv")

    def __init__(self, dim: int, heads: int, *, proj_factor: int = 2, conv_size: int = 4) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.inner = check_positive_int("proj_factor", proj_factor) * check_positive_int("dim", dim)
        self.head_dim = layer_dims(self.inner, heads, None)
        self.up = nn.Linear(dim, 2 * self.inner, bias=False)
        self.conv = ShortConv(self.inner, conv_size)
        self.q_proj = nn.Linear(self.inner, self.inner, bias=False)
        self.k_proj = nn.Linear(self.inner, self.inner, bias=False)
        self.v_proj = nn.Linear(self.inner, self.inner, bias=False)
        self.gates = nn.Linear(3 * self.inner, 2 * heads, bias=True)  # i, f pre-activations
        with torch.no_grad():
            self.gates.weight.zero_()
            self.gates.bias[heads:] = torch.linspace(3.0, 6.0, heads)
            self.gates.bias[:heads].normal_(0.0, 0.1)
        self.norm = RMSNorm(self.head_dim)
        self.skip = nn.Parameter(torch.ones(self.inner))
        self.down = nn.Linear(self.inner, dim, bias=False)

    def _run(self, u, cache):
        x_m, z = self.up(u).chunk(2, dim=-1)
        x_c, conv = self.conv(x_m, None if cache is None else cache["conv"])
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)
        i, f = self.gates(torch.cat([q, k, v], dim=-1)).chunk(2, dim=-1)
        h, state = mlstm(*(split_heads(t, self.heads) for t in (q, k, v)), i, f,
                         initial_state=None if cache is None else cache["state"], output_final_state=True)
        h = self.norm(h).flatten(2).to(u.dtype)
        return self.down((h + self.skip * x_c) * F.silu(z)), {"state": state, "conv": conv}
