"""FlashDecoding kernel vs the float64 reference, for every cache type, GQA ratio and odd/mixed lengths."""
import pytest
import torch

import effattn
from effattn.kvcache import (ContiguousKVCache, PagedKVCache, QuantizedKVCache, decode_reference, int8_cache,
                             kivi_cache, kvquant_cache)
from effattn.testing import compare

KINDS = ["contiguous", "paged", "kivi2", "kivi4", "int8", "kivi4_tokenkeys", "kvquant"]


def make_cache(kind, B, Hkv, D, dtype, device, max_len=96):
    if kind == "contiguous":
        return ContiguousKVCache(B, max_len, Hkv, D, dtype=dtype, device=device)
    if kind == "paged":
        cache = PagedKVCache(B * (max_len // 8 + 1), 8, Hkv, D, dtype=dtype, device=device)
        for _ in range(B):
            cache.add_sequence()
        return cache
    if kind == "kvquant":  # pre-RoPE per-channel 2-bit keys with two sparse outliers per key
        return kvquant_cache(B, max_len, Hkv, D, bits=2, group=8, outliers=2, residual=4, dtype=dtype, device=device)
    if kind == "int8":
        return int8_cache(B, max_len, Hkv, D, group=16, dtype=dtype, device=device)
    if kind == "kivi4_tokenkeys":  # per-token 4-bit keys, a residual that is not a group multiple
        return QuantizedKVCache(B, max_len, Hkv, D, key_axis="token", key_group=16, value_group=8, residual=5,
                                dtype=dtype, device=device)
    bits = int(kind[-1])
    return kivi_cache(B, max_len, Hkv, D, bits=bits, group=8, residual=4, dtype=dtype, device=device)


def fill(cache, B, Hkv, D, lengths, device, dtype, gen, steps=2):
    """Append in several calls of different lengths per sequence (prefill + decode-like steps)."""
    total = [0] * B
    for s in range(steps):
        chunk = [n // steps if s < steps - 1 else n - (steps - 1) * (n // steps) for n in lengths]
        T = max(chunk)
        k = torch.randn(B, T, Hkv, D, generator=gen).to(device, dtype)
        v = torch.randn(B, T, Hkv, D, generator=gen).to(device, dtype)
        cache.append(k, v, lengths=chunk)
        total = [a + b for a, b in zip(total, chunk)]
    assert cache.batch_lengths() == total == list(lengths)


def check(kind, B, H, Hkv, D, Tq, lengths, dtype, device, **kw):
    gen = torch.Generator().manual_seed(B * 100 + Tq)
    cache = make_cache(kind, B, Hkv, D, dtype, device)
    fill(cache, B, Hkv, D, lengths, device, dtype, gen)
    q = torch.randn(B, Tq, H, D, generator=gen).to(device, dtype)
    o, lse = effattn.decode(q, cache, return_lse=True, **kw)
    ref, ref_lse = decode_reference(q.cpu(), cache, return_lse=True)
    base, base_lse = decode_reference(q, cache, dtype=dtype, return_lse=True)
    for name, f, b, r in (("o", o, base, ref), ("lse", lse, base_lse, ref_lse)):
        c = compare(name, f, b, r, dtype)
        assert c.ok, f"{kind} {name}: {c}"


@pytest.mark.parametrize("kind", KINDS)
def test_decode_every_cache_mixed_lengths_gqa(kind, device):
    # odd, mixed per-sequence lengths (one shorter than a quantization group), GQA ratio 3, Tq = 2
    check(kind, B=3, H=6, Hkv=2, D=32, Tq=2, lengths=[53, 3, 37], dtype=torch.float32, device=device)


@pytest.mark.parametrize("kind", ["contiguous", "paged", "kivi4", "int8", "kvquant"])
def test_decode_bf16(kind, device):
    check(kind, B=2, H=4, Hkv=1, D=16, Tq=1, lengths=[45, 29], dtype=torch.bfloat16, device=device)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 1)])
def test_decode_gqa_ratios_and_splits(H, Hkv, device):
    # MHA and MQA, three query tokens, forced many splits (some beyond a sequence's end) and one split
    for splits in (1, 7):
        check("paged", B=2, H=H, Hkv=Hkv, D=16, Tq=3, lengths=[41, 9], dtype=torch.float32, device=device,
              num_splits=splits, block_n=16)


def test_decode_noncausal_and_scale(device):
    gen = torch.Generator().manual_seed(3)
    cache = make_cache("contiguous", 2, 2, 16, torch.float32, device)
    fill(cache, 2, 2, 16, [19, 33], device, torch.float32, gen, steps=1)
    q = torch.randn(2, 3, 4, 16, generator=gen).to(device)
    o = effattn.decode(q, cache, causal=False, scale=0.3)
    ref = decode_reference(q.cpu(), cache, causal=False, scale=0.3)
    base = decode_reference(q, cache, dtype=torch.float32, causal=False, scale=0.3)
    assert compare("o", o, base, ref, torch.float32).ok


def test_decode_validation_errors(device):
    cache = make_cache("contiguous", 2, 2, 16, torch.float32, device)
    cache.append(torch.randn(2, 4, 2, 16, device=device), torch.randn(2, 4, 2, 16, device=device))
    q = torch.randn(2, 1, 4, 16, device=device)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        effattn.decode(q.tolist(), cache)
    with pytest.raises(TypeError, match="cache must be a KV cache"):
        effattn.decode(q, {"k": 1})
    with pytest.raises(ValueError, match="batch size B=3"):
        effattn.decode(torch.randn(3, 1, 4, 16, device=device), cache)
    with pytest.raises(ValueError, match="multiple of the cache's Hkv=2"):
        effattn.decode(torch.randn(2, 1, 3, 16, device=device), cache)
    with pytest.raises(ValueError, match="head dim D=16"):
        effattn.decode(torch.randn(2, 1, 4, 8, device=device), cache)
    with pytest.raises(TypeError, match="cache's dtype"):
        effattn.decode(q.half(), cache)
    with pytest.raises(ValueError, match="Tq=5 tokens"):
        effattn.decode(torch.randn(2, 5, 4, 16, device=device), cache)
    with pytest.raises(ValueError, match="num_splits"):
        effattn.decode(q, cache, num_splits=0)
    with pytest.raises(ValueError, match="num_splits must be <= 256"):
        effattn.decode(q, cache, num_splits=257)
    with pytest.raises(ValueError, match="block_n"):
        effattn.decode(q, cache, block_n=24)
    with pytest.raises(ValueError, match="scale"):
        effattn.decode(q, cache, scale=-1.0)
    with pytest.raises(ValueError, match="seq_ids is only meaningful"):
        effattn.decode(q, cache, seq_ids=[0, 1])
    odd = ContiguousKVCache(1, 8, 1, 24, device=device)
    odd.append(torch.randn(1, 2, 1, 24, device=device), torch.randn(1, 2, 1, 24, device=device))
    with pytest.raises(ValueError, match="head dims"):
        effattn.decode(torch.randn(1, 1, 1, 24, device=device), odd)


def test_flash_decoding_validation(device):
    q, k = torch.randn(1, 4, 2, 16, device=device), torch.randn(1, 3, 2, 16, device=device)
    with pytest.raises(ValueError, match="Tq <= S"):
        effattn.hardware.flash_decoding(q, k, k)
    with pytest.raises(ValueError, match="head dims"):
        effattn.hardware.flash_decoding(q[..., :12], k[..., :12], k[..., :12], causal=False)
    with pytest.raises(TypeError, match="dtype"):
        effattn.hardware.flash_decoding(q.double(), k.double(), k.double(), causal=False)
