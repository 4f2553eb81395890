"""Pieces of a cell: FLOP counts from the registry, accuracy metrics, key lengths, anchor detection."""
import pytest
import torch

import effattn
from effattn.bench import anchors as anchors_mod
from effattn.bench.cells import accuracy, key_length, nominal_flops, pair_count
from effattn.registry import Shape


def test_pair_counts():
    assert pair_count(8, 8, False) == 64 and pair_count(8, 8, True) == 32  # ANCHORS.md: half when causal
    assert pair_count(1, 100, True) == 100  # one decode token sees the whole cache (bottom-right)
    assert pair_count(3, 5, True) == 3 + 4 + 5  # query i sees keys up to i + S - T


def test_nominal_flops_follow_family_and_state():
    shape = Shape(batch=2, seq_q=8, heads=4, head_dim=16)
    g = torch.Generator().manual_seed(0)
    std = effattn.REGISTRY.get("standard")
    inp = std.make_inputs(shape, torch.float32, "cpu", g)
    tokens = shape.batch * shape.seq_q
    assert nominal_flops(std, shape, inp, "fwd", True, tokens) == 2 * 2 * 4 * 32 * (16 + 16)
    assert nominal_flops(std, shape, inp, "fwdbwd", True, tokens) == 3.5 * 2 * 2 * 4 * 32 * 32
    assert nominal_flops(std, shape, dict(inp, window=4), "fwd", True, tokens) is None  # visited pairs unknown
    lin = effattn.REGISTRY.get("linear_transformer")
    inp = lin.make_inputs(shape, torch.float32, "cpu", g)
    assert nominal_flops(lin, shape, inp, "fwd", True, tokens) == 4 * 2 * 8 * lin.state_or_cache.elements(shape)
    mamba2 = effattn.REGISTRY.get("mamba2")  # inputs x, B, C...: FLOPs come from the state size alone
    inp = mamba2.make_inputs(shape, torch.float32, "cpu", g)
    assert "q" not in inp
    assert nominal_flops(mamba2, shape, inp, "fwd", True, tokens) == 4 * tokens * mamba2.state_or_cache.elements(shape)


def test_accuracy_metrics():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    assert accuracy(x, x) == {"rel_l2": 0.0, "cosine": pytest.approx(1.0)}
    assert accuracy(2 * x, x)["rel_l2"] == pytest.approx(1.0)
    assert accuracy(-x, x)["cosine"] == pytest.approx(-1.0)


def test_key_length_of_latent_caches():
    q = torch.zeros(1, 1, 2, 8)
    assert key_length({"q": q, "k": torch.zeros(1, 9, 2, 8)}, 32, 1) == 9
    assert key_length({"q": q, "c_kv": torch.zeros(1, 32, 16), "w": torch.zeros(16, 2, 8)}, 32, 1) == 32
    assert key_length({"q": q, "state": torch.zeros(1, 2, 8, 8)}, 32, 1) == 1


def test_anchor_detection_reports_why(monkeypatch):
    from effattn.bench.config import BenchConfig

    def broken(d):
        raise RuntimeError("no kernel for this head dim")

    extra = anchors_mod.Anchor("broken", "softmax", broken, probe=True)
    monkeypatch.setattr(anchors_mod, "ANCHORS", anchors_mod.ANCHORS + [extra])
    status = anchors_mod.detect(BenchConfig(heads=1, head_dim=16))
    assert status["sdpa_math"] == "available" and status["flash_attn"] == "unavailable: needs CUDA"
    assert status["broken"] == "unavailable: RuntimeError: no kernel for this head dim"
    chosen, status = anchors_mod.select("sdpa_math,broken", BenchConfig(heads=1, head_dim=16))
    assert [a.name for a in chosen] == ["sdpa_math"] and set(status) == {"sdpa_math", "broken"}
    assert anchors_mod.select("none", BenchConfig()) == ([], {})


def test_test_sized_chunks_stay_out_of_benchmark_sizes():
    """Records draw 16-token chunks at test sizes (several chunks at T = 37) and leave the method's own chunk size
    at benchmark sizes: the H100 bench of 2026-12-07 had timed every chunked linear method at chunk_size 16."""
    from effattn.inputs import SMALL

    chunked = [m for m in (effattn.REGISTRY.get(n) for n in effattn.REGISTRY.names())
               if m.family == "linear" and "chunk_size" in m.options]
    test_sized = []
    for m in chunked:
        gen = torch.Generator().manual_seed(0)
        small = m.make_inputs(Shape(batch=1, seq_q=37, heads=2, head_dim=16), torch.float32, "cpu", gen)
        large = m.make_inputs(Shape(batch=1, seq_q=SMALL, heads=1, head_dim=16), torch.float32, "cpu", gen)
        assert small.get("chunk_size") in (None, 16) and "chunk_size" not in large, m.name
        test_sized += [m.name] if small.get("chunk_size") == 16 else []
    assert len(test_sized) >= 14 and {"gla", "mlstm", "rwkv7", "mamba2"} <= set(test_sized)
