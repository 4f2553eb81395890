"""Class 3 of the survey, sparse attention: fixed patterns, dynamic block selection, LSH, low rank.

Importing the method modules below registers their methods, in this order."""
from . import patterns
from .block_mask import BlockMask, block_mask, block_mask_from_blocks
from .pattern_methods import pattern_attention
from .dynamic import moba, quest, xattention
from .nsa import nsa
from .lsh import lsh_attention
from .linformer import linformer
from .differential import differential_attention
from .patterns import Pattern, draw

__all__ = ["BlockMask", "block_mask", "block_mask_from_blocks", "Pattern", "draw", "patterns",
           "pattern_attention", "moba", "quest", "xattention", "nsa", "lsh_attention", "linformer",
           "differential_attention"]
