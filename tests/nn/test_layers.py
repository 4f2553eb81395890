"""Every token mixer: forward agrees with step-by-step and chunked decoding, gradients reach every
parameter, shapes, and the documented errors."""
import pytest
import torch

import effattn  # noqa: F401  (registers the methods)
from effattn.nn import LAYERS, Attention, Mamba2, make_mixer, mixer_names

DIM, HEADS = 32, 2  # head_dim 16: the smallest the Triton kernels take


def _buildable():
    names, refused = [], []
    for name in mixer_names():
        try:
            make_mixer(name, DIM, HEADS)
        except ValueError as exc:  # a method the generic layer cannot drive must say so and point to LAYERS
            refused.append((name, str(exc)))
            continue
        names.append(name)
    return names, refused


BUILDABLE, REFUSED = _buildable()


def test_refusals_explain_themselves():
    assert set(LAYERS) <= set(BUILDABLE) and "standard" in BUILDABLE
    assert {"retnet", "gla", "deltanet", "gated_deltanet", "mamba2"} <= {n for n in BUILDABLE if _trains(n)}
    for name, message in REFUSED:
        assert name in message and ("own layer" in message or "causal" in message), message
    with pytest.raises(ValueError, match="own layer"):
        Attention(DIM, HEADS, method="mla")  # takes no k, v: its layer is LAYERS["mla"]


def _mixer(name):
    """The layer under test. A registered method with several forms runs its plain-PyTorch one here
    (parallel/recurrent): these tests check the layer's plumbing, which is the same for every form, and
    tests/test_registry.py checks each form (Triton kernels included) against the reference."""
    from effattn.registry import REGISTRY

    if name not in LAYERS and name in REGISTRY:
        forms = REGISTRY.get(name).forms
        plain = [f for f in ("parallel", "recurrent") if f in forms]
        if len(forms) > 1 and plain:
            return make_mixer(name, DIM, HEADS, form=plain[0])
    return make_mixer(name, DIM, HEADS)


def _quantized(layer) -> bool:
    """A quantized exact-attention method (hardware class, yet approximating softmax: INT8 / FP8)."""
    return isinstance(layer, Attention) and layer.record.family == "hardware" and layer.record.approximates_softmax


def _trains(name):
    layer = make_mixer(name, DIM, HEADS)
    return not isinstance(layer, Attention) or layer.record.trains


@pytest.mark.parametrize("name", BUILDABLE)
def test_forward_matches_step_decoding(name):
    torch.manual_seed(1)
    layer = _mixer(name).double()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    try:
        y = layer(x)
        tol = 1e-9
    except (TypeError, RuntimeError):  # no float64 path (Triton kernels, float32 gates): compare in float32
        layer, x, tol = layer.float(), x.float(), 1e-5
        y = layer(x)
    assert y.shape == x.shape
    cache, steps = None, []
    for t in range(x.shape[1]):  # one token [B, dim] at a time
        y_t, cache = layer.step(x[:, t], cache)
        assert y_t.shape == (2, DIM)
        steps.append(y_t)
    assert cache["offset"] == 5
    if _quantized(layer):
        # Quantisation scales are computed over the tokens a call sees, so decoding (which replays the prefix)
        # and one forward over the whole sequence round differently: they agree to the quantisers' error.
        y_a, cache = layer.step(x[:, :3])
        y_b, _ = layer.step(x[:, 3:], cache)
        for out in (torch.stack(steps, 1), torch.cat([y_a, y_b], 1)):
            assert ((out - y).norm() / y.norm()).item() < 0.05
        return
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=tol, atol=tol)
    y_a, cache = layer.step(x[:, :3])  # prompt chunk, then a chunk continuing it
    y_b, _ = layer.step(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y, rtol=tol, atol=tol)
    layer.step(x[:, :2], cache)  # step does not change the cache it was given
    torch.testing.assert_close(layer.step(x[:, 3:], cache)[0], y_b)


@pytest.mark.parametrize("name", [n for n in BUILDABLE if _trains(n)])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(2)
    layer = _mixer(name)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    (layer(x) * torch.randn(2, 5, DIM)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_attention_uses_the_method_head_layout_and_rotary():
    assert make_mixer("mqa", 64, 4).kv_heads == 1
    assert make_mixer("gqa", 64, 4).kv_heads == 2
    assert make_mixer("standard", 64, 4, kv_heads=2).kv_heads == 2
    assert Attention(DIM, HEADS, method="standard").rope is not None
    assert Attention(DIM, HEADS, method="linear_transformer").rope is None
    assert Attention(DIM, HEADS, method="standard", rotary=False).rope is None
    assert Attention(DIM, HEADS).record.name in ("flash", "standard")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"method": "standrd"}, ValueError, "did you mean"),
    ({"method": "standard", "windw": 3}, TypeError, "unknown option"),
    ({"method": "standard", "causal": False}, ValueError, "set by the layer"),
    ({"method": "standard", "kv_heads": 3}, ValueError, "multiple of kv_heads"),
    ({"method": "linear_transformer", "kv_heads": 1}, ValueError, "gqa"),
    ({"method": 3}, TypeError, "method must be a str"),
])
def test_attention_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Attention(DIM, HEADS, **kwargs)


def test_input_and_cache_errors():
    layer = make_mixer("deltanet", DIM, HEADS)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[B, T, 32\]"):
        layer(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="x must"):
        layer(torch.randn(2, DIM))  # forward wants [B, T, dim]
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(2, 0, DIM))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer.step([1.0] * DIM)
    _, cache = layer.step(torch.randn(2, DIM))
    with pytest.raises(ValueError, match="batch 2, but x has batch 3"):
        layer.step(torch.randn(3, DIM), cache)
    with pytest.raises(TypeError, match="cache must be None or a dict"):
        layer.step(torch.randn(2, DIM), ("not", "a cache"))
    with pytest.raises(ValueError, match="divisible by heads"):
        make_mixer("gla", 31, 2)
    with pytest.raises(ValueError, match="heads \\* head_dim must equal"):
        Mamba2(DIM, 3, head_dim=8)
    with pytest.raises(ValueError, match="head_dim_v must be >= 1"):
        make_mixer("retnet", DIM, HEADS, head_dim_v=0)
