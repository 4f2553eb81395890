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


@pytest.mark.parametrize("heads_first", [False, True])
def test_cache_views_return_what_was_appended(heads_first):
    from effattn.compact import LayerCache

    cache = LayerCache({"k": (3, 5), "c": (4,)}, batch=2, capacity=9, heads_first=heads_first)
    k, c = torch.randn(2, 7, 3, 5), torch.randn(2, 7, 4)
    cache.append(k=k[:, :4], c=c[:, :4])
    out = cache.append(k=k[:, 4:], c=c[:, 4:])
    assert torch.equal(out["k"], k) and torch.equal(out["c"], c)
    assert out["k"].data_ptr() == cache.buffers["k"].data_ptr()  # views of the buffers, not copies
    assert cache.buffers["k"].shape == ((2, 3, 9, 5) if heads_first else (2, 9, 3, 5))
    half = cache.narrow_batch(1)
    assert torch.equal(half.view()["k"], k[:1]) and half.nbytes * 2 == cache.nbytes


def _largest_intermediate(fn) -> int:
    """numel of the largest tensor any op creates while fn runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t._base is None:  # views allocate nothing
                    Watch.largest = max(Watch.largest, t.numel())
            return out

    with Watch():
        fn()
    return Watch.largest


@pytest.mark.parametrize("name,kwargs,expands", [("mla", {"form": "absorbed"}, False),
                                                 ("mla", {"form": "expanded"}, True), ("tpa", {}, False)])
def test_decoding_never_materialises_per_head_keys(name, kwargs, expands):
    """A decode step of absorbed MLA and of TPA allocates nothing of the size of per-head K/V (B S H d)."""
    layer = _layer(name)
    B, S = 2, 60
    cache = layer.new_cache(batch=B, capacity=S + 1)
    with torch.no_grad():
        layer(torch.randn(B, S, D_MODEL, dtype=torch.float64), cache)
        x = torch.randn(B, 1, D_MODEL, dtype=torch.float64)
        largest = _largest_intermediate(lambda: layer(x, cache, **kwargs))
    per_head_keys = B * (S + 1) * HEADS * 16  # both layers' per-head key dim is 16 (MLA d_N, TPA head dim)
    assert (largest >= per_head_keys) == expands, (largest, per_head_keys)


@pytest.mark.parametrize("name", ["gqa", "mqa", "mfa"])
def test_decode_kernel_reads_the_cache_in_place(name):
    """decode_kernel=True: prefill + decode through the split-KV Triton kernel (interpreted on CPU) on the
    layer's own cache buffers equals the full forward of the materialised path."""
    layer = _layer(name, torch.float32)
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        full = layer(x)
        layer.decode_kernel = True
        cache = layer.new_cache(batch=2, capacity=11)
        steps = [layer(x[:, :7], cache)] + [layer(x[:, t:t + 1], cache) for t in (7, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
