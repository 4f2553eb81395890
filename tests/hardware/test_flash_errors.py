"""flash_attention's input validation: each bad input raises a clear error before any kernel runs."""
import pytest
import torch

import effattn
from effattn.sparse import block_mask


def qkv(B=1, T=8, S=8, H=4, Hkv=2, D=32, Dv=None, dtype=torch.float32):
    return (torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype),
            torch.randn(B, S, Hkv, Dv or D, dtype=dtype))


@pytest.mark.parametrize("inputs,options,error,match", [
    (qkv(D=48), {}, ValueError, r"unsupported q/k head dim D=48"),
    (qkv(Dv=80), {}, ValueError, r"unsupported v head dim Dv=80"),
    (qkv(H=3, Hkv=2), {}, ValueError, r"H=3 must be a multiple of the key/value heads Hkv=2"),
    (qkv(dtype=torch.float64), {}, TypeError, r"q must have dtype in \(float16, bfloat16, float32\)"),
    (qkv(B=2), dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "batch size 1"),
    (qkv(S=9), dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "same length"),
    (qkv(), dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "end at the packed length 8"),
    (qkv(), dict(cu_seqlens=torch.tensor([0, 8])), TypeError, "cu_seqlens must have dtype in"),
    (qkv(), dict(window=(2, -1)), ValueError, "window sizes must be >= 0"),
    (qkv(), dict(softcap=-1.0), ValueError, "softcap must be a positive number"),
    (qkv(), dict(scale=0), ValueError, "scale must be a positive number"),
    (qkv(), dict(causal=1), TypeError, "causal must be a bool"),
    (qkv(), dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(inputs, options, error, match):
    with pytest.raises(error, match=match):
        effattn.flash_attention(*inputs, **options)


def test_block_mask_with_cu_seqlens():
    bm = block_mask(lambda b, h, q, k: k <= q, 1, 1, 8, 8, block=(16, 16))
    with pytest.raises(ValueError, match="cannot be combined"):
        effattn.flash_attention(*qkv(), block_mask=bm, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="flash_attention runs Triton kernels: it needs CUDA tensors"):
        effattn.flash_attention(*qkv())
