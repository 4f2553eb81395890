"""Every error path of the public boundary raises a clear error naming the argument."""
import pytest
import torch

import effattn
from effattn.validate import check_cu_seqlens, check_positive_int, normalize_window


def qkv(B=1, T=8, S=8, H=4, Hkv=2, D=16, dtype=torch.float32):
    return torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype)


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match=r"unknown method 'standrad'.*did you mean 'standard'"):
        effattn.attention(*qkv(), method="standrad")


def test_unknown_option_suggests():
    with pytest.raises(TypeError, match=r"unknown option 'casual'.*did you mean 'causal'"):
        effattn.attention(*qkv(), method="standard", casual=True)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), r"q must have 4 dimensions \[B, T, H, D\], got shape \(8, 4, 16\)"),
    (lambda q, k, v: (q, k[..., :8], v), r"k must have head dim D=16"),
    (lambda q, k, v: (q, k, v[:, :5]), r"v must match k in length and heads"),
    (lambda q, k, v: (q[:, :, :3], k, v), r"H=3 must be a multiple of the key/value heads Hkv=2"),
    (lambda q, k, v: (torch.cat([q, q]), k, v), r"batch sizes differ"),
    (lambda q, k, v: (q.to(torch.int32), k, v), r"q must have dtype in"),
    (lambda q, k, v: (q.double(), k, v), r"q and k must have the same dtype"),
    (lambda q, k, v: (q.tolist(), k, v), r"q must be a torch.Tensor"),
])
def test_bad_tensors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        effattn.attention(*bad(*qkv()), method="standard")


def test_bad_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a positive number"):
        effattn.attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="window sizes must be >= 0"):
        effattn.attention(q, k, v, window=(-1, 2))
    with pytest.raises(TypeError, match="window must be None, an int or a"):
        effattn.attention(q, k, v, window="wide")
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        effattn.attention(q, k, v, softcap=0)
    with pytest.raises(ValueError, match="form must be one of"):
        effattn.attention(q, k[:, :, :1].expand(1, 8, 4, 16), v[:, :, :1].expand(1, 8, 4, 16),
                          method="linear_transformer", form="magic")


def test_linear_transformer_needs_equal_heads_and_lengths():
    q, k, v = qkv(H=4, Hkv=2)
    with pytest.raises(ValueError, match="as many key heads as query heads"):
        effattn.attention(q, k, v, method="linear_transformer")
    q, k, v = qkv(H=2, Hkv=2, S=5)
    with pytest.raises(ValueError, match="same length"):
        effattn.attention(q, k, v, method="linear_transformer")


def test_helpers():
    assert normalize_window(4, causal=True) == (4, 0)
    assert normalize_window((1, 3), causal=False) == (1, 3)
    with pytest.raises(ValueError, match="chunk_size must be a power of two, got 48"):
        check_positive_int("chunk_size", 48, power_of_two=True)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        check_positive_int("chunk_size", 4.0)
    q = torch.zeros(1, 10, 2, 8)
    check_cu_seqlens(torch.tensor([0, 4, 10], dtype=torch.int32), q)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype in \\(int32\\)"):
        check_cu_seqlens(torch.tensor([0, 4, 10]), q)
    with pytest.raises(ValueError, match="end at the packed length 10"):
        check_cu_seqlens(torch.tensor([0, 4, 9], dtype=torch.int32), q)
    with pytest.raises(ValueError, match="batch size 1"):
        check_cu_seqlens(torch.tensor([0, 4, 10], dtype=torch.int32), torch.zeros(2, 10, 2, 8))
