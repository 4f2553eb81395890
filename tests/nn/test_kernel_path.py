"""The state-carrying layers on their GPU path: `gated_recurrence` runs the registered Triton kernels (here
through the bounds-checked interpreter) instead of the PyTorch chunk form it picks on CPU. Outputs, final
states and every parameter's gradient must match the CPU path, at a length past the default chunk of 64
that leaves a short last chunk (the shape that once read out of bounds on the GPU)."""
import pytest
import torch

from effattn.nn import make_mixer, recurrence

KERNEL_LAYERS = ["retnet", "gla", "deltanet", "gated_deltanet", "mamba2", "metala"]


def _run(name, x, kernel_path, monkeypatch):
    monkeypatch.setattr(recurrence, "interpreting", lambda: not kernel_path)
    torch.manual_seed(0)
    layer = make_mixer(name, 32, 2)
    y, cache = layer._run(x, None)
    (y.square().sum() + sum(t.square().sum() for t in cache.values() if t is not None)).backward()
    return [y, *cache.values()], {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_layer_kernel_path_matches_torch_path(name, monkeypatch):
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1))
    outs_k, grads_k = _run(name, x, True, monkeypatch)
    outs_t, grads_t = _run(name, x, False, monkeypatch)
    for a, b in zip(outs_k, outs_t):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)
    assert grads_k.keys() == grads_t.keys()
    for n in grads_k:
        torch.testing.assert_close(grads_k[n], grads_t[n], atol=2e-4, rtol=2e-3, msg=lambda m: f"{name}.{n}: {m}")
