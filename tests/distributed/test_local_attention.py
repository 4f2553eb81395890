"""Single-process parts of context parallelism: the local attention with LSE and its backward given the
final LSE, the exact merge, zigzag reordering, a world of one, and every error path."""
import math

import pytest
import torch
import torch.distributed as dist

import effattn
from effattn.distributed import (ContextParallel, contiguous_to_zigzag, local, merge_into, ring_attention, shard,
                                 ulysses_attention, unshard, zigzag_to_contiguous)
from effattn.reference import softmax_attention


def _qkv(T, S, H, Hkv, D=8, Dv=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in ((2, T, H, D), (2, S, Hkv, D), (2, S, Hkv, Dv))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,S,H,Hkv", [(13, 13, 4, 2), (7, 19, 3, 1)])
def test_torch_backend_matches_reference(monkeypatch, causal, T, S, H, Hkv):
    monkeypatch.setattr(local, "QUERY_BLOCK", 4)  # several query blocks, the last one ragged
    q, k, v = (x.requires_grad_() for x in _qkv(T, S, H, Hkv))
    o_ref, lse_ref = softmax_attention(q, k, v, causal=causal, return_lse=True)
    do = torch.randn_like(o_ref)
    want = torch.autograd.grad(o_ref, (q, k, v), do)
    o, lse = local.torch_forward(q.detach(), k.detach(), v.detach(), causal=causal, scale=8 ** -0.5)
    got = local.torch_backward(do, q.detach(), k.detach(), v.detach(), o, lse, causal=causal, scale=8 ** -0.5)
    assert (o - o_ref).abs().max() < 1e-12 and (lse - lse_ref).abs().max() < 1e-12
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() < 1e-12


def test_merge_of_key_blocks_is_exact_and_block_gradients_sum():
    q, k, v = _qkv(9, 14, 4, 2, seed=1)
    o_ref, lse_ref = softmax_attention(q, k, v, return_lse=True)
    o = torch.zeros_like(o_ref)
    lse = torch.full_like(lse_ref, -math.inf)
    do = torch.randn_like(o_ref)
    dk = torch.zeros_like(k)
    for cols in (slice(0, 5), slice(5, 14)):
        merge_into(o, lse, *local.torch_forward(q, k[:, cols], v[:, cols], scale=8 ** -0.5))
    for cols in (slice(0, 5), slice(5, 14)):
        dk[:, cols] = local.torch_backward(do, q, k[:, cols], v[:, cols], o, lse, scale=8 ** -0.5)[1]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dk_ref = torch.autograd.grad(softmax_attention(*leaves), leaves[1], do)[0]
    assert (o - o_ref).abs().max() < 1e-12 and (lse - lse_ref).abs().max() < 1e-12
    assert (dk - dk_ref).abs().max() < 1e-12


def test_zigzag_order():
    x = torch.arange(8).view(1, 8)
    z = contiguous_to_zigzag(x, world=2)  # rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert z.tolist() == [[0, 1, 6, 7, 2, 3, 4, 5]]
    assert torch.equal(zigzag_to_contiguous(z, world=2), x)


def test_needs_an_initialised_process_group():
    q, k, v = _qkv(4, 4, 2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, k, v)


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    path = tmp_path_factory.mktemp("world1") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_world_of_one_is_plain_attention(world_of_one):
    q, k, v = _qkv(10, 10, 4, 2, seed=2)
    ref = softmax_attention(q, k, v, causal=True)
    assert (ring_attention(q, k, v, causal=True) - ref).abs().max() < 1e-12
    assert (ulysses_attention(q, k, v, causal=True) - ref).abs().max() < 1e-12
    assert torch.equal(unshard(shard(q, zigzag=True), zigzag=True), q)


def _layer_without_attention(x):
    return x * 2


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: ring_attention(q, k, v, backend="cuda"), ValueError, "backend must be one of"),
    (lambda q, k, v: ring_attention(q, k, v, backend="sdpa"), ValueError, "backend='sdpa' needs CUDA"),
    (lambda q, k, v: ring_attention(q[:, :9], k[:, :9], v[:, :9], causal=True), ValueError, "must be even"),
    (lambda q, k, v: ring_attention(q[:, :6], k, v), ValueError, "same length"),
    (lambda q, k, v: ring_attention(q, k, v, scale=-1.0), ValueError, "scale must be"),
    (lambda q, k, v: ring_attention(q, k[..., :4], v), ValueError, "head dim"),
    (lambda q, k, v: ulysses_attention(q, k, v, mask=torch.ones(10, 10, dtype=torch.bool)), ValueError,
     "does not take 'mask'"),
    (lambda q, k, v: ulysses_attention(q, k, v, method="flashh"), ValueError, "unknown method"),
    (lambda q, k, v: ulysses_attention(q[:, :9], k[:, :9], v[:, :9], zigzag=True), ValueError, "must be even"),
    (lambda q, k, v: ulysses_attention(q, k, v, method=lambda q, k, v: (q, k)), TypeError, "must return o"),
    (lambda q, k, v: shard(q[:, :9], zigzag=True), ValueError, "divisible by 2 x world size"),
    (lambda q, k, v: ContextParallel(effattn.attention, mode="tree"), ValueError, "mode must be one of"),
    (lambda q, k, v: ContextParallel(3), TypeError, "nn.Module or a callable"),
    (lambda q, k, v: ContextParallel(effattn.attention)(q, k, v, window=4), ValueError, "takes only the options"),
    (lambda q, k, v: ContextParallel(_layer_without_attention)(q), RuntimeError, "never called effattn.attention"),
])
def test_errors(world_of_one, call, error, match):
    with pytest.raises(error, match=match):
        call(*_qkv(10, 10, 4, 2))


class _CpuFlash:
    """The CUDA flash ops' signatures, served by PyTorch's CPU flash kernel: tests the "sdpa" backend's
    layouts, GQA head expansion and gradient sums without a GPU."""

    @staticmethod
    def _scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale=None):
        assert q.stride(-1) == 1 and dropout_p == 0.0 and not return_debug_mask
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
        return o, lse, None, None, q.shape[2], k.shape[2], torch.empty(2, dtype=torch.int64), torch.empty(0), None

    @staticmethod
    def _scaled_dot_product_flash_attention_backward(do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, dropout_p,
                                                     is_causal, seed, offset, *, scale=None):
        assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert lse.is_contiguous() and lse.dtype == torch.float32 and seed.numel() == 2
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, dropout_p, is_causal, scale=scale)


class _CpuCudnn:
    """The CUDA cuDNN ops' signatures (LSE with a trailing 1, attn_bias, philox tensors), served on CPU."""

    @staticmethod
    def _scaled_dot_product_cudnn_attention(q, k, v, bias, compute_lse, dropout_p, is_causal, debug, *, scale=None):
        assert bias is None and compute_lse and dropout_p == 0.0 and not debug
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
        empty = torch.empty(0)
        return o, lse.unsqueeze(-1), empty, empty, q.shape[2], k.shape[2], empty, empty, empty

    @staticmethod
    def _scaled_dot_product_cudnn_attention_backward(do, q, k, v, o, lse, seed, offset, bias, cum_q, cum_k, max_q,
                                                     max_k, dropout_p, is_causal, *, scale=None):
        assert bias is None and lse.shape == q.shape[:3] + (1,) and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert cum_q is None and cum_k is None  # defined offsets, even empty ones, mean nested tensors to cuDNN
        assert do.stride() == o.stride()  # cuDNN wants dO laid out like O
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse.squeeze(-1), dropout_p, is_causal, scale=scale)


@pytest.mark.parametrize("backend,aten", [("sdpa", _CpuFlash), ("cudnn", _CpuCudnn)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backend_layouts_against_torch_backend(monkeypatch, causal, backend, aten):
    monkeypatch.setattr(local, "_aten", aten)
    fwd, bwd = local.BACKENDS[backend].forward, local.BACKENDS[backend].backward
    q, k, v = _qkv(11, 11, 4, 2, Dv=8, dtype=torch.float32, seed=3)
    # A strided slice of the shard, as ring steps pass them; causal blocks are square in the ring (the
    # CUDA kernel aligns causal masks top-left, which equals bottom-right only then).
    rows = slice(0, 11) if causal else slice(3, 11)
    o, lse = fwd(q[:, rows], k, v, causal=causal, scale=0.4)
    o_ref, lse_ref = local.torch_forward(q[:, rows], k, v, causal=causal, scale=0.4)
    assert (o - o_ref).abs().max() < 1e-5 and (lse - lse_ref).abs().max() < 1e-5
    do = torch.randn_like(o_ref)
    got = bwd(do, q[:, rows], k, v, o, lse, causal=causal, scale=0.4)
    want = local.torch_backward(do, q[:, rows], k, v, o_ref, lse_ref, causal=causal, scale=0.4)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_flash_backend_against_torch_backend(causal):
    """The Triton kernels (interpreted on CPU) as the ring's local attention: o, LSE, and the backward
    from a given o and LSE, on a strided slice of rows, GQA, T != S."""
    q, k, v = _qkv(21, 19, 4, 2, D=16, Dv=32, dtype=torch.float32, seed=4)
    rows = slice(5, 21)
    o, lse = local.flash_forward(q[:, rows], k, v, causal=causal, scale=0.3)
    o_ref, lse_ref = local.torch_forward(q[:, rows], k, v, causal=causal, scale=0.3)
    assert (o - o_ref).abs().max() < 1e-4 and (lse - lse_ref).abs().max() < 1e-4
    do = torch.randn_like(o_ref)
    lse_slice = torch.cat([lse_ref, lse_ref], dim=2)[:, :, :lse_ref.shape[2]]  # strided along T, as ring steps pass it
    got = local.flash_backward(do, q[:, rows], k, v, o_ref, lse_slice, causal=causal, scale=0.3)
    want = local.torch_backward(do, q[:, rows], k, v, o_ref, lse_ref, causal=causal, scale=0.3)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max() < 1e-4


def test_backend_choice():
    q, k, v = _qkv(4, 4, 2, 2, D=16, Dv=16, dtype=torch.float32)
    assert local.local_backend("auto", q, v).name == "torch"  # CPU: plain PyTorch, not the interpreter
    assert local.local_backend("flash", q, v).name == "flash"
    with pytest.raises(ValueError, match="backend='flash' needs"):
        local.local_backend("flash", q.double(), v.double())
