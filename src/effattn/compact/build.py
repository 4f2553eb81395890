"""Build the layer of a registered compact method from a registry `Shape` (heads, kv_heads, head_dim) and a
model width, with the per-method dims of `formulas` (so its cache and parameter count are the record's)."""
from __future__ import annotations

from ..registry import Shape
from ..validate import check_choice
from .cache import CompactLayer
from .formulas import gqa_kv_heads, mla_dims, tpa_dims
from .layers import GroupedAttention
from .mfa import MFA
from .mla import MLA
from .tpa import TPA

LAYERS = ("mha", "gqa", "mqa", "mla", "mfa", "tpa")


def build_layer(name: str, shape: Shape, d_model: int, **kwargs) -> CompactLayer:
    """The `name` layer at `shape`'s heads / head_dim; kwargs go to the layer (dtype, device, rope, causal)."""
    check_choice("name", name, LAYERS)
    h, d = shape.heads, shape.head_dim
    if name in ("mha", "gqa", "mqa"):
        kv = {"mha": h, "gqa": gqa_kv_heads(shape), "mqa": 1}[name]
        return GroupedAttention(d_model, h, kv, d, **kwargs)
    if name == "mla":
        return MLA(d_model, h, mla_dims(shape), **kwargs)
    if name == "mfa":
        return MFA(d_model, h, d, **kwargs)
    return TPA(d_model, h, d, tpa_dims(shape), **kwargs)
