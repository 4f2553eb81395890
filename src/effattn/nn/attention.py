"""`Attention`: the multi-head token mixer around any registered method.

    q, k, v = x W_q, x W_k, x W_v  (split into heads; rotary on q, k for softmax-family methods)
    o = method(q, k, v, causal)     o_proj(o)

How it decodes depends on what the method's record says it supports, so a newly registered method plugs
in without edits here:
- softmax-family methods with "decode" keep a K/V cache and attend the new queries to it (bottom-right
  causal alignment, as every method follows);
- state-carrying methods ("state" in supports) run from `initial_state` with `output_final_state=True`
  (FLA naming) and keep only the state; data-dependent inputs the method needs (a log gate `g`, scalar or
  per key channel, and a write strength `beta`) get their own projections, found by asking the method's
  `make_inputs` what it takes;
- anything else replays: the cache keeps the layer's inputs and each step recomputes the causal prefix
  (exact, O(N) per token), so even methods without a decoding path can generate.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import REGISTRY, Shape
from ..validate import check_options
from .common import CachedLayer, layer_dims, split_heads
from .rotary import RotaryEmbedding

# Options the layer sets itself; a user passing them would break forward/step agreement.
_LAYER_OWNED = ("causal", "initial_state", "output_final_state", "return_lse")


def default_method() -> str:
    """The fastest exact softmax method registered: "flash" once its kernel is merged, else "standard"."""
    return "flash" if "flash" in REGISTRY else "standard"


def _probe(record, heads: int, kv_heads: int | None, head_dim: int) -> dict:
    """What the method's own input factory produces for this layer's head configuration."""
    shape = Shape(batch=1, seq_q=4, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    return record.make_inputs(shape, torch.float32, "cpu", torch.Generator().manual_seed(0))


def _required_args(fn) -> set[str]:
    """Arguments of the method's function beyond q, k, v that have no default (it cannot run without)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("q", "k", "v")}


class Attention(CachedLayer):
    """Multi-head attention layer by any registered method.

    dim: model width; heads / kv_heads (GQA/MQA when fewer, if the method supports "gqa"); head_dim
    (default dim // heads); method: a registered name (default: `default_method()`); rotary: apply RoPE
    to q and k (default: for softmax-family methods only); method_options: passed to the method, checked
    against its record. `forward(x)`: x `[B, T, dim]` -> `[B, T, dim]`, causal. `step(x, cache)`: see
    `effattn.nn.common`.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, method: str | None = None, *,
                 head_dim: int | None = None, rotary: bool | None = None, rotary_base: float = 10000.0,
                 bias: bool = False, **method_options) -> None:
        super().__init__()
        head_dim = layer_dims(dim, heads, head_dim)
        record = REGISTRY.get(default_method() if method is None else method)
        probe = _probe(record, heads, kv_heads, head_dim)
        missing = sorted({"q", "k", "v"} - set(probe))
        if missing:
            raise ValueError(f"method {record.name!r} does not take q, k, v tensors (no {missing}); the generic "
                             f"Attention layer cannot drive it: use its own layer (effattn.nn.LAYERS)")
        if kv_heads is None:  # the method's own head configuration (gqa: heads // 2, mqa: 1, ...)
            kv_heads = probe["k"].shape[2] if heads % probe["k"].shape[2] == 0 else heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"heads={heads} must be a positive multiple of kv_heads={kv_heads}")
        if kv_heads != heads and "gqa" not in record.supports:
            raise ValueError(f"method {record.name!r} does not support kv_heads != heads (no 'gqa' in supports)")
        if "causal" not in record.supports:
            raise ValueError(f"method {record.name!r} does not support causal attention, which a decoder layer needs")
        check_options(record.name, method_options, record.options)
        owned = sorted(set(method_options) & set(_LAYER_OWNED))
        if owned:
            raise ValueError(f"options {owned} are set by the layer itself; do not pass them")
        self.cache_keys = ("k", "v", "state", "x")
        self.record, self.dim, self.heads, self.kv_heads, self.head_dim = record, dim, heads, kv_heads, head_dim
        self.stateful = "state" in record.supports
        # Options the method's factory sets (e.g. delta_rule=True) define the method; the user's win.
        defaults = {k: v for k, v in probe.items() if not isinstance(v, torch.Tensor)
                    and k in record.options and k not in _LAYER_OWNED + ("scale", "form")}
        self.options = {**defaults, **method_options}
        if "causal" in record.options:
            self.options["causal"] = True
        required = {k: v for k, v in probe.items() if isinstance(v, torch.Tensor)
                    and k not in ("q", "k", "v", "initial_state") and k not in record.options}
        unknown = sorted((set(required) | _required_args(record.fn)) - {"g", "beta"})
        if unknown:
            raise ValueError(f"method {record.name!r} needs inputs {unknown} that the generic Attention layer cannot "
                             f"produce; use its own layer (effattn.nn.LAYERS)")
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        # Shared-QK methods (Reformer) read keys from the queries: a key projection would get no gradient.
        self.shared_qk = bool({**record.options, **self.options}.get("shared_qk", False))
        self.k_proj = None if self.shared_qk else nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.g_proj = self.beta_proj = None
        if "g" in required:  # log forget gate: scalar per head [B, T, H] or per key channel [B, T, H, Dk]
            self.vector_gate = required["g"].dim() == 4
            self.g_proj = nn.Linear(dim, heads * (head_dim if self.vector_gate else 1))
            nn.init.constant_(self.g_proj.bias, 3.0)  # start with gates near 1 (long memory)
        if "beta" in required:
            self.beta_proj = nn.Linear(dim, heads)
        # Delta-rule methods expect unit-norm q, k (their factories draw them so): keep that contract.
        self.l2_qk = bool(torch.allclose(probe["q"].norm(dim=-1), torch.ones(())))
        use_rotary = (not self.stateful) if rotary is None else rotary
        self.rope = RotaryEmbedding(head_dim, rotary_base) if use_rotary else None
        if self.stateful and "initial_state" in record.options:
            self.mode = "state"
        elif not self.stateful and "decode" in record.supports:
            self.mode = "kv"
        else:
            self.mode = "replay"

    def extra_repr(self) -> str:
        return (f"method={self.record.name!r}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, mode={self.mode}, rotary={self.rope is not None}")

    def _qkv(self, x: torch.Tensor, offset: int):
        q = split_heads(self.q_proj(x), self.heads)
        k = q if self.shared_qk else split_heads(self.k_proj(x), self.kv_heads)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if self.l2_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        return q, k, v

    def _gates(self, x: torch.Tensor) -> dict:
        out = {}
        if self.g_proj is not None:
            g = F.logsigmoid(self.g_proj(x).float()).to(x.dtype)
            out["g"] = split_heads(g, self.heads) if self.vector_gate else g
        if self.beta_proj is not None:
            out["beta"] = torch.sigmoid(self.beta_proj(x))
        return out

    def _run(self, x: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, dict]:
        if self.mode == "replay":  # recompute the whole causal prefix: exact for any method
            full = x if cache is None else torch.cat([cache["x"], x], dim=1)
            return self._attend(full, None)[0][:, -x.shape[1]:], {"x": full}
        return self._attend(x, cache)

    def _attend(self, x: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, dict]:
        q, k, v = self._qkv(x, 0 if cache is None else cache["offset"])
        if self.mode == "state":
            state = None if cache is None else cache["state"]
            o, state = self.record.fn(q, k, v, **self._gates(x), initial_state=state, output_final_state=True,
                                      **self.options)
            new = {"state": state}
        else:
            if cache is not None:
                k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
            o, new = self.record.fn(q, k, v, **self.options), {"k": k, "v": v}
        return self.o_proj(o.flatten(2)), new
