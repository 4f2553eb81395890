"""Compact attention layers: fwd and bwd vs their float64 references, prefill + decode == full forward,
and the bytes their caches actually hold."""
import copy

import pytest
import torch

from effattn.compact import MFA, MLA, TPA, GroupedAttention, formulas
from effattn.compact.formulas import MLADims, TPADims
from effattn.testing import compare

D_MODEL, HEADS, HEAD_DIM = 48, 4, 16
MLA_DIMS = MLADims(q_rank=24, kv_rank=20, d_nope=16, d_rope=8, d_v=12)
TPA_DIMS = TPADims(q_rank=3, k_rank=2, v_rank=3)

LAYERS = {
    "mha": (lambda: GroupedAttention(D_MODEL, HEADS, HEADS, HEAD_DIM), formulas.mha_cache(HEADS, HEAD_DIM)),
    "gqa": (lambda: GroupedAttention(D_MODEL, HEADS, 2, HEAD_DIM), formulas.gqa_cache(2, HEAD_DIM)),
    "mqa": (lambda: GroupedAttention(D_MODEL, HEADS, 1, HEAD_DIM), formulas.mqa_cache(HEAD_DIM)),
    "mla": (lambda: MLA(D_MODEL, HEADS, MLA_DIMS), formulas.mla_cache(MLA_DIMS.kv_rank, MLA_DIMS.d_rope)),
    "mfa": (lambda: MFA(D_MODEL, HEADS, HEAD_DIM), formulas.mfa_cache(HEAD_DIM)),
    "tpa": (lambda: TPA(D_MODEL, HEADS, HEAD_DIM, TPA_DIMS),
            formulas.tpa_cache(TPA_DIMS.k_rank, TPA_DIMS.v_rank, HEADS, HEAD_DIM)),
}
# (layer, forward keyword arguments of the fast path)
FAST = [(n, {}) for n in LAYERS if n != "mla"] + [("mla", {"form": "absorbed"}), ("mla", {"form": "expanded"})]


def _layer(name, dtype=torch.float64):
    torch.manual_seed(1)
    return LAYERS[name][0]().to(dtype)


def _run(layer, x, grad_out, dtype, **kwargs):
    layer = copy.deepcopy(layer).to(dtype)
    x = x.detach().to(dtype).requires_grad_(True)
    y = layer(x, **kwargs)
    (y * grad_out.to(dtype)).sum().backward()
    return [y, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("name,kwargs", FAST, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_layer_matches_float64_reference(name, kwargs):
    """Output, input gradient and every parameter gradient in float32 vs the float64 reference path."""
    layer = _layer(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, D_MODEL, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 13, D_MODEL, generator=gen, dtype=torch.float64)
    ref = _run(layer, x, g, torch.float64, reference=True)
    base = _run(layer, x, g, torch.float32, reference=True)
    fast = _run(layer, x, g, torch.float32, **kwargs)
    names = ["y", "dx"] + [f"d{n}" for n, _ in layer.named_parameters()]
    results = [compare(n, f, b, r, torch.float32) for n, f, b, r in zip(names, fast, base, ref)]
    assert all(r.ok for r in results), "\n".join(map(str, results))
    assert all(float(t.abs().max()) > 0 for t in ref[1:]), "every parameter must get a gradient"


@pytest.mark.parametrize("name", list(LAYERS))
def test_prefill_then_decode_equals_full_forward(name):
    """Full causal forward == prefill of 6 tokens, a chunk of 3, then decoding token by token from the cache
    (MLA: the full forward expands, the cached path absorbs W_UK / W_UV)."""
    layer = _layer(name)
    x = torch.randn(2, 14, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(batch=2, capacity=16)
        steps = [layer(x[:, :6], cache), layer(x[:, 6:9], cache)]
        steps += [layer(x[:, t:t + 1], cache) for t in range(9, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_holds_exactly_the_claimed_bytes(name, dtype):
    layer = _layer(name, dtype)
    per_token = LAYERS[name][1]
    cache = layer.new_cache(batch=3, capacity=10)
    assert layer.cache_elements_per_token() == per_token
    held = sum(t.untyped_storage().nbytes() for t in cache.buffers.values())  # what is really allocated
    assert held == cache.nbytes == 3 * 10 * per_token * torch.tensor([], dtype=dtype).element_size()
    assert cache.bytes_per_token() == per_token * torch.tensor([], dtype=dtype).element_size()
    with torch.no_grad():
        layer(torch.randn(3, 4, D_MODEL, dtype=dtype), cache)
    assert cache.length == 4 and cache.nbytes == held  # appending writes in place, allocates nothing


def test_mla_cache_holds_only_the_latent_and_rope_key():
    layer = _layer("mla")
    cache = layer.new_cache(batch=1, capacity=5)
    assert {n: tuple(b.shape) for n, b in cache.buffers.items()} == {
        "kv_latent": (1, 5, MLA_DIMS.kv_rank + MLA_DIMS.d_rope)}
