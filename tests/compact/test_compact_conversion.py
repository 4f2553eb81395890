"""MHA -> GQA / MQA checkpoint conversion by mean-pooling K/V heads (Ainslie et al., 2023)."""
import pytest
import torch

from effattn.compact import GroupedAttention, convert_kv_heads


def _repeat_heads(gqa: GroupedAttention) -> GroupedAttention:
    """An MHA layer computing exactly what `gqa` computes: each K/V head copied into its group."""
    mha = GroupedAttention(gqa.d_model, gqa.heads, gqa.heads, gqa.head_dim, dtype=gqa.wq.weight.dtype)
    group = gqa.heads // gqa.kv_heads
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for new, old in ((mha.wk, gqa.wk), (mha.wv, gqa.wv)):
            w = old.weight.view(gqa.kv_heads, 1, gqa.head_dim, gqa.d_model).expand(-1, group, -1, -1)
            new.weight.copy_(w.reshape(-1, gqa.d_model))
    return mha


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_converting_already_grouped_heads_is_exact(kv_heads):
    torch.manual_seed(0)
    gqa = GroupedAttention(32, 4, kv_heads, 8, dtype=torch.float64)
    mha = _repeat_heads(gqa)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), rtol=1e-12, atol=1e-12)
        back = convert_kv_heads(mha, kv_heads)
        for name in ("wq", "wk", "wv", "wo"):  # mean of equal copies (group a power of two): bit-exact
            assert torch.equal(getattr(back, name).weight, getattr(gqa, name).weight), name
        assert torch.equal(back(x), gqa(x))


def test_conversion_mean_pools_each_group():
    torch.manual_seed(0)
    mha = GroupedAttention(24, 6, 6, 4, rope=False)
    gqa = convert_kv_heads(mha, 2)
    assert (gqa.kv_heads, gqa.heads, gqa.rope) == (2, 6, None)
    wk = mha.wk.weight.view(6, 4, 24)
    torch.testing.assert_close(gqa.wk.weight.view(2, 4, 24)[1], wk[3:6].mean(0))
    wv = mha.wv.weight.view(6, 4, 24)
    torch.testing.assert_close(gqa.wv.weight.view(2, 4, 24)[0], wv[0:3].mean(0))
    mqa = convert_kv_heads(gqa, 1)  # GQA -> MQA pools the pooled heads again
    torch.testing.assert_close(mqa.wk.weight, wk.mean(0))


def test_conversion_errors():
    mha = GroupedAttention(16, 4, 4, 4)
    with pytest.raises(ValueError, match="kv_heads=3 must divide"):
        convert_kv_heads(mha, 3)
    with pytest.raises(TypeError, match="layer must be a GroupedAttention"):
        convert_kv_heads(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="kv_heads must be >= 1"):
        convert_kv_heads(mha, 0)
