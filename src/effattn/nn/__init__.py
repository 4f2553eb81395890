"""nn.Module layers for the methods of every class (projections, rotary, gates, short convolutions).

Every token mixer has `forward(x)` (training, causal) and `step(x, cache)` (decoding) that agree; see
`effattn.nn.common`. `make_mixer(name, dim, heads)` builds the layer of a name: a method-specific layer
from `LAYERS` when there is one, otherwise `Attention` around the registered method of that name.
"""
import difflib
from functools import partial

from .attention import Attention, default_method
from .compact_layers import CompactMixer
from .common import CachedLayer, RMSNorm, ShortConv, SwiGLU
from .linear_layers import DeltaNet, GatedDeltaNet, GatedLinearAttention, Mamba2, MetaLA, MultiScaleRetention
from .rotary import RotaryEmbedding, apply_rotary, rotary_angles
from .rwkv_layers import RWKV6TimeMix, RWKV7TimeMix
from .sparse_layers import DifferentialAttention, LinformerAttention, NSAAttention
from .ssm_layers import Mamba, MLSTMBlock
from .ttt_layers import TTTMLP, TTTLinear

# Layer names (lower case, the method's usual name) -> classes taking (dim, heads, **options).
LAYERS = {
    "retnet": MultiScaleRetention,
    "gla": GatedLinearAttention,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "mamba2": Mamba2,
    "mamba": Mamba,
    "mlstm": MLSTMBlock,
    "metala": MetaLA,
    "rwkv6": RWKV6TimeMix,
    "rwkv7": RWKV7TimeMix,
    "mla": partial(CompactMixer, "mla"),
    "mfa": partial(CompactMixer, "mfa"),
    "tpa": partial(CompactMixer, "tpa"),
    "differential": DifferentialAttention,
    "ttt_linear": TTTLinear,
    "ttt_mlp": TTTMLP,
}


def make_mixer(name: str | None, dim: int, heads: int, **options) -> CachedLayer:
    """The token mixer called `name`: `LAYERS[name]` or `Attention(dim, heads, method=name, **options)`."""
    if name in LAYERS:
        return LAYERS[name](dim, heads, **options)
    from ..registry import REGISTRY

    if isinstance(name, str) and name not in REGISTRY:
        close = difflib.get_close_matches(name, mixer_names(), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown layer or method {name!r}{hint} (known: {', '.join(mixer_names())})")
    return Attention(dim, heads, method=name, **options)


def mixer_names() -> list[str]:
    """Every name `make_mixer` accepts: the method-specific layers, then the registered methods."""
    from ..registry import REGISTRY

    return list(LAYERS) + [n for n in REGISTRY.names() if n not in LAYERS]


__all__ = ["Attention", "CompactMixer", "default_method", "CachedLayer", "RMSNorm", "ShortConv", "SwiGLU", "DeltaNet",
           "GatedDeltaNet", "GatedLinearAttention", "Mamba2", "MetaLA", "MultiScaleRetention", "LAYERS", "make_mixer",
           "mixer_names", "RotaryEmbedding", "apply_rotary", "rotary_angles", "NSAAttention", "DifferentialAttention",
           "LinformerAttention", "TTTLinear", "TTTMLP", "Mamba", "MLSTMBlock", "RWKV6TimeMix", "RWKV7TimeMix"]
