"""Class 1 of the survey, hardware-efficient exact attention: tiled, quantized, split-KV and paged kernels."""
from .decode_api import decode, flash_decoding

__all__ = ["decode", "flash_decoding"]
