"""nn.Module layers for the methods of every class (projections, rotary, gates, short convolutions)."""
from .rotary import RotaryEmbedding, apply_rotary, rotary_angles

__all__ = ["RotaryEmbedding", "apply_rotary", "rotary_angles"]
