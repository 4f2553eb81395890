"""The TTT layer (Sun et al., 2024, "Learning to (Learn at Test Time)"; survey Sec. 7.7): TTT-Linear / TTT-MLP.

    q, k, v = x theta_Q, x theta_K, x theta_V               (per head; RoPE at the position inside the mini-batch)
    eta_t   = base_lr * sigmoid(x_t theta_lr + b_lr) / d    (per head: the learnable inner learning rate, Sec. 2.7)
    z       = TTT(q, k, v, eta; W_0, LN)                    (effattn.linear.ttt: mini-batch GD of the inner model,
                                                             learnable initial weights W_0, inner LayerNorm)
    y       = W_O (gelu(x W_g) * LayerNorm(z))              (post norm and output gate, the authors' Mamba-backbone
                                                             variant; `gate=False` drops the gate)

The cache keeps the TTT state `[B, H, 2, P]` (inner weights at the last mini-batch boundary and the pending
gradient sum) and the token offset, so decoding continues a mini-batch exactly where `forward` would.
The token weights c_i of the mini-batch sums are 1/(i+1) plus a learned offset, clamped at 0 (as in the authors'
code). (Their optional short convolutions on q, k are left out.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..linear.ttt import param_shapes, ttt_linear, ttt_mlp
from ..validate import check_choice, check_positive_int
from .common import CachedLayer, layer_dims, split_heads
from .rotary import apply_rotary, rotary_angles


class TTTLinear(CachedLayer):
    """TTT layer: dim, heads (head_dim default dim // heads); inner "linear" (TTT-Linear) or "mlp" (TTT-MLP
    with hidden width `mlp_ratio * head_dim`); mini_batch_size b (16 in the paper); base_lr (paper: 1 for
    linear, 0.1 for MLP); form "fused" (TTT-Linear's Triton kernels; the default for "linear"), "dual" (the default
    for "mlp") or "primal", all the same result. forward(x) `[B, T, dim]` -> `[B, T, dim]`."""

    cache_keys = ("state",)

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, inner: str = "linear",
                 mini_batch_size: int = 16, base_lr: float | None = None, mlp_ratio: int = 4, rotary: bool = True,
                 gate: bool = True, form: str | None = None) -> None:
        super().__init__()
        check_choice("inner", inner, ("linear", "mlp"))
        form = ("fused" if inner == "linear" else "dual") if form is None else form
        check_choice("form", form, ("fused", "dual", "primal") if inner == "linear" else ("dual", "primal"))
        self.dim, self.heads, self.inner, self.form = dim, heads, inner, form
        d = self.head_dim = layer_dims(dim, heads, head_dim)
        self.mini_batch_size = check_positive_int("mini_batch_size", mini_batch_size)
        self.base_lr = (1.0 if inner == "linear" else 0.1) if base_lr is None else float(base_lr)
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        if rotary and d % 2:
            raise ValueError(f"rotary needs an even head_dim, got {d} (or pass rotary=False)")
        self.rotary = rotary
        inner_dim = heads * d
        self.q_proj = nn.Linear(dim, inner_dim, bias=False)
        self.k_proj = nn.Linear(dim, inner_dim, bias=False)
        self.v_proj = nn.Linear(dim, inner_dim, bias=False)
        self.lr_proj = nn.Linear(dim, heads)
        nn.init.normal_(self.lr_proj.weight, std=0.02)
        nn.init.zeros_(self.lr_proj.bias)
        self.token_offset = nn.Parameter(torch.zeros(self.mini_batch_size))  # c_i = max(0, 1/(i+1) + offset_i)
        self.ttt_norm_weight = nn.Parameter(torch.ones(heads, d))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(heads, d))
        hidden = check_positive_int("mlp_ratio", mlp_ratio) * d if inner == "mlp" else None
        # W_0: each inner map N(0, 0.02) with a zero bias row, flattened as the state stores it
        maps = [torch.cat([torch.randn(heads, a - 1, b) * 0.02, torch.zeros(heads, 1, b)], dim=1)
                for a, b in param_shapes(inner, d, hidden)]
        self.W0 = nn.Parameter(torch.cat([m.flatten(1) for m in maps], dim=-1))
        self.post_norm = nn.LayerNorm(inner_dim, eps=1e-6)
        self.g_proj = nn.Linear(dim, inner_dim, bias=False) if gate else None
        self.o_proj = nn.Linear(inner_dim, dim, bias=False)

    def _rope(self, t: torch.Tensor, offset: int) -> torch.Tensor:
        pos = (torch.arange(offset, offset + t.shape[1], device=t.device)) % self.mini_batch_size
        cos, sin = rotary_angles(pos, self.head_dim)
        return apply_rotary(t, cos, sin)

    def _run(self, x, cache):
        B = x.shape[0]
        offset = 0 if cache is None else cache["offset"]
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rotary:
            q, k = self._rope(q, offset), self._rope(k, offset)
        eta = self.base_lr * torch.sigmoid(self.lr_proj(x)) / self.head_dim
        if cache is None:  # W_0 (learned) and nothing pending: [B, H, 2, P]
            w0 = self.W0.to(x.dtype).unsqueeze(0).expand(B, -1, -1)
            state = torch.stack([w0, torch.zeros_like(w0)], dim=2)
        else:
            state = cache["state"]
        op = ttt_linear if self.inner == "linear" else ttt_mlp
        base = 1.0 / torch.arange(1, self.mini_batch_size + 1, device=x.device, dtype=self.token_offset.dtype)
        weights = torch.clamp_min(base + self.token_offset, 0.0)
        o, state = op(q, k, v, eta, self.ttt_norm_weight.to(x.dtype), self.ttt_norm_bias.to(x.dtype),
                      initial_state=state, mini_batch_size=self.mini_batch_size, offset=offset, token_weights=weights,
                      form=self.form, output_final_state=True)
        y = self.post_norm(o.flatten(2))
        if self.g_proj is not None:
            y = F.gelu(self.g_proj(x), approximate="tanh") * y
        return self.o_proj(y), {"state": state}


class TTTMLP(TTTLinear):
    """The TTT layer with TTT-MLP inside: `TTTLinear(..., inner="mlp")`."""

    def __init__(self, dim: int, heads: int, **options) -> None:
        super().__init__(dim, heads, inner="mlp", **options)
