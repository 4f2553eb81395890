"""RWKV-4/5/7 and gated slot attention: every form vs its float64 reference (outputs, final states, gradients
of every input) at lengths off the chunk size, decode steps == chunk form token by token, bf16 at T = 4096
stays finite, argument errors."""
import sys

import pytest
import torch
import torch.nn.functional as F

from effattn.linear.chunk_torch import chunk_form
from effattn.linear.gsa import gsa, gsa_reference
from effattn.linear.rwkv4 import rwkv4, rwkv4_reference
from effattn.linear.rwkv6 import rwkv5, rwkv5_reference
from effattn.linear.rwkv7 import affine_scan, fused_recurrent_rwkv7, rwkv7, rwkv7_reference

from .test_catalog import check_against_reference, check_decode, rand


def _finite(*ts):
    return all(torch.isfinite(t.float()).all() for t in ts)


# -------------------------------------------------------------------------------------------------- rwkv7
def rwkv7_case(B=2, T=21, H=2, K=16, V=12, seed=0, strong=False, state=True):
    gen = torch.Generator().manual_seed(seed)
    kappa = F.normalize(rand(gen, B, T, H, K), dim=-1)
    alpha = torch.sigmoid(rand(gen, B, T, H, K))
    # strong: per-step decays down to e^-20, where any factorised e^{-Gc} would overflow a chunk
    w = -torch.exp(rand(gen, B, T, H, K) + 1.0) if strong else -0.6 * torch.sigmoid(rand(gen, B, T, H, K))
    x = dict(r=rand(gen, B, T, H, K), w=w, k=rand(gen, B, T, H, K, std=0.3), v=rand(gen, B, T, H, V),
             a=-kappa, b=kappa * alpha)
    if state:
        x["initial_state"] = rand(gen, B, H, K, V, std=0.5)
    return x


# tests/test_registry.py runs every form with a state at two odd shapes; here: strong decays, no state, scale
@pytest.mark.parametrize("form,strong,state", [("chunk", False, True), ("chunk", True, False), ("recurrent", True, False)])
def test_rwkv7_matches_reference(form, strong, state):
    check_against_reference(rwkv7, rwkv7_reference, rwkv7_case(strong=strong, state=state), {"scale": 0.5},
                            form=form, chunk_size=8)


@pytest.mark.parametrize("dtype,strong,chunk,V", [(torch.float32, True, 16, 24), (torch.bfloat16, False, 32, 24),
                                                  (torch.float32, False, 16, 80)])
def test_rwkv7_triton_chunk_forward(monkeypatch, dtype, strong, chunk, V):
    """Without gradients the chunk form runs rwkv7_chunk.py's two Triton kernels (a spy checks they ran):
    output and final state vs the float64 reference under the 2x rule, outputs poisoned, T = 45 off the chunk
    size, K = 32 (two 16-channel slices of the pairwise products) != V (at 80, two value blocks of 64 in the
    scan, the second partial), an initial state; strong decays (down to e^-20 a step) in float32."""
    module = sys.modules["effattn.linear.rwkv7"]  # the package exports a function of the same name
    from effattn._memory import poisoned_outputs
    from effattn.testing import compare

    calls = []
    real = module.rwkv7_chunk_forward
    monkeypatch.setattr(module, "rwkv7_chunk_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = rwkv7_case(B=2, T=45, H=2, K=32, V=V, seed=3, strong=strong)
    truth = rwkv7_reference(*(x[n].double() for n in "rwkvab"), scale=0.5,
                            initial_state=x["initial_state"].double(), output_final_state=True)
    base = rwkv7_reference(*(x[n].to(dtype) for n in "rwkvab"), scale=0.5, initial_state=x["initial_state"],
                           output_final_state=True)
    with torch.no_grad(), poisoned_outputs(True):
        fast = rwkv7(*(x[n].to(dtype) for n in "rwkvab"), scale=0.5, initial_state=x["initial_state"],
                     output_final_state=True, chunk_size=chunk)
    assert calls == [1]
    results = [compare(n, f, b, r, dtype) for n, f, b, r in zip(("o", "state"), fast, base, truth)]
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_rwkv7_decode_equals_chunk():
    check_decode(rwkv7, rwkv7_case(T=9, seed=1), {"chunk_size": 4}, "initial_state")


def test_rwkv7_bf16_long_sequence_is_finite():
    x = {n: t.to(torch.bfloat16) if n != "initial_state" else t.float()
         for n, t in rwkv7_case(B=1, T=4096, H=1, K=16, V=16, seed=2).items()}
    x["w"] = x["w"] * 0.01  # near-unit decays: the state accumulates over the whole sequence
    o, h = rwkv7(**x, output_final_state=True, chunk_size=64)
    assert _finite(o, h) and o.dtype == torch.bfloat16


def test_rwkv7_errors():
    x = {n: t.float() for n, t in rwkv7_case(T=5).items()}
    with pytest.raises(ValueError, match="form"):
        rwkv7(**x, form="parallel")
    for name in ("w", "a", "b"):
        with pytest.raises(ValueError, match=f"{name} must"):
            rwkv7(**{**x, name: x[name][..., :3]})
    with pytest.raises(ValueError, match="initial_state must"):
        rwkv7(**{**x, "initial_state": x["initial_state"][:1]})
    with pytest.raises(ValueError, match="heads"):
        rwkv7(**{**x, "k": x["k"][:, :, :1], "v": x["v"][:, :, :1]})
    with pytest.raises(ValueError, match="chunk_size"):
        rwkv7(**x, chunk_size=0)
    with pytest.raises(TypeError):
        rwkv7(**{**x, "a": x["a"].to(torch.int32)})


# ---------------------------------------------------------------------------------------------------- gsa
def gsa_case(B=2, T=21, H=2, K=16, V=12, M=20, seed=0, strong=False, state=True):
    gen = torch.Generator().manual_seed(seed)
    g = F.logsigmoid(rand(gen, B, T, H, M) + (-2.0 if strong else 2.0))  # strong: alpha mostly < 0.2
    x = dict(q=rand(gen, B, T, H, K), k=rand(gen, B, T, H, K), v=rand(gen, B, T, H, V),
             s=torch.sigmoid(rand(gen, B, T, H, M)), g=g)
    if state:
        x.update(initial_state_k=rand(gen, B, H, K, M, std=0.5), initial_state_v=rand(gen, B, H, M, V, std=0.5))
    return x


def _gsa_pair(**kw):  # returns (o, (hk, hv)) flattened as check_against_reference expects [o, state, ...]
    o, hk, hv = gsa(**kw)
    return o, torch.cat([hk.flatten(2), hv.flatten(2)], -1)


def _gsa_ref_pair(**kw):
    o, hk, hv = gsa_reference(**kw)
    return o, torch.cat([hk.flatten(2), hv.flatten(2)], -1)


@pytest.mark.parametrize("form,strong,state", [("chunk", True, False), ("recurrent", True, False)])
def test_gsa_matches_reference(form, strong, state):
    check_against_reference(_gsa_pair, _gsa_ref_pair, gsa_case(strong=strong, state=state), {"scale": 0.3},
                            form=form, chunk_size=16)


# pass 1 works in chunks of 16 tokens, its state passes in super-chunks of 128, on blocks of 32 slots (and 32 keys)
GSA_PASS1_CASES = [  # dtype, strong, T, K, M, initial states
    (torch.float32, True, 45, 16, 20, True),  # one partial super-chunk; M = 20: slots past M padded to 32
    (torch.bfloat16, False, 45, 16, 20, True),
    (torch.float32, False, 150, 16, 40, False),  # 10 chunks: the second super-chunk partial (2 chunks, the
    #                                              last 6 tokens); M = 40: two slot blocks in the state passes
    (torch.float32, True, 128, 40, 24, True),  # exactly one super-chunk; K = 40: two key blocks, the second partial
    (torch.float32, False, 9, 16, 20, True),  # T < 16
    (torch.float32, True, 300, 24, 40, True),  # three super-chunks, the last of 3 chunks, partial
]


@pytest.mark.parametrize("dtype,strong,T,K,M,state", GSA_PASS1_CASES)
def test_gsa_triton_pass1(monkeypatch, dtype, strong, T, K, M, state):
    """Without gradients pass 1 runs gsa_chunk.py's Triton kernels (a spy checks they ran), pass 2 the
    engine's: output and both final states vs the float64 reference under the 2x rule, outputs poisoned,
    lengths on and off the chunks and super-chunks, slot and key counts off the blocks, with and without initial
    states; strong gates in float32."""
    module = sys.modules["effattn.linear.gsa"]
    from effattn._memory import poisoned_outputs
    from effattn.testing import compare

    calls = []
    real = module.gsa_pass1_forward
    monkeypatch.setattr(module, "gsa_pass1_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = gsa_case(B=2, T=T, H=2, K=K, V=12, M=M, seed=4, strong=strong, state=state)
    names = ("q", "k", "v", "s", "g")
    states = {n: x[n] for n in ("initial_state_k", "initial_state_v") if n in x}
    truth = _gsa_ref_pair(**{n: x[n].double() for n in names}, **{n: t.double() for n, t in states.items()},
                          scale=0.3, output_final_state=True)
    base = _gsa_ref_pair(**{n: x[n].to(dtype) for n in names}, **states, scale=0.3, output_final_state=True)
    with torch.no_grad(), poisoned_outputs(True):
        fast = _gsa_pair(**{n: x[n].to(dtype) for n in names}, **states, scale=0.3, output_final_state=True,
                         chunk_size=16)
    assert calls == [1]
    results = [compare(n, f, b, r, dtype) for n, f, b, r in zip(("o", "states"), fast, base, truth)]
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("dtype,strong,T,K,M,state", [
    (torch.float32, True, 45, 16, 40, True), (torch.bfloat16, False, 45, 16, 40, True),
    (torch.float32, False, 150, 16, 40, True), (torch.float32, True, 128, 40, 24, False),
    (torch.float32, False, 9, 16, 40, True)])
def test_gsa_triton_pass1_backward(monkeypatch, dtype, strong, T, K, M, state):
    """Under autograd pass 1 runs gsa_chunk.py's forward and its Triton backward (a spy sees its reverse state
    pass): gradients of q, k, v, s, g and both initial states (when given) vs the float64 reference (2x rule), on
    most of the forward test's shapes, M = 40 where it had 20 (two slot blocks of 32 in the state passes); strong
    gates take the exact (row by row) pairwise sums of the backward walks, mild ones the factored dots; T = 150:
    the initial state's gradient through two super-chunks."""
    chunk_module = sys.modules["effattn.linear.gsa_chunk"]
    reverse = []
    real = chunk_module._states
    monkeypatch.setattr(chunk_module, "_states", lambda *a, **k: reverse.append(k["reverse"]) or real(*a, **k))
    check_against_reference(_gsa_pair, _gsa_ref_pair, gsa_case(T=T, K=K, M=M, seed=5, strong=strong, state=state),
                            {"scale": 0.3}, dtype=dtype, form="chunk", chunk_size=16)
    assert True in reverse


@pytest.mark.parametrize("strong", [False, True])
def test_gsa_triton_pass1_other_super_chunks(monkeypatch, strong):
    """Every super-chunk length the forward's tuner may pick (FWD_CONFIGS; float32 inputs are tuned over 64-token
    ones only, but a pinned length runs in any dtype), each pinned in turn: output, states and every gradient vs
    the float64 reference (2x rule) at T = 150 (three super-chunks of 64, the last partial), and the backward's
    state pass runs over the forward's super-chunks."""
    chunk_module = sys.modules["effattn.linear.gsa_chunk"]
    lengths = {sup for sup, _ in chunk_module.FWD_CONFIGS}
    real = chunk_module._prep
    for sup in sorted(lengths):
        seen = []
        spy = lambda *a, **k: seen.append((k["forward"], k["sup"])) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(chunk_module, "_prep", spy)
        monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", f"gsa_fwd={sup},8")
        check_against_reference(_gsa_pair, _gsa_ref_pair, gsa_case(T=150, K=16, M=40, seed=6, strong=strong),
                                {"scale": 0.3}, dtype=torch.float32, form="chunk", chunk_size=16)
        assert (False, sup) in seen and (True, sup) in seen and {s_ for _, s_ in seen} == {sup}, seen


def test_gsa_decode_equals_chunk():
    x = {n: t.float() for n, t in gsa_case(T=9, seed=1).items()}
    o, hk, hv = gsa(**x, output_final_state=True, chunk_size=16)
    steps = []
    for t in range(9):
        step = {n: x[n][:, t:t + 1] for n in ("q", "k", "v", "s", "g")}
        o_t, x["initial_state_k"], x["initial_state_v"] = gsa(**step, initial_state_k=x["initial_state_k"],
                                                              initial_state_v=x["initial_state_v"],
                                                              output_final_state=True, form="recurrent")
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, 1), o, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(x["initial_state_k"], hk, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(x["initial_state_v"], hv, atol=2e-5, rtol=2e-4)


def test_gsa_bf16_long_sequence_is_finite(monkeypatch):
    # pass 2 through the engine's plain-PyTorch chunk form (same math as its Triton kernels, whose long-sequence
    # bf16 behaviour the engine's tests cover; the interpreter would take ~25 s here): this checks pass 1 and
    # the softmax between the passes at full length
    monkeypatch.setattr(sys.modules["effattn.linear.gsa"], "chunk_gated_linear_attn", chunk_form)
    x = {n: t.to(torch.bfloat16) for n, t in gsa_case(B=1, T=4096, H=1, K=16, V=16, M=16, seed=2,
                                                       state=False).items()}
    x["g"] = x["g"] * 0.01  # slots barely forget: the states sum nearly the whole sequence
    o, hk, hv = gsa(**x, output_final_state=True, chunk_size=64)
    assert _finite(o, hk, hv) and o.dtype == torch.bfloat16


def test_gsa_errors():
    x = {n: t.float() for n, t in gsa_case(T=5).items()}
    with pytest.raises(ValueError, match="form"):
        gsa(**x, form="parallel")
    with pytest.raises(ValueError, match="g must"):
        gsa(**{**x, "g": x["g"][..., :3]})
    with pytest.raises(ValueError, match="s must"):
        gsa(**{**x, "s": x["s"][:, :2]})
    with pytest.raises(ValueError, match="initial_state_k must"):
        gsa(**{**x, "initial_state_k": x["initial_state_k"][..., :3]})
    with pytest.raises(ValueError, match="initial_state_v must"):
        gsa(**{**x, "initial_state_v": x["initial_state_v"][:1]})
    with pytest.raises(ValueError, match="chunk_size"):
        gsa(**x, chunk_size=24)


# -------------------------------------------------------------------------------------------- rwkv5, rwkv4
def rwkv5_case(B=2, T=21, H=2, K=16, V=12, seed=0, state=True):
    gen = torch.Generator().manual_seed(seed)
    x = dict(r=rand(gen, B, T, H, K), k=rand(gen, B, T, H, K), v=rand(gen, B, T, H, V),
             w=-torch.exp(rand(gen, H, K) - 0.5), u=rand(gen, H, K, std=0.5))
    if state:
        x["initial_state"] = rand(gen, B, H, K, V, std=0.5)
    return x


@pytest.mark.parametrize("form,state", [("recurrent", False)])  # the registry test runs both forms with a state
def test_rwkv5_matches_reference(form, state):
    check_against_reference(rwkv5, rwkv5_reference, rwkv5_case(state=state), {"scale": 0.5}, form=form,
                            chunk_size=16)


def test_rwkv5_decode_equals_chunk_and_errors():
    check_decode(rwkv5, rwkv5_case(T=7, seed=1), {"chunk_size": 16}, "initial_state", split=("w", "u"))
    x = {n: t.float() for n, t in rwkv5_case(T=5).items()}
    with pytest.raises(ValueError, match="w must"):
        rwkv5(**{**x, "w": x["w"][:1]})
    with pytest.raises(ValueError, match="w must"):
        rwkv5(**{**x, "w": x["w"].expand(2, 5, 2, 16)})


def rwkv4_case(B=2, T=21, H=2, D=12, seed=0, state=True, big=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = dict(k=big * rand(gen, B, T, H, D), v=rand(gen, B, T, H, D), w=-torch.exp(rand(gen, H, D) - 1.0),
             u=rand(gen, H, D, std=0.5))
    if state:
        x["initial_state"] = torch.stack([rand(gen, B, H, D), rand(gen, B, H, D)], dim=2)
    return x


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("state,big", [(True, 1.0), (False, 40.0)])
def test_rwkv4_matches_reference(form, state, big):
    # big: keys up to ~100, where e^k overflows float32 (RWKV-4 without its log-space state would give inf/NaN)
    check_against_reference(rwkv4, rwkv4_reference, rwkv4_case(state=state, big=big), {}, form=form, chunk_size=8)


def test_rwkv4_decode_equals_chunk():
    check_decode(rwkv4, rwkv4_case(T=9, seed=1), {"chunk_size": 4}, "initial_state", split=("w", "u"))


def test_rwkv45_bf16_long_sequence_is_finite():
    x = {n: t.to(torch.bfloat16) for n, t in rwkv4_case(B=1, T=4096, H=1, D=16, seed=2, state=False, big=20).items()}
    x["w"] = x["w"] * 1e-3  # almost no decay: the weights sum the whole sequence
    o, h = rwkv4(**x, output_final_state=True, form="chunk", chunk_size=64)  # the fused form: test_rwkv4_fused.py
    assert _finite(o, h) and o.dtype == torch.bfloat16
    y = {n: t.to(torch.bfloat16) for n, t in rwkv5_case(B=1, T=4096, H=1, K=16, V=16, seed=2, state=False).items()}
    y["w"] = y["w"] * 1e-3
    # the decode form here: "chunk" is rwkv6's engine call with the decay broadcast (the engine's own tests
    # cover its long-sequence bf16 behaviour, and the interpreter would take ~20 s at this length)
    o, h = rwkv5(**y, output_final_state=True, form="recurrent")
    assert _finite(o, h) and o.dtype == torch.bfloat16


def test_rwkv4_errors():
    x = {n: t.float() for n, t in rwkv4_case(T=5).items()}
    with pytest.raises(ValueError, match="form"):
        rwkv4(**x, form="parallel")
    with pytest.raises(ValueError, match="v must"):
        rwkv4(**{**x, "v": x["v"][..., :3]})
    for name in ("w", "u"):
        with pytest.raises(ValueError, match=f"{name} must"):
            rwkv4(**{**x, name: x[name][:1]})
    with pytest.raises(ValueError, match="initial_state must"):
        rwkv4(**{**x, "initial_state": x["initial_state"][:, :, :1]})
    with pytest.raises(TypeError):
        rwkv4(**{**x, "v": x["v"].double()})


def test_rwkv7_fused_recurrent_decodes_like_the_reference():
    x = {n: t.float() for n, t in rwkv7_case(T=11, K=20, V=24, seed=3).items()}  # K, V off the block sizes
    ref_o, ref_h = rwkv7_reference(**{n: t.double() for n, t in x.items()}, scale=0.5, output_final_state=True)
    o, h = fused_recurrent_rwkv7(**x, scale=0.5, output_final_state=True)
    torch.testing.assert_close(o.double(), ref_o, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=1e-4)
    h = x["initial_state"]
    for t in range(3):  # token by token, the state carried
        step = {n: x[n][:, t:t + 1] for n in ("r", "w", "k", "v", "a", "b")}
        o_t, h = fused_recurrent_rwkv7(**step, scale=0.5, initial_state=h, output_final_state=True)
        torch.testing.assert_close(o_t.double(), ref_o[:, t:t + 1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no backward"):
        fused_recurrent_rwkv7(**{**x, "v": x["v"].requires_grad_()})


@pytest.mark.parametrize("matrix", [True, False])
def test_affine_scan_equals_the_loop(matrix):
    gen = torch.Generator().manual_seed(4)
    N, K, V = 11, 5, 3  # 11 chunks: four doubling steps, the last one partial
    M = rand(gen, 2, N, K, K if matrix else 1, std=0.5)
    R, h = rand(gen, 2, N, K, V), rand(gen, 2, K, V)
    hs, last = affine_scan(M, R, h, matrix=matrix)
    for n in range(N):
        torch.testing.assert_close(hs[:, n], h)
        h = (M[:, n] @ h if matrix else M[:, n] * h) + R[:, n]
    torch.testing.assert_close(last, h)
