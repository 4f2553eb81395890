"""The Mamba (S6) and mLSTM blocks: forward == step-by-step decoding (also in chunks), gradients reach every
parameter, the state carries the sequence (a continuation differs from a fresh start), and errors. The generic
checks of tests/nn/test_layers.py run on them too (they are in LAYERS)."""
import pytest
import torch

from effattn.nn import LAYERS, Mamba, MLSTMBlock, make_mixer

DIM = 24  # off the kernels' block sizes


@pytest.mark.parametrize("cls,kwargs", [(Mamba, {"d_state": 6}), (MLSTMBlock, {"heads": 3})])
def test_forward_equals_decoding(cls, kwargs):
    torch.manual_seed(0)
    layer = cls(DIM, **kwargs).double()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    y = layer(x)
    cache, steps = None, []
    for t in range(x.shape[1]):
        y_t, cache = layer.step(x[:, t], cache)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-9, atol=1e-9)
    y_a, c = layer.step(x[:, :4])
    y_b, _ = layer.step(x[:, 4:], c)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y, rtol=1e-9, atol=1e-9)
    fresh = layer(x[:, 4:])  # the cache matters: continuing from it differs from starting afresh
    assert (fresh - y_b).abs().max() > 1e-3


@pytest.mark.parametrize("cls,kwargs", [(Mamba, {"d_state": 6}), (MLSTMBlock, {"heads": 3})])
def test_gradients_reach_every_parameter(cls, kwargs):
    torch.manual_seed(1)
    layer = cls(DIM, **kwargs)
    x = torch.randn(2, 7, DIM, requires_grad=True)
    (layer(x) * torch.randn(2, 7, DIM)).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_mamba_kernel_path_matches_recurrent_path():
    """The Triton scan (through the bounds-checked interpreter) inside the layer, past a few chunks of the
    kernel and a short last one: outputs, final state and every parameter's gradient as the recurrent form."""
    x = torch.randn(1, 70, DIM, generator=torch.Generator().manual_seed(3))
    runs = []
    for form in ("chunk", "recurrent"):
        torch.manual_seed(0)
        layer = Mamba(DIM, d_state=6, form=form)
        y, cache = layer._run(x, None)
        (y.square().sum() + cache["state"].square().sum()).backward()
        runs.append((y, cache["state"], {n: p.grad for n, p in layer.named_parameters()}))
    (y_k, s_k, g_k), (y_r, s_r, g_r) = runs
    torch.testing.assert_close(y_k, y_r, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(s_k, s_r, atol=2e-4, rtol=2e-3)
    for n in g_k:
        torch.testing.assert_close(g_k[n], g_r[n], atol=2e-4, rtol=2e-3, msg=lambda m: f"{n}: {m}")


def test_registered_as_mixers():
    assert LAYERS["mamba"] is Mamba and LAYERS["mlstm"] is MLSTMBlock
    assert isinstance(make_mixer("mamba", DIM, 2), Mamba) and make_mixer("mlstm", DIM, 2).head_dim == 24


def test_errors():
    with pytest.raises(ValueError, match="d_state must be"):
        Mamba(DIM, d_state=0)
    with pytest.raises(ValueError, match="form"):
        Mamba(DIM, form="parallel")
    with pytest.raises(ValueError, match="divisible by heads"):
        MLSTMBlock(DIM, 5)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[B, T, 24\]"):
        Mamba(DIM)(torch.randn(2, 3, DIM + 1))
