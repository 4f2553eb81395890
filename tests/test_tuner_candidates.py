"""Every tuner candidate of every kernel, not only the first: on the GPU `pick_config` launches them all while
timing, but under the interpreter it takes the first, so a candidate that reads or writes out of bounds (a
smaller BV, a split BK, another scan variant) would first show up as an illegal address on the GPU. Here each
launch goes through every candidate, under the suite's bounds checker, and the result must still match."""
import os

import pytest
import torch
import torch.nn.functional as F

import effattn
from effattn import _triton_mode
from effattn.hardware import flash_bwd, flash_fwd, quant_fwd
from effattn.linear import engine, mamba, selective_scan

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter-only sweep")


@pytest.fixture
def every_candidate(monkeypatch):
    tried = {}

    def pick(key, configs, launch):
        for cfg in configs:
            launch(cfg)
        tried[key[0]] = len(configs)
        return configs[0]

    for module in (engine, selective_scan, flash_fwd, flash_bwd, quant_fwd):
        monkeypatch.setattr(module, "pick_config", pick)
    for module in (flash_fwd, flash_bwd, quant_fwd):  # no launch plan cached by an earlier test may skip the tuner
        monkeypatch.setattr(module, "_PLANS", {})
    # the attention launchers list small tiles for the interpreter: give them the GPU's candidate lists instead
    for module, name in ((flash_fwd, "fwd_configs"), (flash_bwd, "bwd_configs"), (quant_fwd, "quant_configs")):
        monkeypatch.setattr(module, name, _as_on_gpu(module, getattr(module, name)))
    return tried


def _as_on_gpu(module, configs_fn):
    def gpu_list(*args, **kwargs):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_triton_mode, "interpreting", lambda: False)
            if hasattr(module, "interpreting"):
                m.setattr(module, "interpreting", lambda: False)
            return configs_fn(*args, **kwargs)
    return gpu_list


@pytest.mark.parametrize("gate,delta", [(None, True), ("scalar", True), ("vector", False)],
                         ids=["delta", "gated_delta", "vector"])
def test_linear_engine_candidates(every_candidate, gate, delta):
    """K = 80 > 64 (the state kernels' split-K candidates), V = 128 (every BV), T = 70 (a short last chunk)."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 70, 1, 80, 128
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = None if gate is None else F.logsigmoid(torch.randn(B, T, H, *((K,) if gate == "vector" else ()), generator=gen))
    beta = torch.rand(B, T, H, generator=gen) if delta else None
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta) if t is not None]
    o, ht = engine.chunk_gated_linear_attn(q, k, v, g, beta, output_final_state=True, delta_rule=delta)
    (o.square().sum() + ht.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert every_candidate["state_fwd"] > 1 and every_candidate["state_bwd"] > 1


def test_selective_scan_candidates(every_candidate):
    from effattn.registry import REGISTRY, Shape

    x = REGISTRY.get("mamba").make_inputs(Shape(batch=1, seq_q=37, heads=2, head_dim=16), torch.float32, "cpu",
                                          torch.Generator().manual_seed(0))
    leaves = {n: t.requires_grad_() for n, t in x.items() if torch.is_tensor(t) and t.is_floating_point()}
    out = mamba(**x, form="chunk")
    o = out[0] if isinstance(out, tuple) else out
    o.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values() if t.grad is not None)
    assert every_candidate["mamba_fwd"] > 1 and every_candidate["mamba_bwd"] > 1


@pytest.mark.parametrize("causal,window,D", [(False, None, 64), (True, (7, 0), 64), (True, None, 128)],
                         ids=["dense", "causal_window", "causal_d128"])
def test_flash_candidates(every_candidate, causal, window, D):
    """T=29 != S=41, GQA 4/2, bf16: every forward and dK/dV, dQ candidate the H100 tunes over at D (tiles of
    up to 128 x 128, TMA descriptors), in the interpreter."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 29, 4, D, generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 41, 2, D, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    o = effattn.flash_attention(q, k, v, causal=causal, window=window)
    o.square().sum().backward()
    ref = effattn.reference.softmax_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                              causal=causal, window=window)
    torch.testing.assert_close(o.detach().double(), ref, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert every_candidate["fwd"] == len(flash_fwd.fwd_configs(D, torch.bfloat16, None)) > 1  # TMA ones included


@pytest.mark.parametrize("pv_dtype", ["fp16", "fp8"])
def test_quantized_candidates(every_candidate, pv_dtype):
    """sage_attention's INT8 QK^T kernel with fp16 or FP8 PV, every H100 candidate tile, T=29, S=41, D=64."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 29, 4, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 41, 4, 64, generator=gen).bfloat16() for _ in range(2))
    o = effattn.sage_attention(q, k, v, pv_dtype=pv_dtype)
    ref = effattn.reference.softmax_attention(q.double(), k.double(), v.double())
    assert ((o.double() - ref).abs().mean() / ref.abs().mean()).item() < 0.06
    assert max(every_candidate.values()) > 1


def test_block_sparse_flash_candidates(every_candidate):
    """The block-sparse forward's candidates (4 and 8 warps, pointer and TMA loads of listed KV blocks, and
    programs of half a mask block's rows) and its backward's, on a mask with full, partial (bitmask) and
    skipped tiles; T=45 != S=70, 32 x 32 blocks."""
    from effattn.sparse import block_mask

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 45, 2, 64, generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 70, 2, 64, generator=gen).bfloat16().requires_grad_() for _ in range(2))

    def mask(b, h, i, j):  # a causal window of 20 keys, plus key 3 for every query (bottom-right: i + 25)
        return ((j <= i + 25) & (j > i + 5)) | (j == 3)

    bm = block_mask(mask, 1, 1, 45, 70, block=(32, 32))
    assert 0 < bm.density() < 1 and int(bm.kv_num.sum()) > 0
    o = effattn.flash_attention(q, k, v, block_mask=bm)
    o.square().sum().backward()
    ref = effattn.reference.softmax_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                              mask=mask)
    torch.testing.assert_close(o.detach().double(), ref, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert every_candidate["fwd"] == 6


def test_untuned_pick_takes_the_first_candidate_that_fits(monkeypatch):
    """EFFATTN_FLASH_TUNE=0 (the quality harness's default) skips timing but not the resource check: with
    float32 inputs at Dk = Dv = 128 the engine's first dq/dk candidates need more shared memory than Hopper has."""
    import triton

    from effattn.hardware import _flash_common

    monkeypatch.setattr(_flash_common, "interpreting", lambda: False)
    monkeypatch.setattr(_flash_common, "_BEST", {})
    monkeypatch.setenv("EFFATTN_FLASH_TUNE", "0")
    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg == "wide":
            raise triton.runtime.errors.OutOfResources(245760, 232448, "shared memory")

    pick = _flash_common.pick_config
    assert pick(("kind", 1), ["wide", "narrow", "other"], launch) == "narrow" and tried == ["wide", "narrow"]
    assert pick(("kind", 1), ["wide", "narrow", "other"], launch) == "narrow" and len(tried) == 2  # cached
    with pytest.raises(RuntimeError, match=r"no kernel configuration could run for \('kind', 2\)"):
        pick(("kind", 2), ["wide", "wide"], launch)
    # compile mode (bench's compile-ahead workers): every candidate launched once, the first that fits kept
    monkeypatch.setenv("EFFATTN_FLASH_TUNE", "compile")
    tried.clear()
    assert pick(("kind", 1), ["wide", "narrow", "other"], launch) == "narrow"
    assert tried == ["wide", "narrow", "other"]


def test_window_tuning_key_follows_the_span():
    """A sliding window's flash programs are as short as its span: its tuning key carries the span, bucketed
    like sequence lengths, so a 1024-key window at N = 16k does not reuse causal 16k's tiles (2026-12-06)."""
    from effattn.hardware._flash_common import NO_LIMIT, seqlen_bucket, window_bucket

    assert window_bucket(None, NO_LIMIT, 0, 16384) is None  # plain causal: the sequence-length key alone
    assert window_bucket((1023, 0), 1023, 0, 16384) == 1024
    assert window_bucket((100, 20), 100, 20, 16384) == 128
    assert window_bucket((NO_LIMIT, 0), NO_LIMIT, 0, 4096) == seqlen_bucket(4096)  # wider than the keys
