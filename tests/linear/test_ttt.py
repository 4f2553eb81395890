"""TTT-Linear / TTT-MLP: dual form == primal form == the autograd-based reference (outputs, final states, grads of
every input), TTT-Linear's Triton form under the 2x rule, decoding token by token == one call, bf16 at T = 4096,
the inner loop learns, argument errors.
(tests/test_registry.py checks every form of both methods against the reference at the registry's shapes.)"""
import pytest
import torch

from effattn._memory import poisoned_outputs
from effattn.linear.ttt import (
    pack_state,
    state_size,
    ttt_inputs,
    ttt_linear,
    ttt_linear_reference,
    ttt_mlp,
    ttt_mlp_reference,
    unpack_state,
)
from effattn.linear.ttt_fused import fused_fits
from effattn.registry import REGISTRY, Shape
from effattn.testing import assert_matches_reference

OPS = {"linear": (ttt_linear, ttt_linear_reference), "mlp": (ttt_mlp, ttt_mlp_reference)}
TENSORS = ("q", "k", "v", "eta", "ln_weight", "ln_bias", "initial_state", "token_weights")
TIMED = ("q", "k", "v", "eta")  # [B, T, ...]


def case(model, T=21, b=4, offset=3, seed=0, B=2, H=2, D=8, dtype=torch.float64):
    x = ttt_inputs(Shape(batch=B, seq_q=T, heads=H, head_dim=D), dtype, "cpu", torch.Generator().manual_seed(seed),
                   model=model, mini_batch_size=b, offset=offset)
    x["initial_state"] = x["initial_state"].to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x["token_weights"] = (0.5 + torch.rand(b, generator=gen, dtype=dtype)) / torch.arange(1, b + 1, dtype=dtype)
    return {n: t for n, t in x.items() if n in TENSORS}, {"mini_batch_size": b, "offset": offset}


def outputs_and_grads(fn, tensors, static, dtype=torch.float64):
    """o, the final state and every gradient under float64 cotangents, from inputs cast to dtype (poisoned)."""
    ins = {n: t.detach().to(dtype).clone().requires_grad_() for n, t in tensors.items()}
    with poisoned_outputs():
        o, state = fn(**ins, **static, output_final_state=True)
        gen = torch.Generator().manual_seed(1)
        go, gs = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (o, state))
        ((o.double() * go).sum() + (state.double() * gs).sum()).backward()
    return [o, state] + [ins[n].grad for n in tensors]


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("b,offset,weights", [(4, 3, "learned"), (5, 0, "sum"), (32, 7, None)])
def test_dual_equals_primal_equals_reference_float64(model, b, offset, weights):
    """b = 32 > T: one partial mini-batch; b = 4 from offset 3: a 1-token head segment, full ones, a tail.
    Token weights c_i: drawn (gradients checked), ones (the plain sum), or the default 1 / (i + 1)."""
    fn, ref = OPS[model]
    tensors, static = case(model, b=b, offset=offset)
    if weights is None:
        del tensors["token_weights"]
    elif weights == "sum":
        tensors["token_weights"] = torch.ones(b, dtype=torch.float64)
    want = outputs_and_grads(ref, tensors, static)
    for form in ("dual", "primal"):
        got = outputs_and_grads(fn, tensors, {**static, "form": form})
        for name, g, w in zip(["o", "state", *tensors], got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"{model} {form} {name}")


@pytest.mark.parametrize("T,b,offset,D,init", [(37, 4, 3, 16, True), (37, 16, 0, 24, False), (9, 4, 0, 16, False),
                                               (70, 16, 5, 32, True), (16, 16, 0, 16, True), (21, 4, 1, 100, True)])
def test_fused_kernels_float32_vs_reference(T, b, offset, D, init):
    """The Triton form (interpreter) against the float64 reference under the 2x rule, the float32 dual form the
    baseline: a PyTorch head segment (offset, or a given state) then full and partial mini-batches in the kernel,
    D not a power of two, no initial state (the kernel from W = 0)."""
    tensors, static = case("linear", T=T, b=b, offset=offset, D=D)
    if not init:
        del tensors["initial_state"]
    want = outputs_and_grads(ttt_linear_reference, tensors, static, torch.float64)
    base = outputs_and_grads(ttt_linear, tensors, {**static, "form": "dual"}, torch.float32)
    got = outputs_and_grads(ttt_linear, tensors, {**static, "form": "fused"}, torch.float32)
    for name, g, bb, w in zip(["o", "state", *tensors], got, base, want):
        err, allowed = (g.double() - w).abs().max(), 2 * (bb.double() - w).abs().max() + 1e-5 * max(1, w.abs().max())
        assert err <= allowed, f"{name}: {err:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("T,D,seed,init", [(100, 64, 1, True), (150, 16, 2, False)])
def test_fused_kernels_bf16_two_x_rule(T, D, seed, init):
    """bf16: the kernels round their products' operands to bf16 (the interpreter too); several mini-batches, the
    2x rule against the bf16 reference for the output, the final state and every gradient."""
    options = {} if init else {"initial_state": None, "offset": 0}
    assert_matches_reference(REGISTRY.get("ttt_linear"), form="fused", dtype=torch.bfloat16, seed=seed,
                             shape=Shape(batch=2, seq_q=T, heads=2, head_dim=D), **options)


def test_fused_falls_back_to_dual_past_its_tiles():
    """D = 128 with b = 64 would need 295 KB of shared memory: the fused form runs the dual form instead."""
    assert fused_fits(64, 64) and fused_fits(128, 32) and fused_fits(100, 17)
    assert not fused_fits(128, 64) and not fused_fits(256, 16)
    tensors, static = case("linear", T=5, b=64, offset=0, B=1, H=1, D=128, dtype=torch.float32)
    del tensors["initial_state"]  # (with one, the first mini-batch's tokens take the dual form anyway)
    got = ttt_linear(**tensors, **static, form="fused", output_final_state=True)
    want = ttt_linear(**tensors, **static, form="dual", output_final_state=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_decode_token_by_token_equals_one_call(model):
    fn, _ = OPS[model]
    tensors, static = case(model, T=11, b=4, offset=2, dtype=torch.float32)
    o, state = fn(**tensors, **static, output_final_state=True)
    h, steps = tensors["initial_state"], []
    for t in range(11):
        step = {n: (x[:, t:t + 1] if n in TIMED else x) for n, x in tensors.items()}
        o_t, h = fn(**{**step, "initial_state": h}, mini_batch_size=4, offset=2 + t, form="primal",
                    output_final_state=True)
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, 1), o, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(h, state, atol=2e-5, rtol=2e-4)
    # the same sequence in two uneven chunks, the second starting mid-mini-batch
    first = {n: (x[:, :6] if n in TIMED else x) for n, x in tensors.items()}
    second = {n: (x[:, 6:] if n in TIMED else x) for n, x in tensors.items()}
    o_a, h_a = fn(**first, **static, output_final_state=True)
    o_b, h_b = fn(**{**second, "initial_state": h_a}, mini_batch_size=4, offset=8, output_final_state=True)
    torch.testing.assert_close(torch.cat([o_a, o_b], 1), o, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(h_b, state, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_bf16_long_sequence_is_finite(model):
    fn, _ = OPS[model]
    tensors, static = case(model, T=4096, b=16, offset=0, B=1, H=2, D=16, dtype=torch.bfloat16)
    ins = {n: t.detach().requires_grad_() for n, t in tensors.items()}
    o, state = fn(**ins, **static, output_final_state=True)
    (o.float().sum() + state.sum()).backward()
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all() and torch.isfinite(state).all()
    assert all(torch.isfinite(t.grad).all() for t in ins.values())


def test_inner_loop_learns_the_reconstruction():
    """v - k = LN(k A) for a fixed map A (a target the inner model can fit): after one sequence the inner model's
    reconstruction loss on fresh tokens of the same map is far below W_0's (TTT does gradient descent at test
    time; W_0 random at unit scale: at W = 0 the inner LayerNorm's gradient is 1/sqrt(eps))."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 256, 1, 8
    f64 = {"dtype": torch.float64}
    A = torch.randn(D, D, generator=gen, **f64) / D ** 0.5
    w0 = torch.cat([torch.randn(B, H, D, D, generator=gen, **f64) / D ** 0.5, torch.zeros(B, H, 1, D, **f64)], 2)
    k = torch.randn(B, T + 64, H, D, generator=gen, **f64)
    v = k + torch.nn.functional.layer_norm(k @ A, (D,), eps=1e-6)
    w, bias = torch.ones(H, D, **f64), torch.zeros(H, D, **f64)

    def loss(state, kk, vv):  # mean 1/2 |f(k) - v|^2 of the inner model in `state` (queries = keys, eta = 0)
        z = ttt_linear(kk, kk, vv, torch.zeros(B, kk.shape[1], H, **f64), w, bias, initial_state=state,
                       mini_batch_size=kk.shape[1])
        return 0.5 * ((z - vv) ** 2).sum(-1).mean()

    eta = torch.full((B, T, H), 0.2, **f64)
    _, state = ttt_linear(k[:, :T], k[:, :T], v[:, :T], eta, w, bias, initial_state=pack_state([w0]),
                          mini_batch_size=16, output_final_state=True)
    assert loss(state, k[:, T:], v[:, T:]) < 0.05 * loss(pack_state([w0]), k[:, T:], v[:, T:])


def test_state_packing_round_trips():
    shapes = [(5, 8), (9, 4)]
    params = [torch.randn(2, 3, *s) for s in shapes]
    pend = [torch.randn(2, 3, *s) for s in shapes]
    state = pack_state(params, pend)
    assert state.shape == (2, 3, 2, state_size("mlp", 4, 8))
    back_p, back_a = unpack_state(state, shapes)
    assert all(torch.equal(a, b) for a, b in zip(back_p + back_a, params + pend))


def test_errors():
    tensors, static = case("linear", T=5, dtype=torch.float32)
    x = {**tensors, **static}
    with pytest.raises(ValueError, match="form"):
        ttt_linear(**x, form="chunk")
    with pytest.raises(ValueError, match="head dim of q"):
        ttt_linear(**{**x, "v": x["v"][..., :4]})
    with pytest.raises(ValueError, match="eta must"):
        ttt_linear(**{**x, "eta": x["eta"][:, :2]})
    with pytest.raises(ValueError, match="ln_bias must"):
        ttt_linear(**{**x, "ln_bias": x["ln_bias"][:1]})
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear(**{**x, "mini_batch_size": 0})
    with pytest.raises(ValueError, match="token_weights must"):
        ttt_linear(**{**x, "token_weights": x["token_weights"][:2]})
    with pytest.raises(ValueError, match="offset"):
        ttt_linear(**{**x, "offset": -1})
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, 2, P\]"):
        ttt_linear(**{**x, "initial_state": x["initial_state"][..., :-1]})
    with pytest.raises(ValueError, match="form"):
        ttt_mlp(**x, form="fused")  # TTT-Linear only
    with pytest.raises(ValueError, match="needs initial_state"):
        ttt_mlp(**{**x, "initial_state": None})
    with pytest.raises(ValueError, match="no TTT-MLP size"):
        ttt_mlp(**x)  # a TTT-Linear state
