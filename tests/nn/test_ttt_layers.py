"""The TTT layer: forward == token-by-token and chunked decoding across mini-batch boundaries, dual == primal,
gradients reach every parameter, bf16, errors."""
import pytest
import torch

from effattn.nn import LAYERS, TTTMLP, TTTLinear, make_mixer

DIM, HEADS = 32, 2


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_forward_equals_step_decoding_across_mini_batches(cls):
    torch.manual_seed(0)
    layer = cls(DIM, HEADS, mini_batch_size=4).double()
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    y = layer(x)
    cache, steps = None, []
    for t in range(11):
        y_t, cache = layer.step(x[:, t], cache)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-9, atol=1e-10)
    assert cache["offset"] == 11 and cache["state"].shape[:3] == (2, HEADS, 2)
    y_a, cache = layer.step(x[:, :6])  # a prompt ending mid-mini-batch, then the rest
    y_b, _ = layer.step(x[:, 6:], cache)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y, rtol=1e-9, atol=1e-10)
    primal = cls(DIM, HEADS, mini_batch_size=4, form="primal").double()
    primal.load_state_dict(layer.state_dict())
    torch.testing.assert_close(primal(x), y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(1)
    layer = make_mixer(name, DIM, HEADS, mini_batch_size=4)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    (layer(x) * torch.randn(2, 9, DIM)).sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_layer_options_and_bf16():
    assert LAYERS["ttt_linear"] is TTTLinear and make_mixer("ttt_mlp", DIM, HEADS).inner == "mlp"
    plain = TTTLinear(DIM, HEADS, gate=False, rotary=False)
    assert plain.g_proj is None and plain(torch.randn(1, 3, DIM)).shape == (1, 3, DIM)
    y = TTTLinear(DIM, HEADS).to(torch.bfloat16)(torch.randn(1, 40, DIM, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"inner": "rnn"}, "inner"), ({"form": "chunk"}, "form"), ({"mini_batch_size": 0}, "mini_batch_size"),
    ({"base_lr": 0.0}, "base_lr"), ({"head_dim": 7}, "even head_dim"), ({"mlp_ratio": 0, "inner": "mlp"}, "mlp_ratio"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TTTLinear(DIM, HEADS, **kwargs)
