"""Quantized caches: packing, quantization error bound, residual window bookkeeping, errors."""
import pytest
import torch

from effattn.kvcache import QuantizedKVCache, int8_cache, kivi_cache, kvquant_cache
from effattn.kvcache.quantize import dequantize, pack, quantize, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_and_layout(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8) and torch.equal(unpack(packed, bits), codes)
    if bits == 4:  # element 2i in the low nibble of byte i, 2i + 1 in the high one
        assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_is_half_a_step(bits):
    x = torch.randn(4, 32, 8, dtype=torch.float64)
    codes, scale, zero = quantize(x, bits, dim=1)
    err = (dequantize(codes, scale, zero, torch.float64) - x).abs()
    assert bool((err <= scale / 2 + 1e-6).all())
    const = torch.ones(2, 8, 3)  # a constant group: scale 0, exact
    c, s, z = quantize(const, bits, dim=1)
    assert torch.equal(dequantize(c, s, z), const)


def test_kivi_residual_window_and_dequantised_contents():
    cache = kivi_cache(2, 64, 2, 16, bits=4, group=8, residual=4)
    k, v = torch.randn(2, 30, 2, 16), torch.randn(2, 30, 2, 16)
    cache.append(k[:, :11], v[:, :11], lengths=[11, 3])
    cache.append(k[:, 11:], v[:, 11:], lengths=[19, 2])
    # quantized = largest group multiple leaving >= residual tokens in full precision
    assert cache.lengths == [30, 5] and cache.quantized == [24, 0]
    kk, vv = cache.keys_values(0, torch.float64)
    assert torch.equal(kk[24:].float(), k[0, 24:30]) and torch.equal(vv[24:].float(), v[0, 24:30])
    # per-channel keys: error within half a step of each (8-token group, channel) range
    rng = k[0, :24].view(3, 8, 2, 16)
    step = (rng.amax(1) - rng.amin(1)) / 15
    err = (kk[:24].float() - k[0, :24]).view(3, 8, 2, 16).abs()
    assert bool((err <= step[:, None] / 2 + 1e-3).all())
    k1, _ = cache.keys_values(1)
    assert torch.equal(k1, torch.cat([k[1, :3], k[1, 11:13]]))


def test_int8_quantizes_everything_per_token():
    cache = int8_cache(1, 16, 1, 32)
    x = torch.randn(1, 5, 1, 32)
    cache.append(x, x)
    assert cache.quantized == [5]
    k, v = cache.keys_values(0)
    step = (x.amax(-1) - x.amin(-1)) / 255
    assert bool(((k - x[0]).abs() <= step[0, :, :, None] / 2 + 1e-5).all())
    assert 0 < cache.nbytes() < 5 * 2 * 32 * 4


def test_quantized_errors():
    with pytest.raises(ValueError, match="key_bits must be one of"):
        QuantizedKVCache(1, 8, 1, 16, key_bits=3)
    with pytest.raises(ValueError, match="key_axis must be one of"):
        QuantizedKVCache(1, 8, 1, 16, key_axis="row")
    with pytest.raises(ValueError, match="value_group must be a power of two"):
        QuantizedKVCache(1, 8, 1, 16, value_group=6)
    with pytest.raises(ValueError, match="value_group=32 must divide head_dim_v=16"):
        QuantizedKVCache(1, 8, 1, 16, value_group=32)
    with pytest.raises(ValueError, match="bits must be one of"):
        kivi_cache(1, 8, 1, 16, bits=8)
    with pytest.raises(ValueError, match="key_outliers=17 must be <= head_dim=16"):
        kvquant_cache(1, 8, 1, 16, outliers=17)
    with pytest.raises(ValueError, match="rope_base must be a number > 1"):
        kvquant_cache(1, 8, 1, 16, rope_base=0.5)
    cache = kivi_cache(1, 8, 1, 16, group=8)
    with pytest.raises(ValueError, match="exceed max_len=8"):
        cache.append(torch.zeros(1, 9, 1, 16), torch.zeros(1, 9, 1, 16))


def test_kvquant_sparse_outliers_are_exact_and_keep_ranges_tight():
    torch.manual_seed(0)
    k = torch.randn(1, 16, 1, 16)
    k[0, torch.arange(16), 0, torch.randint(0, 16, (16,))] = 50.0  # one huge entry per key
    errors = {}
    for n_out in (0, 1):
        cache = kvquant_cache(1, 16, 1, 16, bits=4, group=8, outliers=n_out, residual=0)
        cache.pre_rope = False  # compare the stored (pre-RoPE) keys directly
        cache.append(k, k)
        kk, _ = cache.keys_values(0)
        errors[n_out] = (kk - k[0]).abs()
    assert float(errors[1][k[0] == 50.0].max()) == 0.0  # the sparse part is kept exactly
    assert float(errors[1].max()) < float(errors[0].max()) / 10  # and no longer stretches the ranges


def test_kvquant_rotates_pre_rope_keys_like_nn_rotary():
    from effattn.nn.rotary import RotaryEmbedding

    k = torch.randn(1, 6, 2, 16, dtype=torch.float64)
    cache = kvquant_cache(1, 8, 2, 16, bits=8, group=8, outliers=0, residual=8, dtype=torch.float64)
    cache.append(k, k)  # all 6 tokens stay in the full-precision residual window
    kk, _ = cache.keys_values(0)
    expect = RotaryEmbedding(16)(k.float(), 0)[0].double()
    assert torch.allclose(kk, expect, atol=1e-5)
