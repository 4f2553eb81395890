"""The block-sparse flash kernel, as the sparse methods call it.

`effattn.sparse.block_mask` / `block_mask_from_blocks` (sparse/block_mask.py) and `effattn.flash_attention`
(hardware/) belong to the flash kernel; they are looked up at call time so that this package imports
before and independently of them.
"""
from __future__ import annotations

import importlib


def _block_mask_module():
    return importlib.import_module("effattn.sparse.block_mask")


def block_mask(mask_fn, B, H, T, S, block=None, device=None):
    kw = {} if block is None else {"block": tuple(block)}
    return _block_mask_module().block_mask(mask_fn, B, H, T, S, device=device, **kw)


def block_mask_from_blocks(selected, T, S, block, mask_fn=None):
    return _block_mask_module().block_mask_from_blocks(selected, T, S, block=tuple(block), mask_fn=mask_fn)


def flash_attention(q, k, v, **kwargs):
    import effattn

    return effattn.flash_attention(q, k, v, **kwargs)
