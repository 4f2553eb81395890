"""Class 1 of the survey, hardware-efficient exact attention: tiled, quantized, split-KV and paged kernels."""
from .decode_api import decode, flash_decoding
from .flash import flash_attention, sliding_window_attention
from .quant import flash_fp8, sage_attention

__all__ = ["flash_attention", "sliding_window_attention", "decode", "flash_decoding", "sage_attention", "flash_fp8"]
