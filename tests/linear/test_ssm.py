"""Mamba (S6), mLSTM and sLSTM: every form vs the float64 reference (outputs, final states, gradients of every
input) at sizes off the block shapes, decode step == chunk/parallel form token by token, bf16 stability at
T = 4096, argument errors."""
import importlib.util
import pathlib

import pytest
import torch
import triton
import triton.language as tl

from effattn.linear.mamba import mamba, mamba_inputs, mamba_reference
from effattn.linear.mlstm import mlstm, mlstm_reference
from effattn.linear.selective_walk import _lane_sums, _softplus
from effattn.linear.slstm import slstm, slstm_inputs, slstm_reference
from effattn.registry import Shape

# the catalogue's shared checks (--import-mode=importlib: sibling test modules are loaded by path)
_spec = importlib.util.spec_from_file_location("_catalog_checks", pathlib.Path(__file__).with_name("test_catalog.py"))
_catalog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_catalog)
check_against_reference, check_decode = _catalog.check_against_reference, _catalog.check_decode


# ------------------------------------------------------------------------------------------------- mamba
def mamba_case(B=2, T=41, D=20, N=12, seed=0, **kw):
    """D and N off the block sizes (16), T spanning three chunks and a remainder."""
    gen = torch.Generator().manual_seed(seed)
    inp = mamba_inputs(Shape(batch=B, seq_q=T, heads=1, head_dim=4), torch.float64, "cpu", gen, **kw)
    r = lambda *s, std=1.0: std * torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    inp.update(x=r(B, T, D), dt=r(B, T, D) - 1.0, A=-torch.exp(r(D, N, std=0.5)), B=r(B, T, N), C=r(B, T, N),
               D=r(D), dt_bias=r(D, std=0.5), z=r(B, T, D))
    if "initial_state" in inp:
        inp["initial_state"] = r(B, D, N, std=0.5)
    return inp


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("extras", [True, False], ids=["D,z,bias,h0", "bare"])
def test_mamba_matches_reference(form, extras):
    inp = mamba_case(initial_state=extras)
    if not extras:
        for name in ("D", "z", "dt_bias"):
            inp.pop(name)
    check_against_reference(mamba, mamba_reference, inp, {}, form=form)


def test_mamba_decode_matches_chunk():
    inp = mamba_case(T=19, seed=3)
    static = {n: inp.pop(n) for n in ("A", "D", "dt_bias")}
    check_decode(mamba, inp, {n: t.float() for n, t in static.items()}, "initial_state")


def _mamba_bf16_strong_decays(T: int):
    gen = torch.Generator().manual_seed(4)
    inp = mamba_inputs(Shape(batch=1, seq_q=T, heads=1, head_dim=16), torch.bfloat16, "cpu", gen)
    inp["dt"] = inp["dt"] + 2.0  # large steps: strong decays exp(Delta A) -> 0 and large inputs Delta B x
    for t in (inp["x"], inp["dt"], inp["B"], inp["A"]):
        t.requires_grad_(True)
    y, h = mamba(**inp, output_final_state=True)
    (y.float().sum() + h.sum()).backward()
    for t in (y, h, inp["x"].grad, inp["dt"].grad, inp["B"].grad, inp["A"].grad):
        assert torch.isfinite(t.float()).all()


def test_mamba_bf16_long_is_finite(monkeypatch):
    from effattn.linear import selective_scan

    # T = 4096: the walk forward in two time chunks (pass 1 and the state passing under strong decays), states
    # saved every 128 tokens; the in-chunk-scan backward (the walk backward, 3 walks per token, is slow in the
    # interpreter: it runs at T = 512 below)
    monkeypatch.setattr(selective_scan, "_configs", lambda *shape: [selective_scan.FwdConfig("walk", 128, 16, 4, 2048)])
    monkeypatch.setattr(selective_scan, "_bwd_configs", lambda *shape: [selective_scan.BwdConfig("scan", 16, 4)])
    _mamba_bf16_strong_decays(4096)


def test_mamba_walk_backward_bf16_is_finite(monkeypatch):
    from effattn.linear import selective_scan

    monkeypatch.setattr(selective_scan, "_configs", lambda *shape: [selective_scan.FwdConfig("walk", 32, 16, 4, 512)])
    monkeypatch.setattr(selective_scan, "_bwd_configs", lambda *shape: [selective_scan.BwdConfig("walk", 16, 1, 128)])
    _mamba_bf16_strong_decays(512)


@pytest.mark.parametrize("change,error,match", [
    ({"x": torch.zeros(2, 5)}, ValueError, "x must have 3 dimensions"),
    ({"dt": torch.zeros(2, 5, 7)}, ValueError, "dt must be"),
    ({"A": torch.zeros(7, 4)}, ValueError, "A must be"),
    ({"B": torch.zeros(2, 5, 3)}, ValueError, "B must be"),
    ({"C": torch.zeros(2, 4, 4)}, ValueError, "C must be"),
    ({"D": torch.zeros(3)}, ValueError, "D must be"),
    ({"z": torch.zeros(2, 5, 3)}, ValueError, "z must be"),
    ({"initial_state": torch.zeros(2, 8, 5)}, ValueError, "initial_state must be"),
    ({"form": "parallel"}, ValueError, "form"),
    ({"x": "x"}, TypeError, "x must be a torch.Tensor"),
])
def test_mamba_errors(change, error, match):
    inp = dict(x=torch.zeros(2, 5, 8), dt=torch.zeros(2, 5, 8), A=-torch.ones(8, 4), B=torch.zeros(2, 5, 4),
               C=torch.zeros(2, 5, 4))
    inp.update(change)
    with pytest.raises(error, match=match):
        mamba(**inp)


# ------------------------------------------------------------------------------------------------- mlstm
def mlstm_case(B=2, T=23, H=2, K=12, V=10, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: std * torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    h0 = r(B, H, K, V + 2, std=0.5)
    h0[..., -2] = h0[..., -2].abs() + 0.5
    h0[..., -1] = h0[..., :1, -1]
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), i=r(B, T, H, std=spread),
                f=r(B, T, H) + 2.0, initial_state=h0)


@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("forget", ["sigmoid", "exp"])
def test_mlstm_matches_reference(form, forget):
    inp = mlstm_case()
    if forget == "exp":
        inp["f"] = -torch.nn.functional.softplus(-inp["f"])  # log f <= 0 keeps the exponential gate a decay
    check_against_reference(mlstm, mlstm_reference, inp, {"forget": forget}, form=form, chunk_size=8)


@pytest.mark.parametrize("initial", [True, False])
def test_mlstm_state_carried_over_several_spans(initial):
    """23 chunks of 2 tokens: the chunk states are unrolled 16 chunks at a time (`_carry`), so this crosses a span
    boundary, with and without an initial state (m = -inf), wide input gates included."""
    inp = mlstm_case(T=45, seed=8, spread=20.0)
    if not initial:
        inp.pop("initial_state")
    check_against_reference(mlstm, mlstm_reference, inp, {}, form="chunk", chunk_size=2)


def test_mlstm_wide_input_gates_stay_exact():
    """Input gates spanning 200 nats (exp(i) overflows float32): the carried stabiliser keeps every form exact."""
    inp = mlstm_case(seed=5, spread=60.0)
    inp.pop("initial_state")
    check_against_reference(mlstm, mlstm_reference, inp, {}, form="chunk", chunk_size=8)


def test_mlstm_decode_matches_chunk():
    inp = mlstm_case(T=13, seed=6)
    check_decode(mlstm, inp, {"chunk_size": 4}, "initial_state")


def test_mlstm_bf16_long_is_finite():
    gen = torch.Generator().manual_seed(7)
    r = lambda *s, std=1.0: (std * torch.randn(*s, generator=gen)).bfloat16().requires_grad_()  # noqa: E731
    inp = dict(q=r(1, 4096, 1, 16), k=r(1, 4096, 1, 16), v=r(1, 4096, 1, 16), i=r(1, 4096, 1, std=10.0),
               f=r(1, 4096, 1, std=3.0))
    h, state = mlstm(**inp, output_final_state=True, chunk_size=256)
    (h.float().sum() + state.sum()).backward()
    for t in (h, state, *(x.grad for x in inp.values())):
        assert torch.isfinite(t.float()).all()


@pytest.mark.parametrize("change,error,match", [
    ({"i": torch.zeros(2, 5)}, ValueError, "i must have 3 dimensions"),
    ({"f": torch.zeros(2, 5, 3)}, ValueError, "f must be"),
    ({"k": torch.zeros(2, 5, 1, 4), "v": torch.zeros(2, 5, 1, 4)}, ValueError, "as many heads"),
    ({"initial_state": torch.zeros(2, 2, 4, 4)}, ValueError, r"Dv \+ 2"),
    ({"forget": "tanh"}, ValueError, "forget"),
    ({"form": "fused"}, ValueError, "form"),
])
def test_mlstm_errors(change, error, match):
    inp = dict(q=torch.zeros(2, 5, 2, 4), k=torch.zeros(2, 5, 2, 4), v=torch.zeros(2, 5, 2, 4), i=torch.zeros(2, 5, 2),
               f=torch.zeros(2, 5, 2))
    inp.update(change)
    with pytest.raises(error, match=match):
        mlstm(**inp)


# ------------------------------------------------------------------------------------------------- slstm
def slstm_case(B=2, T=11, H=2, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inp = slstm_inputs(Shape(batch=B, seq_q=T, heads=H, head_dim=d), torch.float64, "cpu", gen)
    inp["initial_state"] = inp["initial_state"].double()
    return inp


@pytest.mark.parametrize("form", ["recurrent", "fused"])
@pytest.mark.parametrize("forget", ["sigmoid", "exp"])
def test_slstm_matches_reference(form, forget):
    inp = slstm_case(d=5)  # d = 5: the fused kernel's lanes 5..7 are masked
    if forget == "exp":
        inp["x"][:, :, 1] = -torch.nn.functional.softplus(-inp["x"][:, :, 1])
    check_against_reference(slstm, slstm_reference, inp, {"forget": forget}, form=form)


def test_slstm_matches_hand_computed_lstm_step():
    """One token from zero state: m = i~, so i' = 1, f' = 0, c = tanh(z~), n = 1, h = sigmoid(o~) tanh(z~)."""
    inp = slstm_case(B=1, T=1)
    h = slstm(inp["x"], inp["R"])
    x = inp["x"][:, 0]
    torch.testing.assert_close(h[:, 0], torch.sigmoid(x[:, 3]) * torch.tanh(x[:, 2]))


def test_slstm_decode_matches_sequence():
    inp = slstm_case(T=9, seed=2)
    o, state = slstm(**inp, output_final_state=True)
    s, steps = inp["initial_state"], []
    for t in range(9):
        o_t, s = slstm(inp["x"][:, t:t + 1], inp["R"], initial_state=s, output_final_state=True)
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, 1), o)
    torch.testing.assert_close(s, state)


def test_slstm_bf16_long_is_finite():
    """Forward over 4096 tokens; the backward (a 4096-step Python autograd graph costs ~40 s here) over 256.
    The recurrent form: the fused kernel would take minutes in Triton's interpreter at this length."""
    gen = torch.Generator().manual_seed(3)
    inp = slstm_inputs(Shape(batch=1, seq_q=4096, heads=4, head_dim=8), torch.bfloat16, "cpu", gen,
                       initial_state=False)
    inp["x"] = (inp["x"].float() * 4).bfloat16()  # large pre-activations: exponential gates up to e^16
    with torch.no_grad():
        h, state = slstm(**inp, output_final_state=True)
    assert torch.isfinite(h.float()).all() and torch.isfinite(state).all()
    x, R = inp["x"][:, :256].clone().requires_grad_(), inp["R"].clone().requires_grad_()
    h, state = slstm(x, R, output_final_state=True)
    (h.float().sum() + state[:, :3].sum()).backward()
    for t in (h, state, x.grad, R.grad):
        assert torch.isfinite(t.float()).all()


@pytest.mark.parametrize("change,error,match", [
    ({"x": torch.zeros(2, 5, 3, 2, 4)}, ValueError, "gates i, f, z, o"),
    ({"R": torch.zeros(4, 2, 4, 3)}, ValueError, "R must be"),
    ({"initial_state": torch.zeros(2, 4, 2, 3)}, ValueError, "initial_state must be"),
    ({"forget": "relu"}, ValueError, "forget"),
    ({"form": "chunk"}, ValueError, "form"),
    ({"form": "fused", "x": torch.zeros(2, 5, 4, 2, 4, dtype=torch.float64)}, TypeError, "float64"),
])
def test_slstm_errors(change, error, match):
    inp = dict(x=torch.zeros(2, 5, 4, 2, 4), R=torch.zeros(4, 2, 4, 4))
    inp.update(change)
    with pytest.raises(error, match=match):
        slstm(**inp)


@pytest.mark.parametrize("fwd,bwd", [(("walk", 8, 16, 4, 16), ("walk", 16, 1, 16)),
                                     (("walk", 8, 16, 4, 16), ("walk", 16, 1, 16, 2)),
                                     (("walk", 8, 16, 4, 48), ("walk", 32, 1, 8)),
                                     (("walk", 8, 16, 4, 48), ("walk", 32, 1, 8, 2, 1)),
                                     (("walk", 8, 16, 4, 16), ("walk", 16, 1, 16, 4, 1)),
                                     (("walk", 8, 16, 4, 16), ("scan", 16, 4)),
                                     (("scan", 16, 16, 4), ("scan", 16, 4))],
                         ids=["walk_3_chunks", "walk_3_chunks,bwd_sub_2", "walk_1_chunk,bwd_6_chunks",
                              "bwd_lanes_sub_2_deferred", "bwd_sub_4_deferred", "walk,scan_bwd", "scan,scan_bwd"])
def test_mamba_kernel_variants(monkeypatch, fwd, bwd):
    """The variants the GPU tuning may pick, at T = 41, D = 20, N = 12 (two blocks of 16 channels, or one of 32).
    Walk forward in chunks of 16 tokens (pass 1's end states, the state passing, each chunk from its true start)
    or one chunk; walk backward in chunks of 16 or 8 tokens (the carries walked back from zero and chained from
    dht, each chunk walked back from its carry, its states recomputed from the forward's, saved every 8 tokens,
    SUB = 4 or 2 at a time, their stores after each step or after the SUB steps); the in-chunk associative scans,
    forward and backward."""
    from effattn.linear import selective_scan

    monkeypatch.setattr(selective_scan, "_configs", lambda *shape: [selective_scan.FwdConfig(*fwd)])
    monkeypatch.setattr(selective_scan, "_bwd_configs", lambda *shape: [selective_scan.BwdConfig(*bwd)])
    check_against_reference(mamba, mamba_reference, mamba_case(initial_state=True), {}, form="chunk")


def test_mamba_kernels_pinned_by_environment(monkeypatch):
    """EFFATTN_FLASH_CONFIGS pins the Mamba kernels as it pins the attention kernels (their configurations are
    NamedTuples with a kernel name): here the walks in time chunks, which the default candidates at T = 41 are
    not, so the chunk-chaining kernel must run."""
    from effattn.linear import selective_scan

    launches = []

    class CountedLaunches:  # kernel[grid](...) as before, counting the launches
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    real = selective_scan._pass_states
    monkeypatch.setattr(selective_scan, "_pass_states", CountedLaunches())
    monkeypatch.setattr(selective_scan, "_FWD_PLANS", {})  # no launch plan holding the kernel from before
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "mamba_fwd=walk,8,16,4,16;mamba_bwd=walk,16,1,16")
    check_against_reference(mamba, mamba_reference, mamba_case(initial_state=True), {}, form="chunk")
    assert len(launches) >= 2  # the forward's end states and the backward's carries


def test_mamba_forward_launch_plans_follow_the_inputs(monkeypatch):
    """The forward's launch plans (its kernels replayed through the compiled kernels on the GPU) are keyed on all
    that the kernels are specialised on: a call with new values of the same signature reuses the plan and still
    matches the reference; a missing dt_bias, another dtype or an input 2 bytes off 16-byte alignment gets its own.
    T a multiple of the 8-token blocks and N a power of 2: B and C go to the kernels unpadded (fp32: as given)."""
    from effattn.linear import selective_scan

    monkeypatch.setattr(selective_scan, "_configs", lambda *shape: [selective_scan.FwdConfig("walk", 8, 16, 4, 16)])
    monkeypatch.setattr(selective_scan, "_FWD_PLANS", {})
    plans = selective_scan._FWD_PLANS

    def run(seed, bias=True, dtype=torch.float32, offset=0, **shape):
        inp = mamba_case(seed=seed, **shape)
        for name in ("D", "z", "initial_state"):
            inp.pop(name, None)
        if not bias:
            inp.pop("dt_bias")
        ins = {n: t.to(dtype if n in ("x", "dt", "B", "C") else torch.float32) for n, t in inp.items()}
        if offset:  # x as a view starting `offset` elements into its storage
            x = ins["x"]
            ins["x"] = torch.empty(x.numel() + offset, dtype=x.dtype)[offset:].view_as(x).copy_(x)
        y, h = mamba(**ins, form="chunk", output_final_state=True)
        want, want_h = mamba_reference(**{n: t.double() for n, t in ins.items()}, output_final_state=True)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # y in bf16
        torch.testing.assert_close(y.double(), want, **tol)
        torch.testing.assert_close(h.double(), want_h, **tol)
        return len(plans)

    assert run(0) == 1
    assert run(1) == 1  # same signature, new values: the same plan
    assert run(2, bias=False) == 2
    assert run(3, dtype=torch.bfloat16) == 3
    assert run(4, dtype=torch.bfloat16, offset=1) == 4  # x 2 bytes past a 16-byte boundary
    assert run(5, T=48, N=16) == 5
    assert run(6, dtype=torch.bfloat16, T=48, N=16) == 6


@pytest.mark.parametrize("use_h0", [True, False])
def test_mamba_chunk_chain_over_several_groups(use_h0):
    """`_pass_states` (the scan over chunks that chains the walks) against the one-chunk-a-step recurrence
    h <- exp(A * sum of delta) h + end, in float64: 71 chunks (three groups of 32, the last partial) and
    D N = 20 x 12 = 240 elements (two programs of 128, the second partial); start poisoned with NaN."""
    from effattn.linear import selective_scan
    from effattn.linear.selective_walk import _pass_states

    gen = torch.Generator().manual_seed(3)
    B, NC, D, N = 2, 71, 20, 12
    A_t = -torch.rand(N, D, generator=gen) * 2  # [N, D] as the walks store it
    ends = torch.randn(B, NC - 1, N, D, generator=gen)
    sums = torch.rand(B, NC - 1, D, generator=gen) * 0.5
    h0 = torch.randn(B, N, D, generator=gen) if use_h0 else None
    start = torch.full((B, NC, N, D), float("nan"))
    _pass_states[(-(-D * N // selective_scan.PASS_BLOCK), B)](A_t, ends, sums, h0, start, D, N, NC,
                                                              **selective_scan.PASS_TILE, USE_H0=use_h0)
    h = h0.double() if use_h0 else torch.zeros(B, N, D, dtype=torch.float64)
    want = [h]
    for c in range(NC - 1):
        h = torch.exp(A_t.double() * sums[:, c, None, :].double()) * h + ends[:, c].double()
        want.append(h)
    torch.testing.assert_close(start.double(), torch.stack(want, 1), rtol=1e-5, atol=1e-5)


def test_mamba_pinned_backward_with_bad_sub_is_refused(monkeypatch):
    """A pinned walk backward recomputing 8 states at a time fails with the config named: the kernel holds 2 or 4,
    and 8 divides the forward's 8-token blocks, so only that check stops it (else its gradients would be wrong)."""
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", "mamba_fwd=walk,8,16,4,16;mamba_bwd=walk,16,1,16,8")
    inp = mamba_case(T=17)
    for name in ("x", "dt"):
        inp[name] = inp[name].float().requires_grad_(True)
    for name in ("A", "B", "C", "D", "dt_bias", "z"):
        inp[name] = inp[name].float()
    inp.pop("initial_state", None)
    y = mamba(**inp, form="chunk")
    with pytest.raises(ValueError, match=r"SUB=8[,)].*: SUB must be 2 or 4"):
        y.sum().backward()


@triton.jit
def _lane_sums_probe(X, OUT, BN: tl.constexpr):
    lane = tl.arange(0, 32)
    x = tl.load(X + tl.arange(0, BN)[:, None] * 32 + lane[None, :])
    tl.store(OUT + lane, _lane_sums(x, lane, BN, True))


@pytest.mark.parametrize("BN", [1, 4, 16, 32])
def test_mamba_lane_sums_give_each_lane_its_state(BN):
    """`_lane_sums` (the walk backward's dB, dC over 32 channels) on x `[BN, 32]`: lane l returns the sum over the
    32 columns of row l // (32 // BN), for every BN the launcher lets through (N <= 32); output poisoned."""
    x = torch.randn(BN, 32, generator=torch.Generator().manual_seed(BN))
    out = torch.full((32,), float("nan"))
    _lane_sums_probe[(1,)](x, out, BN=BN)
    torch.testing.assert_close(out, x.sum(1).repeat_interleave(32 // BN), rtol=1e-5, atol=1e-5)


@triton.jit
def _softplus_probe(raw, out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offs, _softplus(tl.load(raw + offs, mask=offs < n)), mask=offs < n)


def test_mamba_softplus_polynomial_matches_float64():
    """The walks' softplus (max(raw, 0) + e^-|raw| P(e^-|raw|), a fitted polynomial for log1p) against torch's in
    float64, over raw from -60 to 60 (deltas from 1e-26 up) and the threshold's neighbourhood: relative error below
    5e-7 from raw = -10 (deltas from 4.5e-5) up, below 4e-6 under it (there the float32 product raw log2(e) that
    feeds exp2 rounds by up to 4e-6 in the exponent; 1 + e^raw in float32, the form before, lost all digits of e^raw
    below 6e-8), and raw itself past 20; output poisoned, length not a multiple of the block."""
    raw = torch.cat([torch.linspace(-60, 60, 2001), torch.linspace(16, 24, 77), torch.tensor([0.0, -1e-3, 1e-3])])
    out = torch.full_like(raw, float("nan"))
    _softplus_probe[(triton.cdiv(raw.numel(), 256),)](raw, out, raw.numel(), BLOCK=256)
    ref = torch.nn.functional.softplus(raw.double())
    rel = (out.double() - ref).abs() / ref
    assert rel[raw >= -10].max() < 5e-7 and rel.max() < 4e-6, (rel[raw >= -10].max(), rel.max())
    assert torch.equal(out[raw > 20], raw[raw > 20])
