"""New methods plug into Attention without edits: a softmax method without a decoding path replays, and a
gated delta-rule method gets its g / beta projections and L2-normalised q, k from its own input factory."""
import functools
from dataclasses import replace
from functools import partial

import pytest
import torch

from effattn.inputs import linear_inputs
from effattn.nn import Attention, recurrence
from effattn.reference import linear_recurrent
from effattn.registry import REGISTRY, Method

DIM = 16


def _add(monkeypatch, record):
    monkeypatch.setitem(REGISTRY._methods, record.name, record)


def _decoded(layer, x):
    cache, ys = None, []
    for t in range(x.shape[1]):
        y, cache = layer.step(x[:, t], cache)
        ys.append(y)
    return torch.stack(ys, 1), cache


def test_softmax_method_without_decode_replays(monkeypatch):
    std = REGISTRY.get("standard")
    _add(monkeypatch, replace(std, name="no_decode", supports=std.supports - {"decode"}))
    layer = Attention(DIM, 2, method="no_decode").double()
    assert layer.mode == "replay"
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    ys, cache = _decoded(layer, x)
    torch.testing.assert_close(ys, layer(x))
    assert cache["x"].shape == (2, 6, DIM)


def _gated_delta(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, delta_rule=False):
    return linear_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, delta_rule=delta_rule)


def test_state_method_gets_gates_from_its_factory(monkeypatch):
    lt = REGISTRY.get("linear_transformer")
    record = Method(
        name="toy_gated_delta", family="linear", cite="test", fn=_gated_delta, reference=_gated_delta,
        make_inputs=partial(linear_inputs, gate="vector", beta=True, delta_rule=True, normalize_qk=True),
        complexity=lt.complexity, state_or_cache=lt.state_or_cache,
        options={"scale": None, "initial_state": None, "output_final_state": False, "delta_rule": False},
        supports=frozenset({"causal", "backward", "decode", "state"}), description="test")
    _add(monkeypatch, record)
    layer = Attention(DIM, 2, method="toy_gated_delta").double()
    assert layer.mode == "state" and layer.vector_gate and layer.beta_proj is not None and layer.l2_qk
    assert layer.options["delta_rule"] is True and layer.rope is None
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    ys, cache = _decoded(layer, x)
    torch.testing.assert_close(ys, layer(x))
    assert cache["state"].shape == (2, 2, DIM // 2, DIM // 2)
    layer.float()(x.float()).sum().backward()
    assert layer.g_proj.weight.grad.abs().sum() > 0 and layer.beta_proj.weight.grad.abs().sum() > 0


def test_method_needing_unknown_inputs_is_refused(monkeypatch):
    lt = REGISTRY.get("linear_transformer")
    _add(monkeypatch, replace(lt, name="needs_w", make_inputs=lambda *a, **k: {**lt.make_inputs(*a, **k),
                                                                                "w": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"needs inputs \['w'\].*own layer"):
        Attention(DIM, 2, method="needs_w")
    _add(monkeypatch, replace(lt, name="noncausal_only", supports=frozenset({"noncausal", "backward"})))
    with pytest.raises(ValueError, match="does not support causal"):
        Attention(DIM, 2, method="noncausal_only")


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
@pytest.mark.parametrize("delta_rule", [False, True])
def test_chunked_reference_recurrence_matches_token_by_token(monkeypatch, gate, delta_rule):
    """The layers' fallback runs the parallel form chunk by chunk, passing the state: check across chunks."""
    monkeypatch.setattr(recurrence, "CHUNK", 4)
    from effattn.registry import Shape
    ins = linear_inputs(Shape(batch=2, seq_q=11, heads=2, head_dim=8), torch.float64, "cpu",
                        torch.Generator().manual_seed(3), gate=gate, beta=True, normalize_qk=True)
    o, s = recurrence.gated_recurrence(ins["q"], ins["k"], ins["v"], ins.get("g"), ins["beta"],
                                       delta_rule=delta_rule, initial_state=ins["initial_state"].double())
    o_ref, s_ref = linear_recurrent(ins["q"], ins["k"], ins["v"], ins.get("g"), ins["beta"], delta_rule=delta_rule,
                                    initial_state=ins["initial_state"].double(), output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_strong_vector_gates_take_the_explicit_decay_path(monkeypatch):
    """Gates decaying by more than e^-MAX_SPAN within a chunk must not overflow the factorised product."""
    monkeypatch.setattr(recurrence, "CHUNK", 4)
    from effattn.registry import Shape
    ins = linear_inputs(Shape(batch=1, seq_q=9, heads=2, head_dim=8), torch.float32, "cpu",
                        torch.Generator().manual_seed(4), gate="vector", initial_state=False)
    g = ins["g"] * 30.0  # up to ~-100 per token per channel
    assert float(-g[:, :4].sum(1).min()) > recurrence.MAX_SPAN
    o, s = recurrence.gated_recurrence(ins["q"], ins["k"], ins["v"], g)
    o_ref, s_ref = linear_recurrent(ins["q"], ins["k"], ins["v"], g, output_final_state=True)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_name,op", [("mamba2", "simple_gla"), ("gla", "gla"), ("deltanet", "delta_net"),
                                           ("gated_deltanet", "gated_delta_net")])
def test_layers_route_to_the_registered_op(monkeypatch, layer_name, op):
    """Where the registry has the op (and it runs natively), the layer calls it with FLA's arguments and
    gets what the chunked reference fallback gives. On CPU we force the route (kernels run interpreted)."""
    from effattn.nn import make_mixer

    assert op in REGISTRY
    torch.manual_seed(5)
    layer = make_mixer(layer_name, 32, 2)
    x = torch.randn(1, 5, 32)
    fallback = layer(x)
    called = []
    record = REGISTRY.get(op)
    spy = replace(record, fn=functools.wraps(record.fn)(lambda *a, **k: called.append(op) or record.fn(*a, **k)))
    _add(monkeypatch, spy)
    monkeypatch.setattr(recurrence, "interpreting", lambda: False)
    torch.testing.assert_close(layer(x), fallback, rtol=1e-4, atol=1e-4)
    assert called and set(called) == {op}
