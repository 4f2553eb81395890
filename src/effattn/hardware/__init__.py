"""Class 1 of the survey, hardware-efficient exact attention: tiled, quantized, split-KV and paged kernels."""
