"""Class 3 of the survey, sparse attention: fixed patterns, dynamic block selection, LSH, low rank."""
from .block_mask import BlockMask, block_mask, block_mask_from_blocks
from . import patterns  # noqa: E402
from . import pattern_methods, dynamic, nsa, lsh, linformer, differential  # noqa: E402,F401  (registers)
from .patterns import Pattern, draw  # noqa: E402
from .pattern_methods import pattern_attention  # noqa: E402
from .dynamic import moba, quest, xattention  # noqa: E402
from .nsa import nsa  # noqa: E402,F811
from .lsh import lsh_attention  # noqa: E402
from .linformer import linformer  # noqa: E402
from .differential import differential_attention  # noqa: E402

__all__ = ["BlockMask", "block_mask", "block_mask_from_blocks", "Pattern", "draw", "patterns",
           "pattern_attention", "moba", "quest", "xattention", "nsa", "lsh_attention", "linformer",
           "differential_attention"]
