"""RWKV-6 and RWKV-7 time-mix layers: forward == token-by-token and chunked decoding, gradients reach every
parameter, the cache layout, bf16 stays finite, and the documented errors."""
import pytest
import torch

from effattn.nn import LAYERS, RWKV6TimeMix, RWKV7TimeMix, make_mixer

LAYER_CLASSES = [RWKV6TimeMix, RWKV7TimeMix]


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_forward_equals_decoding(cls):
    torch.manual_seed(0)
    layer = cls(24, 3, head_dim=8, decay_rank=4).double()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    y = layer(x)
    cache, steps = None, []
    for t in range(6):
        y_t, cache = layer.step(x[:, t], cache)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-10, atol=1e-10)
    assert cache["state"].shape == (2, 3, 8, 8) and cache["shift"].shape == (2, 24) and cache["offset"] == 6
    y_a, c = layer.step(x[:, :4])  # a prompt, then a chunk continuing it
    y_b, _ = layer.step(x[:, 4:], c)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_gradients_reach_every_parameter_and_bf16_is_finite(cls):
    torch.manual_seed(1)
    layer = cls(32, 2)
    x = torch.randn(2, 7, 32, requires_grad=True)
    (layer(x) * torch.randn(2, 7, 32)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        y = layer.to(torch.bfloat16)(torch.randn(1, 300, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_rwkv7_decay_range_and_registration():
    layer = RWKV7TimeMix(16, 2)
    with torch.no_grad():
        raw = layer.w0 + torch.tanh(torch.randn(5, 16) @ layer.w1 * 50) @ layer.w2 * 50
        w = -torch.exp(-torch.nn.functional.softplus(-raw) - 0.5)
    assert (w < 0).all() and (w > -0.6066).all()  # decay e^w in (e^{-e^{-1/2}}, 1): never vanishes
    assert LAYERS["rwkv6"] is RWKV6TimeMix and isinstance(make_mixer("rwkv7", 16, 2), RWKV7TimeMix)


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_errors(cls):
    with pytest.raises(ValueError, match="divisible"):
        cls(30, 4)
    with pytest.raises(ValueError, match="decay_rank"):
        cls(32, 2, decay_rank=0)
    layer = cls(16, 2)
    with pytest.raises(ValueError, match="x must"):
        layer(torch.randn(2, 5, 8))
    _, cache = layer.step(torch.randn(2, 16))
    with pytest.raises(ValueError, match="batch"):
        layer.step(torch.randn(3, 16), cache)


def test_rwkv6_kernel_path_matches_torch_path(monkeypatch):
    """The layer's GPU path (rwkv6's chunk form: the engine's kernels and the fused epilogue as one node; here in
    the interpreter) == its CPU path (the PyTorch chunk form and epilogue): outputs, state, every gradient."""
    from effattn.nn import rwkv_layers

    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1))
    got = []
    for kernel_path in (True, False):
        monkeypatch.setattr(rwkv_layers, "interpreting", lambda: not kernel_path)
        torch.manual_seed(0)
        layer = RWKV6TimeMix(32, 2)
        y, cache = layer._run(x, None)
        (y.square().sum() + cache["state"].square().sum()).backward()
        got.append([y, cache["state"]] + [p.grad for p in layer.parameters()])
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)


def test_rwkv7_decodes_with_the_fused_kernel_under_no_grad():
    torch.manual_seed(3)
    layer = RWKV7TimeMix(40, 2, head_dim=20, decay_rank=4)  # head_dim 20: off the kernel's block sizes
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        y = layer(x)
        cache, steps = None, []
        for t in range(5):
            y_t, cache = layer.step(x[:, t], cache)
            steps.append(y_t)
    assert cache["state"].dtype == torch.float32
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-4, atol=1e-5)
