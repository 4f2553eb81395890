"""Eviction policies keep the right tokens, a fixed budget, and track H2O scores through evictions."""
import pytest
import torch

from effattn.kvcache import H2O, ContiguousKVCache, PagedKVCache, StreamingLLM


def filled(L, Hkv=2, D=4, B=2):
    cache = ContiguousKVCache(B, 32, Hkv, D)
    pos = torch.arange(L, dtype=torch.float32).view(1, L, 1, 1).expand(B, L, Hkv, D).contiguous()
    cache.append(pos, pos.clone())
    return cache


def test_streaming_llm_keeps_sinks_and_recent():
    cache, policy = filled(20), StreamingLLM(sinks=2, recent=5)
    policy.evict(cache)
    assert cache.lengths == [7, 7]
    assert cache.k[0, :7, 1, 0].tolist() == [0, 1, 15, 16, 17, 18, 19]
    small = filled(6)
    policy.evict(small)  # under budget: untouched
    assert small.lengths == [6, 6]


def test_h2o_keeps_heavy_hitters_per_head_and_recent():
    cache, policy = filled(12, D=4), H2O(heavy=2, recent=3)
    q = torch.zeros(2, 1, 4, 4)
    # make tokens 2 and 5 heavy for KV head 0 and tokens 7 and 1 for KV head 1 through the keys
    cache.k.zero_()
    cache.k[:, 2, 0, 0], cache.k[:, 5, 0, 0] = 5.0, 4.0
    cache.k[:, 7, 1, 0], cache.k[:, 1, 1, 0] = 5.0, 4.0
    q[..., 0] = 2.0
    policy.observe(q, cache)
    policy.evict(cache)
    assert cache.lengths == [5, 5]
    assert cache.v[0, :5, 0, 0].tolist() == [2, 5, 9, 10, 11]
    assert cache.v[0, :5, 1, 0].tolist() == [1, 7, 9, 10, 11]
    assert policy.score.shape == (2, 2, 5)


def test_eviction_errors():
    with pytest.raises(TypeError, match="ContiguousKVCache"):
        StreamingLLM().evict(PagedKVCache(2, 4, 1, 4))
    cache = ContiguousKVCache(2, 8, 1, 4)
    cache.append(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), lengths=[3, 2])
    with pytest.raises(ValueError, match="equal length"):
        H2O(heavy=1, recent=1).evict(cache)
    with pytest.raises(ValueError, match="recent must be >= 1"):
        StreamingLLM(recent=0)
