"""Class 2 of the survey, compact attention: KV-cache compression by head sharing or low rank."""
from .mha import standard_attention

__all__ = ["standard_attention"]
