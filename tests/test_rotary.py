import torch

from effattn.nn import RotaryEmbedding


def test_rotary_is_relative():
    """<rope(q, i), rope(k, j)> depends only on i - j, and rotation preserves norms."""
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 2, 8, dtype=torch.float64), torch.randn(1, 1, 2, 8, dtype=torch.float64)
    d1 = (rope(q, offset=5).double() * rope(k, offset=3).double()).sum(-1)
    d2 = (rope(q, offset=12).double() * rope(k, offset=10).double()).sum(-1)
    assert torch.allclose(d1, d2, atol=1e-5)
    assert torch.allclose(rope(q, offset=7).double().norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def test_rotary_offset_matches_slice():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 10, 3, 16)
    assert torch.allclose(rope(x)[:, 6:], rope(x[:, 6:], offset=6))
