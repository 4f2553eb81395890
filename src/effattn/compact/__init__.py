"""Class 2 of the survey, compact attention: KV-cache compression by head sharing or low rank.

Functional forms (registered: mha, gqa, mqa, mla, mfa, tpa), their layers with decoding caches, and the
Table 3 formulas for KV cache per token and parameters (`formulas`).
"""
from . import formulas
from .cache import CompactLayer, LayerCache
from .layers import GroupedAttention, convert_kv_heads
from .mha import standard_attention  # registers standard, mha, gqa, mqa; then mla, mfa, tpa in Table 3's order
from .mla import MLA, mla_attention, mla_attention_reference  # noqa: I001
from .mfa import MFA, mfa_attention, mfa_attention_reference
from .tpa import TPA, tpa_attention, tpa_attention_reference
from .build import build_layer  # after the methods are registered

__all__ = ["standard_attention", "build_layer", "formulas", "LayerCache", "CompactLayer", "GroupedAttention",
           "convert_kv_heads", "MLA", "mla_attention", "mla_attention_reference", "MFA", "mfa_attention", "mfa_attention_reference",
           "TPA", "tpa_attention", "tpa_attention_reference"]
