"""flash_attention (Triton fwd + bwd) against the float64 reference under the 2x rule, outputs poisoned.

Runs through Triton's interpreter on CPU: shapes are small and not multiples of the 32 x 32 tiles, so
every case crosses partial tiles; the feature matrix is sampled rather than fully crossed.
"""
from dataclasses import replace

import pytest
import torch

import effattn
from effattn.registry import REGISTRY, Shape
from effattn.testing import assert_matches_reference

FLASH = REGISTRY.get("flash")
GQA = Shape(batch=2, seq_q=37, heads=4, kv_heads=2, head_dim=32)
CROSS = Shape(batch=1, seq_q=19, seq_k=45, heads=4, kv_heads=1, head_dim=32)
TALL = Shape(batch=1, seq_q=45, seq_k=37, heads=2, kv_heads=2, head_dim=32)  # causal: 8 rows see nothing


@pytest.mark.parametrize("shape", [GQA, CROSS, TALL], ids=["gqa", "cross_mqa", "T_gt_S"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_causal_and_not(shape, causal, device):
    assert_matches_reference(FLASH, shape=shape, device=device, causal=causal, return_lse=True)


@pytest.mark.parametrize("options", [
    dict(window=(5, 3)),
    dict(window=7, causal=True),
    dict(window=(0, 6), causal=False),
    dict(softcap=5.0, causal=True),
    dict(softcap=3.0, window=(9, 2), scale=0.3),
], ids=str)
def test_fp32_window_softcap(options, device):
    assert_matches_reference(FLASH, shape=replace(CROSS, seq_q=33), device=device, return_lse=True, **options)


@pytest.mark.parametrize("dtype,options", [
    (torch.bfloat16, dict(causal=True)),
    (torch.float16, dict(causal=False, return_lse=True)),
    (torch.bfloat16, dict(causal=True, window=11, softcap=4.0)),
], ids=str)
def test_half_precision(dtype, options, device):
    assert_matches_reference(FLASH, shape=GQA, dtype=dtype, device=device, **options)


@pytest.mark.parametrize("D,Dv,backward", [(64, 64, True), (96, 64, False), (128, 128, False), (256, 256, False),
                                           (16, 32, False)])
def test_head_dims(D, Dv, backward, device):
    shape = Shape(batch=1, seq_q=21, seq_k=40, heads=2, kv_heads=1, head_dim=D, head_dim_v=Dv)
    assert_matches_reference(FLASH, shape=shape, device=device, backward=backward, causal=True)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(4, 9), return_lse=True)], ids=str)
def test_varlen(options, device):
    cu = torch.tensor([0, 13, 13, 50, 81], dtype=torch.int32, device=device)  # with an empty sequence
    shape = Shape(batch=1, seq_q=81, heads=4, kv_heads=2, head_dim=32)
    assert_matches_reference(FLASH, shape=shape, device=device, cu_seqlens=cu, **options)


def test_empty_rows_give_zero_and_minus_inf(device):
    q, k, v = (torch.randn(1, n, 2, 32, device=device) for n in (45, 37, 37))
    o, lse = effattn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(o[:, :8], torch.zeros_like(o[:, :8]))
    assert bool(torch.isneginf(lse[..., :8]).all()) and bool(torch.isfinite(lse[..., 8:]).all())


def test_sliding_window_method_and_default(device):
    assert_matches_reference(REGISTRY.get("flash_sliding_window"), shape=CROSS, device=device, window=6)
    q, k, v = (torch.randn(1, 20, 2, 32, device=device) for _ in range(3))
    torch.testing.assert_close(effattn.attention(q, k, v, causal=True), effattn.flash_attention(q, k, v, causal=True))
    assert effattn.api.DEFAULT_METHOD == "flash"


def test_gradient_flows_through_noncontiguous_inputs(device):
    x = torch.randn(2, 24, 3, 32, device=device, requires_grad=True)
    q, k, v = x[:, :, 0:1].expand(2, 24, 2, 32), x[:, :, 1:2], x[:, :, 2:3]  # GQA 2:1, strided views
    effattn.flash_attention(q, k, v, causal=True).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    effattn.reference.softmax_attention(ref[:, :, 0:1].expand(2, 24, 2, 32), ref[:, :, 1:2], ref[:, :, 2:3],
                                        causal=True).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-5, rtol=1e-4)


def test_tma_descriptor_forward(monkeypatch, device):
    """The forward's TMA-descriptor load path (chosen by the tuner on Hopper), pinned here."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "fwd=32,32,4,1,1")
    assert_matches_reference(FLASH, shape=GQA, dtype=torch.bfloat16, device=device, causal=True, return_lse=True)
    assert_matches_reference(FLASH, shape=replace(CROSS, seq_q=33), dtype=torch.float16, device=device,
                             window=(9, 2), backward=False)
    assert_matches_reference(FLASH, shape=Shape(batch=1, seq_q=20, heads=2, head_dim=96), device=device,
                             backward=False)  # padded head dim: falls back to pointer loads


@pytest.mark.parametrize("tma", [0, 1])
def test_look_ahead_forward(monkeypatch, device, tma):
    """The forward whose unmasked loop issues the next key block's Q K^T before this block's softmax (a tuner
    candidate on Hopper), pinned: no unmasked block (short keys), one, and several, each followed by the
    masked tail; causal, windows, GQA, cross lengths."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", f"fwd=32,32,4,1,{tma},0,1")
    for seq_q, seq_k in ((20, 20), (45, 70), (130, 130)):
        shape = replace(GQA, seq_q=seq_q, seq_k=seq_k)
        assert_matches_reference(FLASH, shape=shape, dtype=torch.bfloat16, device=device, causal=True,
                                 return_lse=True, backward=False)
        assert_matches_reference(FLASH, shape=shape, device=device, backward=False)
    assert_matches_reference(FLASH, shape=replace(CROSS, seq_q=97, seq_k=150), dtype=torch.float16, device=device,
                             window=(40, 3), backward=False)


def test_early_dp_backward(monkeypatch, device):
    """The dK/dV kernel that issues dP^T before its exponentials (EARLY_DP, a tuner candidate), pinned:
    gradients of every input against the float64 reference, causal GQA, window with softcap, cross lengths."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "dkdv=32,32,4,1,0,0,1")
    assert_matches_reference(FLASH, shape=replace(GQA, seq_q=70), dtype=torch.bfloat16, device=device, causal=True)
    assert_matches_reference(FLASH, shape=replace(CROSS, seq_q=50, seq_k=77), device=device, window=(9, 2),
                             softcap=4.0)


def test_one_warpgroup_tiles(monkeypatch, device):
    """The one-warpgroup tiles the H100 tuner picks for short programs (forward 64 x 64 TMA, dK/dV 64 x 64, dQ
    64 x 32), pinned: a causal window and GQA at D = 128, lengths that are not multiples of 64, every gradient."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "fwd=64,64,4,3,1;dkdv=64,64,4,2;dq=64,32,4,3")
    shape = Shape(batch=1, seq_q=150, heads=2, kv_heads=1, head_dim=128)
    assert_matches_reference(FLASH, shape=shape, dtype=torch.bfloat16, device=device, causal=True, window=(40, 0))


def test_cached_launch_plan_and_inference_path(monkeypatch, device):
    """Repeated calls reuse the forward's launch plan (fresh data, same shapes, outputs poisoned each time),
    without autograd when nothing needs a gradient; a misaligned base drops the pinned TMA path."""
    from effattn._memory import poisoned_outputs
    from effattn.hardware import flash_bwd, flash_fwd

    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "fwd=32,32,4,1,1")
    gen = torch.Generator(device=device).manual_seed(3)
    for step in range(3):
        bufs = [torch.randn(29 * 64 + 1, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(3)]
        off = int(step == 2)  # step 2: contiguous rows of heads, but the bases 2 bytes off 16-byte alignment
        q, k, v = (b[off:off + 29 * 64].view(1, 29, 2, 32) for b in bufs)
        with poisoned_outputs(), torch.no_grad():
            o = effattn.flash_attention(q, k, v, causal=True)
        x = [t.double().requires_grad_() for t in (q, k, v)]
        ref = effattn.reference.softmax_attention(*x, causal=True)
        torch.testing.assert_close(o.double(), ref.detach(), atol=2e-2, rtol=2e-2)
        if step < 2:  # the backward's plan, reused on the second step
            g = torch.randn(ref.shape, device=device, generator=gen, dtype=torch.bfloat16)
            y = [t.detach().requires_grad_() for t in (q, k, v)]
            with poisoned_outputs():
                effattn.flash_attention(*y, causal=True).backward(g)
            ref.backward(g.double())
            for a, b in zip(y, x):
                torch.testing.assert_close(a.grad.double(), b.grad, atol=5e-2, rtol=5e-2)
    assert any(sig[1] == (1, 29, 2, 32) for sig in flash_fwd._PLANS)
    assert any(sig[0][0] == (1, 29, 2, 32) for sig in flash_bwd._PLANS)


def test_gradient_of_lse_alone(device):
    """A loss on the LSE only (o unused: its gradient arrives as None) still gives exact gradients."""
    x = [torch.randn(1, 21, 2, 32, device=device, requires_grad=True) for _ in range(3)]
    effattn.flash_attention(*x, causal=True, return_lse=True)[1].sum().backward()
    y = [t.detach().clone().requires_grad_(True) for t in x]
    effattn.reference.softmax_attention(*y, causal=True, return_lse=True)[1].sum().backward()
    for a, b in zip(x[:2], y[:2]):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert y[2].grad is None and torch.equal(x[2].grad, torch.zeros_like(x[2]))  # LSE does not depend on v


SINK_CASES = [
    dict(window=(9, 0), causal=True, sink_tokens=4),
    dict(window=(6, 5), sink_tokens=37),  # sinks over two 32-key tiles, a right edge
    dict(window=(40, 0), causal=True, sink_tokens=50),  # sinks reaching into the window
    dict(window=(3, 0), causal=True, sink_tokens=1, softcap=4.0),
]
SINK_SHAPE = Shape(batch=1, seq_q=90, seq_k=103, heads=4, kv_heads=2, head_dim=32)


@pytest.mark.parametrize("options", SINK_CASES, ids=str)
def test_attention_sinks(options, device):
    """StreamingLLM's sinks + window on the kernel's window path: extra key tiles left of the window in the
    forward and dQ, extra query tiles below it in dK/dV; T != S, so rows are offset from the keys."""
    assert_matches_reference(FLASH, shape=SINK_SHAPE, device=device, return_lse=True, **options)


@pytest.mark.parametrize("shape, options", [(replace(SINK_SHAPE, batch=2), o) for o in SINK_CASES] + [
    (Shape(batch=1, seq_q=250, heads=2, kv_heads=1, head_dim=32), dict(window=(80, 0), causal=True, sink_tokens=5)),
], ids=str)  # the last: the band holds whole query tiles below the sink block (the unmasked loop)
def test_attention_sinks_rows_split(shape, options, monkeypatch, device):
    """The sink blocks' rows below the band cut into parts, each a dK/dV program of its own whose float32
    partial sums the launcher adds into dK / dV; run twice, the second time through the cached launch plan."""
    from effattn.hardware import flash_bwd

    monkeypatch.setattr(flash_bwd, "SINK_PART_ROWS", 16)
    monkeypatch.setattr(flash_bwd, "_PLANS", {})
    for _ in range(2):
        assert_matches_reference(FLASH, shape=shape, device=device, **options)
    kv_parts = {plan[0][2][0] for plan in flash_bwd._PLANS.values()}
    assert kv_parts and min(kv_parts) >= 2  # every backward split its sink rows


def test_attention_sinks_varlen_and_errors(device):
    cu = torch.tensor([0, 70, 75, 150], dtype=torch.int32, device=device)
    shape = Shape(batch=1, seq_q=150, heads=2, kv_heads=1, head_dim=32)
    assert_matches_reference(FLASH, shape=shape, device=device, cu_seqlens=cu, causal=True, window=(7, 0),
                             sink_tokens=3)
    q = torch.randn(1, 8, 2, 32, device=device)
    with pytest.raises(ValueError, match="sink_tokens=2 needs a window"):
        effattn.flash_attention(q, q, q, causal=True, sink_tokens=2)
    with pytest.raises(ValueError, match="sink_tokens must be an int >= 0, got -1"):
        effattn.flash_attention(q, q, q, window=4, sink_tokens=-1)


def _growing_scores(shape: Shape, dtype, device, generator, **options) -> dict:
    """q, k, v whose scores jump by ~58 log2 units every 40 keys in half of the rows (and fall in the others),
    with N(0, 1) noise: the lazy forward must move its running max at those key blocks (three jumps overflow float32
    if it does not), and may keep it between."""
    B, T, H, D = shape.batch, shape.seq_q, shape.heads, shape.head_dim
    u = torch.zeros(D)
    u[0] = 1.0
    ramp = 40.0 * D ** 0.5 * torch.div(torch.arange(shape.S), 40, rounding_mode="floor").float()
    sign = torch.where(torch.arange(T) % 2 == 0, 1.0, -0.5)
    q = torch.randn((B, T, H, D), generator=generator) + sign[None, :, None, None] * u
    k = torch.randn((B, shape.S, shape.Hkv, D), generator=generator) + ramp[None, :, None, None] * u
    v = torch.randn((B, shape.S, shape.Hkv, shape.Dv), generator=generator)
    return {"q": q.to(device, dtype), "k": k.to(device, dtype), "v": v.to(device, dtype), **options}


@pytest.mark.parametrize("tma", [0, 1])
def test_lazy_rescale_forward(monkeypatch, device, tma):
    """The forward whose unmasked loop moves its running max only past LAZY_GROWTH (a tuner candidate on
    Hopper), pinned, on scores that jump every 40 keys (so it must move there) and on plain N(0, 1) scores (so it
    keeps the first tile's max): outputs and LSE against float64, causal and not, bf16 and fp32."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", f"fwd=32,32,4,1,{tma},0,0,0,1")
    growing = replace(FLASH, make_inputs=_growing_scores)
    for method in (growing, FLASH):
        for causal in (False, True):
            shape = replace(GQA, seq_q=130, seq_k=150)
            assert_matches_reference(method, shape=shape, device=device, causal=causal, return_lse=True,
                                     backward=False)
            assert_matches_reference(method, shape=shape, dtype=torch.bfloat16, device=device, causal=causal,
                                     return_lse=True, backward=False)


def test_tma_dkdv_backward(monkeypatch, device):
    """The dK/dV kernel loading Q and dO through TMA descriptors (a tuner candidate on Hopper), pinned: causal,
    windows, GQA, cross lengths, a block mask; fp32 inputs and padded head dims fall back to pointer loads."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "dkdv=32,32,4,1,1")
    for shape in (GQA, replace(GQA, seq_q=70, seq_k=90), CROSS):
        assert_matches_reference(FLASH, shape=shape, dtype=torch.bfloat16, device=device, causal=True)
        assert_matches_reference(FLASH, shape=shape, dtype=torch.float16, device=device, window=(9, 2))
    bm = effattn.sparse.block_mask(lambda b, h, i, j: (i // 32 + j // 32) % 2 == 0, 1, 4, 70, 70, block=(32, 32),
                                   device=device)
    assert_matches_reference(FLASH, shape=replace(GQA, seq_q=70), dtype=torch.bfloat16, device=device,
                             block_mask=bm)
    assert_matches_reference(FLASH, shape=GQA, device=device, causal=True)
    assert_matches_reference(FLASH, shape=Shape(batch=1, seq_q=20, heads=2, head_dim=96), dtype=torch.bfloat16,
                             device=device)
