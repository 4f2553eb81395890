"""RWKV-7's Triton backward (rwkv7_chunk_bwd.py): every gradient (r, w, k, v, a, b, the initial state) and the
output and final state vs the float64 reference under the 2x rule, outputs poisoned, at lengths off the chunk
size, K != V, partial key slices and value blocks, strong decays (the exact pairwise products), mild ones (the
factored products) and both in one call; a spy checks the Triton path ran."""
import pytest
import torch

from effattn import _memory
from effattn.linear import rwkv7_chunk_bwd
from effattn.linear.rwkv7 import rwkv7, rwkv7_reference

from .test_catalog import check_against_reference
from .test_rwkv_gsa import rwkv7_case


@pytest.mark.parametrize("dtype,T,K,V,strong,state,chunk", [
    (torch.float32, 37, 32, 24, False, True, 16),   # two key slices, a partial chunk
    (torch.float32, 21, 16, 40, True, False, 16),   # decays down to e^-20 a step; two value blocks in the scans
    (torch.bfloat16, 45, 20, 18, False, True, 32),  # a partial key slice, chunk 32
    (torch.float32, 50, 16, 16, None, True, 16),    # some chunks factored, some exact: each written once
    (torch.float32, 150, 16, 24, False, True, 16),  # 10 chunks: three super-chunks of the state passes, one partial
    (torch.bfloat16, 83, 16, 40, True, False, 16),  # 6 chunks: two super-chunks, strong decays
])
def test_rwkv7_triton_backward(monkeypatch, dtype, T, K, V, strong, state, chunk):
    ran = []
    real = rwkv7_chunk_bwd._Rwkv7Chunk.apply
    monkeypatch.setattr(rwkv7_chunk_bwd._Rwkv7Chunk, "apply", lambda *a: ran.append(1) or real(*a))
    x = rwkv7_case(B=2, T=T, H=2, K=K, V=V, seed=5, strong=strong, state=state)
    if strong is None:  # mixed: mild decays (the factored products) but one channel of one chunk per sequence
        x["w"][0, 16:32, 1, 3] = -6.0  # and head decaying past e^-MILD (the exact pairwise products)
        x["w"][1, 0:16, 0, 0] = -6.0
    with _memory.poisoned_outputs():
        check_against_reference(rwkv7, rwkv7_reference, x, {"scale": 0.5}, dtype=dtype, form="chunk",
                                chunk_size=chunk)
    assert ran
