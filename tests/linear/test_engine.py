"""The gated recurrence engine: recurrent == parallel == chunkwise (torch) == Triton chunk kernels, against
the float64 reference, for every gate type; varlen, initial states, chunk remainders, decoding, stability."""
import pytest
import torch
import torch.nn.functional as F

from effattn.linear import (chunk_gated_linear_attn, delta_net, fused_recurrent_gated_linear_attn, gated_delta_net,
                            gated_linear_attn, gla, lightning, retnet, retnet_gamma, simple_gla)
from effattn.linear.chunk_torch import chunk_form
from effattn.reference import linear_parallel, linear_recurrent
from effattn.testing import compare

CASES = [(None, False), ("scalar", False), ("vector", False), (None, True), ("scalar", True)]
IDS = ["none", "scalar", "vector", "delta", "gated_delta"]


def make(gate, delta, B=2, T=45, H=2, K=16, V=32, n_states=None, strength=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    if delta:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = None if gate is None else strength * F.logsigmoid(r(B, T, H, *((K,) if gate == "vector" else ())) + 2)
    beta = torch.sigmoid(r(B, T, H)) if delta else None
    h0 = 0.5 * r(n_states or B, H, K, V)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)


def run(fn, x, dtype, delta, do, dht, **kw):
    """Outputs and gradients of every input under upstream gradients (do, dht)."""
    ins = {n: None if t is None else t.detach().to(dtype).requires_grad_() for n, t in x.items()}
    o, ht = fn(**ins, output_final_state=True, delta_rule=delta, **kw)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return [o, ht] + [t.grad for t in ins.values() if t is not None]


def check_all(fast_fn, x, delta, dtype=torch.float32, **kw):
    ref = run(linear_recurrent if "cu_seqlens" not in kw else _per_seq, x, torch.float64, delta, *_upstream(x),
              **{k: v for k, v in kw.items() if k == "cu_seqlens"})
    base = run(linear_recurrent if "cu_seqlens" not in kw else _per_seq, x, dtype, delta, *_upstream(x),
               **{k: v for k, v in kw.items() if k == "cu_seqlens"})
    fast = run(fast_fn, x, dtype, delta, *_upstream(x), **kw)
    names = ["o", "ht"] + [f"d{n}" for n, t in x.items() if t is not None]
    results = [compare(n, f, b, r, dtype) for n, f, b, r in zip(names, fast, base, ref)]
    assert all(c.ok for c in results), "\n".join(map(str, results))


def _upstream(x):
    gen = torch.Generator().manual_seed(1)
    B, T, H, _ = x["q"].shape
    S = x["initial_state"]
    return torch.randn(B, T, H, x["v"].shape[-1], generator=gen, dtype=torch.float64), \
        torch.randn(S.shape, generator=gen, dtype=torch.float64)


def _per_seq(q, k, v, g=None, beta=None, *, cu_seqlens, **kw):
    return gated_linear_attn(q, k, v, g, beta, cu_seqlens=cu_seqlens, form="recurrent", **kw)


@pytest.mark.parametrize("gate,delta", CASES, ids=IDS)
def test_triton_chunk_matches_reference(gate, delta):
    """Triton chunk kernels (fwd, final state, grads of q, k, v, g, beta, h0), T=45 = 2 chunks of 16 + 13."""
    check_all(chunk_gated_linear_attn, make(gate, delta), delta, chunk_size=16)


@pytest.mark.parametrize("gate,delta", [("vector", False), ("scalar", True)], ids=["vector", "gated_delta"])
def test_triton_chunk_default_chunk_size(gate, delta):
    """The default chunk of 64 rows, 16-row sub-blocks for vector gates: T=80 leaves the second chunk with
    16 live rows and three dead sub-blocks (whose reference rows once pointed past the tensors)."""
    check_all(chunk_gated_linear_attn, make(gate, delta, B=2, T=80, H=1, K=16, V=16), delta)


@pytest.mark.parametrize("delta", [False, True], ids=["scalar", "gated_delta"])
def test_triton_state_pass_reads_a_launched_cumsum(delta, monkeypatch):
    """The state pass's other tuner variant for a scalar gate (RAW_G = 0): the chunk-local cumsum launched
    before it, not folded into its loop. The interpreter takes the first candidate (RAW_G = 1) otherwise."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "state_fwd=32,4,2,16,0")
    check_all(chunk_gated_linear_attn, make("scalar", delta, T=45), delta, chunk_size=16)


@pytest.mark.parametrize("gate,delta", CASES, ids=IDS)
def test_triton_chunk_of_128_rows(gate, delta):
    """Chunks of 128 rows (eight 16-row blocks in the WY inverse), T = 150: one full chunk and 22 rows."""
    check_all(chunk_gated_linear_attn, make(gate, delta, B=1, T=150, H=1, K=16, V=16), delta, chunk_size=128)


def test_triton_chunk_beta_without_delta_rule():
    """beta scales the values (x = beta v) without the delta rule: dbeta = sum(dx v) in `_bwd_dx`."""
    x = make("scalar", False, B=1, T=21, H=1)
    x["beta"] = torch.sigmoid(torch.randn(1, 21, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    check_all(chunk_gated_linear_attn, x, False, chunk_size=16)


def test_triton_vector_gate_strong_decay_matches_reference():
    """Log gates down to ~-60 per step: a 16-row block decays far past e^{-88}, where exp(Gc_i) exp(-Gc_j)
    would overflow float32; the kernels' exponents stay <= 0 (fwd and every gradient vs float64)."""
    check_all(chunk_gated_linear_attn, make("vector", False, B=1, T=37, H=1, strength=40.0), False, chunk_size=32)


@pytest.mark.parametrize("gate,delta", [("scalar", False), ("vector", False), ("scalar", True)],
                         ids=["scalar", "vector", "gated_delta"])
def test_triton_chunk_head_dim_split(gate, delta):
    """Dk = 80 > 64: the key dimension split across programs, 64 + 16 channels: the state kernels' rows
    without the delta rule, and the backward's dq / dk / dW (with the scalar gate's sums over channels in
    parts) for every gate."""
    check_all(chunk_gated_linear_attn, make(gate, delta, B=1, T=20, H=1, K=80, V=16), delta, chunk_size=16)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_triton_state_passes_in_32_channel_blocks(gate, monkeypatch):
    """The state passes' narrowest key split (the tuner's candidates without the delta rule at Dk >= 64):
    Dk = 80 in blocks of 32 + 32 + 16, forward (both scalar-gate variants) and backward."""
    for raw in (1, 0) if gate == "scalar" else (0,):
        monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", f"state_fwd=16,4,2,32,{raw};state_bwd=16,4,2,32")
        check_all(chunk_gated_linear_attn, make(gate, False, B=1, T=37, H=1, K=80, V=16), False, chunk_size=16)


@pytest.mark.parametrize("gate,delta", CASES, ids=IDS)
def test_torch_forms_agree_in_float64(gate, delta):
    x = make(gate, delta, T=37)
    ref_o, ref_s = linear_recurrent(**x, output_final_state=True, delta_rule=delta)
    for form in (linear_parallel, lambda **a: chunk_form(**a, chunk_size=16)):
        o, s = form(**x, output_final_state=True, delta_rule=delta)
        torch.testing.assert_close(o, ref_o, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s, ref_s, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate,delta", [("vector", False), ("scalar", True)], ids=["gla", "gated_delta"])
def test_chunk_torch_grads(gate, delta):
    check_all(lambda **a: chunk_form(**a, chunk_size=16), make(gate, delta, T=21), delta)


@pytest.mark.parametrize("gate,delta", [("vector", False), ("scalar", True)], ids=["gla", "gated_delta"])
def test_varlen(gate, delta):
    """Packed sequences (one shorter than a chunk, one spanning three) with their own initial states."""
    x = make(gate, delta, B=1, T=58, n_states=3)
    cu = torch.tensor([0, 7, 40, 58], dtype=torch.int32)
    check_all(chunk_gated_linear_attn, x, delta, cu_seqlens=cu, chunk_size=16)
    ref = _per_seq(**x, cu_seqlens=cu, delta_rule=delta, output_final_state=True)
    got = chunk_form(**x, cu_seqlens=cu, delta_rule=delta, output_final_state=True, chunk_size=16)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate,delta", CASES, ids=IDS)
def test_fused_recurrent_decoding(gate, delta):
    """A prompt then one-token steps, the state carried in and out, == the recurrence over the whole text."""
    x = make(gate, delta, B=2, T=12)
    f32 = {n: None if t is None else t.float() for n, t in x.items()}
    ref_o, ref_s = linear_recurrent(**x, output_final_state=True, delta_rule=delta)
    cut = lambda a, b: {n: None if t is None else t[:, a:b] for n, t in f32.items() if n != "initial_state"}  # noqa: E731
    o, s = fused_recurrent_gated_linear_attn(**cut(0, 10), initial_state=f32["initial_state"],
                                             output_final_state=True, delta_rule=delta)
    outs = [o]
    for t in (10, 11):
        o, s = fused_recurrent_gated_linear_attn(**cut(t, t + 1), initial_state=s, output_final_state=True,
                                                 delta_rule=delta)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1).double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


def test_fused_recurrent_varlen():
    x = {n: None if t is None else t.float() for n, t in make("scalar", True, B=1, T=20, n_states=2).items()}
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    o, s = fused_recurrent_gated_linear_attn(**x, cu_seqlens=cu, output_final_state=True, delta_rule=True)
    ro, rs = _per_seq(**x, cu_seqlens=cu, delta_rule=True, output_final_state=True)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-4)


# the vector gate at T = 1024 (16 chunks of 64 decaying by e^{-64} to e^{-134}): its 16-row blocks make the
# interpreter ~4x slower, and the cumsums being chunk-local, more chunks test nothing more
@pytest.mark.parametrize("gate,delta,T", [("scalar", False, 4096), ("vector", False, 1024), ("scalar", True, 4096)])
def test_long_sequence_strong_decay_bf16_is_finite(gate, delta, T):
    """Long sequences, gates e^{g} down to ~e^{-20} per step (a vector gate's chunk decays far past e^{-88}),
    bf16, Triton kernels forward and backward: chunk-local float32 cumsums and exponents <= 0 never overflow."""
    x = make(gate, delta, B=1, T=T, H=1, K=16, V=16, strength=8.0)
    x = {n: None if t is None else t.to(torch.bfloat16).requires_grad_() for n, t in x.items()}
    o, s = chunk_gated_linear_attn(**x, output_final_state=True, delta_rule=delta)
    assert torch.isfinite(o.float()).all() and torch.isfinite(s.float()).all()
    (o.float().sum() + s.sum()).backward()
    for n, t in x.items():
        if t is not None:
            assert torch.isfinite(t.grad.float()).all(), n
    ref = linear_recurrent(**{n: None if t is None else t.detach()[:, -200:] if n != "initial_state" else None
                              for n, t in x.items()}, delta_rule=delta)
    # strong decay forgets the far past: the last outputs match a recurrence over the last 200 tokens
    torch.testing.assert_close(o[:, -8:].float(), ref[:, -8:].float(), rtol=0.1, atol=0.1)


def test_methods_are_their_gates():
    x = make(None, False, T=20)
    B, T, H, _ = x["q"].shape
    gamma = retnet_gamma(H)
    assert torch.allclose(gamma, torch.tensor([1 - 2 ** -5, 1 - 2 ** -6], dtype=torch.float64))
    g = torch.log(gamma).view(1, 1, H).expand(B, T, H)
    base = dict(q=x["q"], k=x["k"], v=x["v"], form="recurrent")
    torch.testing.assert_close(retnet(**base), simple_gla(g=g, **base))
    torch.testing.assert_close(lightning(decay=0.9, **base), simple_gla(g=torch.full((B, T, H), 0.9, dtype=torch.float64).log(), **base))
    torch.testing.assert_close(lightning(**base), linear_recurrent(x["q"], x["k"], x["v"]))
    d = make("scalar", True, T=20)
    torch.testing.assert_close(gated_delta_net(d["q"], d["k"], d["v"], torch.zeros_like(d["g"]), d["beta"], form="recurrent"),
                               delta_net(d["q"], d["k"], d["v"], beta=d["beta"], form="recurrent"))


def test_errors_name_the_argument():
    x = {n: None if t is None else t.float() for n, t in make("scalar", True, T=8).items()}
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
    with pytest.raises(ValueError, match="g must be"):
        chunk_gated_linear_attn(q, k, v, g[:, :, :1])
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_linear_attn(q, k, v, g, beta[:, :4], delta_rule=True)
    with pytest.raises(ValueError, match="scalar gate"):
        chunk_gated_linear_attn(q, k, v, g.unsqueeze(-1).expand(*g.shape, 16), beta, delta_rule=True)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_linear_attn(q, k, v, g, initial_state=torch.zeros(1, 2, 16, 32))
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        chunk_gated_linear_attn(q, k, v, g, chunk_size=24)
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(TypeError, match="q must have dtype"):
        chunk_gated_linear_attn(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="form must be one of"):
        simple_gla(q, k, v, g, form="magic")
    with pytest.raises(ValueError, match="scalar gate g"):
        simple_gla(q, k, v, g.unsqueeze(-1).expand(*g.shape, 16))
    with pytest.raises(ValueError, match="vector gate g"):
        gla(q, k, v, g)
    with pytest.raises(ValueError, match="needs beta"):
        delta_net(q, k, v)
    with pytest.raises(ValueError, match="no data-dependent gate"):
        retnet(q, k, v, g)
    with pytest.raises(ValueError, match="decay must be"):
        lightning(q, k, v, decay=1.5)
    with pytest.raises(ValueError, match="no backward"):
        fused_recurrent_gated_linear_attn(q.requires_grad_(), k, v, g)


def test_chunk_kernel_takes_expanded_cotangents():
    """o.sum() + ht.sum() hands the backward stride-0 views; the kernels must read them as dense (on the GPU
    an expanded dht once read out of bounds)."""
    x = {n: t if t is None else t.float() for n, t in make("scalar", True, B=1, T=21, V=16, seed=3).items()}
    grads = []
    for fn in (chunk_gated_linear_attn, linear_recurrent):
        ins = {n: t.detach().requires_grad_() for n, t in x.items()}
        o, ht = fn(**ins, output_final_state=True, delta_rule=True)
        (o.sum() + ht.sum()).backward()
        grads.append([t.grad for t in ins.values()])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-3)


def test_output_dtype_float32_from_bf16_inputs():
    """output_dtype=float32 (a caller adding to the output before rounding once, as rwkv6): the bf16 output's
    values before their rounding, float32 cotangents accepted, and the same gradients as with a bf16 output
    and the cotangent rounded to bf16 (the kernels' dots take q's dtype)."""
    x = {n: t if t is None else t.bfloat16() for n, t in make("vector", False, B=1, T=37, V=24, seed=4).items()}
    outs, grads = [], []
    g = torch.randn(1, 37, x["q"].shape[2], 24, dtype=torch.float32)
    for out_dtype in (torch.float32, None):
        ins = {n: t.detach().requires_grad_() for n, t in x.items() if t is not None}
        o = chunk_gated_linear_attn(**ins, output_dtype=out_dtype)
        o.backward(g.to(o.dtype))
        outs.append(o)
        grads.append([t.grad.float() for t in ins.values()])
    assert outs[0].dtype == torch.float32 and outs[1].dtype == torch.bfloat16
    # one bf16 ulp: the interpreter's float32 -> bf16 conversion in the kernel need not round like torch's
    torch.testing.assert_close(outs[0].bfloat16().float(), outs[1].float(), atol=1e-6, rtol=2 ** -7)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="output_dtype"):
        chunk_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], output_dtype=torch.float64)
