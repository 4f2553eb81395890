"""Class 3 of the survey, sparse attention: fixed patterns, dynamic block selection, LSH, low rank."""
from .block_mask import BlockMask, block_mask, block_mask_from_blocks

__all__ = ["BlockMask", "block_mask", "block_mask_from_blocks"]
