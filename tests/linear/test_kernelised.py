"""RFA and cosFormer beyond the registry's checks: the variants its inputs do not draw (ungated RFA with M != D,
non-causal cosFormer), decode == chunk token by token, RFA's kernel estimate, redraw, bf16 at T = 4096, errors;
the default random features (RFA's and Performer's) drawn once."""
import pytest
import torch

from effattn.linear import (FavorProjection, cosformer, gaussian_random_features, orthogonal_random_features,
                            performer, rfa)
from effattn.linear.cosformer import cosformer_reference
from effattn.registry import REGISTRY, Shape
from effattn.testing import assert_matches_reference

SHAPE = Shape(batch=2, seq_q=21, heads=2, head_dim=16, head_dim_v=12)


def test_rfa_ungated_with_more_features_than_dims():
    assert_matches_reference(REGISTRY.get("rfa"), form="chunk", shape=SHAPE, gate=False, num_features=24, sigma=0.7,
                             chunk_size=16)


def test_cosformer_noncausal():
    assert_matches_reference(REGISTRY.get("cosformer"), shape=SHAPE, causal=False, initial_state=False,
                             output_final_state=False, max_len=30)


def _decode(fn, x, static):
    """The chunk form over the whole sequence == the recurrent form one token at a time, state carried."""
    o, state = fn(**x, **static, form="chunk", output_final_state=True)
    h, steps = x["initial_state"], []
    for t in range(o.shape[1]):
        step = {n: (t_ if n == "initial_state" else t_[:, t:t + 1]) for n, t_ in x.items()}
        o_t, h = fn(**{**step, "initial_state": h}, **static, form="recurrent", output_final_state=True)
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, 1), o, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(h, state, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", ["rfa", "cosformer"])
def test_decode_equals_chunk(name):
    m = REGISTRY.get(name)
    x = m.make_inputs(Shape(batch=1, seq_q=9, heads=2, head_dim=16), torch.float32, "cpu",
                      torch.Generator().manual_seed(3))
    static = {n: x.pop(n) for n in list(x) if not isinstance(x[n], torch.Tensor) and n != "output_final_state"}
    x.pop("output_final_state")
    if name == "cosformer":
        static["max_len"] = 12  # a strong re-weighting over the 9 tokens
    _decode(m.fn, x, {**static, "chunk_size": 16})


def test_cosformer_state_carries_relative_positions():
    """Two calls with the state between them == one call (the reference's own state semantics, float64)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    o, h = cosformer_reference(q, k, v, max_len=20, output_final_state=True)
    o1, h1 = cosformer_reference(q[:, :5], k[:, :5], v[:, :5], max_len=20, output_final_state=True)
    o2, h2 = cosformer_reference(q[:, 5:], k[:, 5:], v[:, 5:], max_len=20, initial_state=h1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(h2, h)


def test_rfa_approximates_softmax_of_unit_vectors():
    gen = torch.Generator().manual_seed(0)
    B, T, H, D, sigma = 1, 16, 1, 8, 0.8
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    att = torch.einsum("bthd,bshd->bhts", qn, kn) / sigma ** 2
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -float("inf")).softmax(-1)
    exact = torch.einsum("bhts,bshd->bthd", att, v)
    near = rfa(q, k, v, num_features=4096, seed=1, sigma=sigma, form="recurrent")
    far = rfa(q, k, v, num_features=4, seed=1, sigma=sigma, form="recurrent")
    assert (near - exact).abs().max() < 0.1 < (far - exact).abs().max()  # Monte-Carlo error ~ 1/sqrt(M)


def test_rfa_projection_is_seeded_and_redrawn():
    w = gaussian_random_features(6, 4, seed=2)
    assert torch.equal(w, gaussian_random_features(6, 4, seed=2)) and w.shape == (6, 4)
    proj = FavorProjection(6, 4, seed=2, redraw_every=1, draw=gaussian_random_features)
    assert torch.equal(proj(), w) and not torch.equal(proj(), w)
    x = torch.randn(1, 5, 1, 4)
    same = rfa(x, x, x, projection=gaussian_random_features(4, 4, seed=2), form="recurrent")
    assert torch.equal(rfa(x, x, x, seed=2, form="recurrent"), same)
    assert not torch.equal(rfa(x, x, x, seed=3, form="recurrent"), same)


@pytest.mark.parametrize("name", ["rfa", "cosformer"])
def test_bf16_long_sequence_is_finite(name):
    """T = 4096 in bf16 through the features, the normaliser and a bf16 state (the recurrent form; the chunk
    kernels accumulate in float32 and have their own long-sequence test in test_engine.py)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 1, 16, generator=gen).bfloat16() for _ in range(3))
    with torch.no_grad():
        if name == "rfa":
            g = torch.nn.functional.logsigmoid(torch.randn(1, 4096, 1, generator=gen) + 3).bfloat16()
            o, s = rfa(q, k, v, g, form="recurrent", output_final_state=True)
        else:
            o, s = cosformer(q, k, v, max_len=4096, form="recurrent", output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all() and o.abs().max() < 10


def test_errors():
    x = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="sigma"):
        rfa(x, x, x, sigma=0.0)
    with pytest.raises(ValueError, match="g must"):
        rfa(x, x, x, torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="key heads"):
        rfa(x, x[:, :, :1], x[:, :, :1])
    with pytest.raises(ValueError, match="projection"):
        rfa(x, x, x, projection=torch.randn(4, 3))
    with pytest.raises(ValueError, match="form"):
        cosformer(x, x, x, form="parallel")
    with pytest.raises(ValueError, match="max_len must be >="):
        cosformer(x, x, x, causal=False, max_len=3)
    with pytest.raises(ValueError, match="causal"):
        cosformer(x, x, x, causal=False, initial_state=torch.zeros(1, 2, 16, 9))
    with pytest.raises(ValueError, match="max_len"):
        cosformer(x, x, x, max_len=0)


@pytest.mark.parametrize("fn", [performer, rfa])
def test_default_projection_is_drawn_once_and_trains_after_inference(fn):
    """The default random features are drawn once per (size, seed, device), not on every call (a host-side draw
    and a pageable copy each call synchronised the host with the GPU); the cached tensor, first drawn under
    inference_mode here, still joins autograd afterwards."""
    from effattn.linear.performer import _projection

    x = torch.randn(1, 9, 2, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        first = fn(x, x, x, seed=9173)
    draw = orthogonal_random_features if fn is performer else gaussian_random_features
    w = _projection(x, None, None, 9173, draw)
    assert w is _projection(x, None, None, 9173, draw) and torch.equal(w, draw(8, 8, 9173))
    xg = x.clone().requires_grad_(True)
    out = fn(xg, xg, xg, seed=9173)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), first)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
