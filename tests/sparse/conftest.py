"""Shared fixtures of the sparse tests.

A dense stand-in for the block-sparse flash kernel, used by tests ONLY while the kernel has not been
merged into this branch (conftest installs it then). It computes exactly what the contract promises:
flash_attention(block_mask=bm) == softmax_attention(mask=bm.to_dense())."""
import importlib.util

import pytest

from effattn.reference.softmax import mask_from_fn, softmax_attention
from effattn.sparse._select import expand_blocks
import effattn
from effattn.sparse import _engine


class DenseBlockMask:
    def __init__(self, dense):
        self.dense = dense

    def to_dense(self):
        return self.dense

    def density(self):
        return float(self.dense.float().mean())


def _dense_block_mask(mask_fn, B, H, T, S, block=(16, 16), device=None):
    return DenseBlockMask(mask_from_fn(mask_fn, B, H, T, S, device))


def _dense_block_mask_from_blocks(selected, T, S, block=(16, 16), mask_fn=None):
    m = expand_blocks(selected, T, S, *block)
    if mask_fn is not None:
        m = m & mask_from_fn(mask_fn, m.shape[0], m.shape[1], T, S, m.device)
    return DenseBlockMask(m)


def _dense_flash_attention(q, k, v, *, block_mask=None, scale=None, causal=False, window=None, return_lse=False):
    mask = None if block_mask is None else block_mask.to_dense()
    return softmax_attention(q, k, v, mask=mask, scale=scale, causal=causal, window=window, return_lse=return_lse)



KERNEL_MERGED = (importlib.util.find_spec("effattn.sparse.block_mask") is not None
                 and hasattr(effattn, "flash_attention"))


@pytest.fixture(autouse=True)
def _kernel(monkeypatch):
    """Until the flash branch is merged, run the sparse methods' fast paths on a dense stand-in."""
    if not KERNEL_MERGED:
        for name in ("block_mask", "block_mask_from_blocks", "flash_attention"):
            monkeypatch.setattr(_engine, name, globals()["_dense_" + name])
