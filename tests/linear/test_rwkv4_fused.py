"""RWKV-4's fused Triton form (rwkv4_fused.py) vs the float64 reference: outputs, final states and gradients of
k, v, w, u and the initial state within twice the error of the PyTorch recurrent form in the same dtype, with
every kernel output allocated NaN-poisoned; odd T and D, no state, keys up to ~100, one call == two calls
with the state carried (values and gradients), each output's gradient alone, argument errors."""
import pytest
import torch

from effattn._memory import poisoned_outputs
from effattn.linear.rwkv4 import rwkv4, rwkv4_reference
from effattn.testing import compare

from .test_catalog import _run
from .test_rwkv_gsa import rwkv4_case


def _finite(ts):
    return all(torch.isfinite(t.float()).all() for t in ts)


def check_fused(inputs, dtype):
    """Every output and gradient of the fused form within 2x the recurrent form's error (+ floor), both run in
    `dtype` against the float64 reference."""
    truth, up = _run(rwkv4_reference, inputs, {}, torch.float64)
    base, _ = _run(rwkv4, inputs, {"form": "recurrent"}, dtype, up)
    with poisoned_outputs():
        fast, _ = _run(rwkv4, inputs, {"form": "fused"}, dtype, up)
    assert _finite(fast)
    names = ["o", "state"] + [f"d{n}" for n in inputs]
    results = [compare(n, f, b, r, dtype) for n, f, b, r in zip(names, fast, base, truth)]
    assert all(r.ok for r in results), "\n".join(map(str, results))


# T = 21, 37: segments of 16 tokens with a partial last one; D = 12, 20, 40: channel blocks of 16 / 32 lanes
# with masked lanes (40: a second block); T = 1: one decode step
@pytest.mark.parametrize("T,D,state", [(21, 12, True), (37, 20, False), (5, 40, True), (1, 12, True)])
def test_rwkv4_fused_matches_reference_fp32(T, D, state):
    check_fused(rwkv4_case(T=T, D=D, state=state), torch.float32)


def test_rwkv4_fused_matches_reference_bf16():
    x = rwkv4_case(T=37, D=20, seed=3)
    x["initial_state"] = x["initial_state"].float()  # the state stays float32, as the layer keeps it
    check_fused(x, torch.bfloat16)


@pytest.mark.parametrize("state", [False, True])
def test_rwkv4_fused_large_keys_stay_finite(state):
    # keys up to ~100: e^k overflows float32 (and the float32 reference), the log-space state does not
    check_fused(rwkv4_case(T=21, seed=4, state=state, big=40.0), torch.float32)


def test_rwkv4_fused_bf16_long_sequence_is_finite():
    x = {n: t.to(torch.bfloat16) for n, t in rwkv4_case(B=1, T=512, H=1, D=16, seed=2, state=False, big=20).items()}
    x["w"] = x["w"] * 1e-3  # almost no decay: the weights sum the whole sequence
    with torch.no_grad():
        o, state = rwkv4(**x, output_final_state=True, form="fused")
    assert _finite([o, state]) and o.dtype == torch.bfloat16
    torch.testing.assert_close(o, rwkv4(**x, form="recurrent"), atol=1e-2, rtol=1e-2)


def test_rwkv4_fused_two_calls_equal_one():
    x = {n: t.float().requires_grad_() for n, t in rwkv4_case(T=29, D=20, seed=5).items()}
    gen = torch.Generator().manual_seed(6)
    g_o, g_s = torch.randn(x["k"].shape, generator=gen), torch.randn(x["initial_state"].shape, generator=gen)

    def grads(o, state):
        ((o * g_o).sum() + (state * g_s).sum()).backward()
        out = [o.detach(), state.detach()] + [t.grad.clone() for t in x.values()]
        for t in x.values():
            t.grad = None
        return out

    whole = grads(*rwkv4(**x, output_final_state=True))
    s = 13  # the second call starts inside the first call's first segment
    o1, mid = rwkv4(**{**x, "k": x["k"][:, :s], "v": x["v"][:, :s]}, output_final_state=True)
    o2, state = rwkv4(**{**x, "k": x["k"][:, s:], "v": x["v"][:, s:], "initial_state": mid},
                      output_final_state=True)
    split = grads(torch.cat([o1, o2], 1), state)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)
    with torch.no_grad():  # the forward without checkpoints
        o, state = rwkv4(**x, output_final_state=True)
    torch.testing.assert_close(o, whole[0], atol=0, rtol=0)
    torch.testing.assert_close(state, whole[1], atol=0, rtol=0)


@pytest.mark.parametrize("which", ["o", "state"])
def test_rwkv4_fused_gradient_of_one_output(which):
    x = {n: t.float() for n, t in rwkv4_case(T=19, seed=7).items()}
    got, want = [], []
    for fn, dtype, out in ((rwkv4, torch.float32, got), (rwkv4_reference, torch.float64, want)):
        ins = {n: t.detach().to(dtype).requires_grad_() for n, t in x.items()}
        if which == "o":  # no final state returned: its gradient never reaches the kernel
            fn(**ins).sum().backward()
        else:  # the final state alone: no gradient of the output
            fn(**ins, output_final_state=True)[1].sum().backward()
        out += [torch.zeros_like(t) if t.grad is None else t.grad for t in ins.values()]  # the reference's du
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_rwkv4_fused_errors(monkeypatch):
    x = {n: t.float() for n, t in rwkv4_case(T=5).items()}
    with pytest.raises(TypeError, match="float64"):
        rwkv4(**{n: t.double() for n, t in x.items()}, form="fused")
    with pytest.raises(TypeError, match="k must"):
        rwkv4(**{**x, "k": x["k"].int(), "v": x["v"].int()})
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor without the interpreter: no Triton
    with pytest.raises(ValueError, match="CUDA"):
        rwkv4(**x, form="fused")
