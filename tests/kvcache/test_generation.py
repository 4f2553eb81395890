"""End to end: greedy generation with every cache type on a small random decoder."""
import pytest
import torch

from effattn.kvcache.generation import TinyConfig, TinyDecoder, compare_with_exact, generate

CFG = TinyConfig(vocab=61, dim=32, layers=1, heads=2, kv_heads=1, head_dim=16, mlp=64)


@pytest.fixture(scope="module")
def setup():
    model = TinyDecoder(CFG, seed=1)
    prompt = torch.randint(0, CFG.vocab, (2, 14), generator=torch.Generator().manual_seed(0))
    return model, prompt


def test_paged_equals_contiguous_token_for_token(setup):
    model, prompt = setup
    exact, exact_logits = generate(model, prompt, 5, kind=None)
    cont, cont_logits = generate(model, prompt, 5, "contiguous")
    paged, paged_logits = generate(model, prompt, 5, "paged")
    assert torch.equal(paged, cont) and torch.equal(cont, exact)
    assert torch.allclose(paged_logits, cont_logits, atol=1e-5)
    assert torch.allclose(cont_logits, exact_logits, atol=1e-4)


def test_lossy_caches_report_divergence(setup):
    model, prompt = setup
    prompt = prompt[:1]  # one sequence keeps the interpreter's work small
    kinds = ("kivi2", "kivi4", "kvquant", "int8", "streaming_llm", "h2o")
    r = compare_with_exact(model, prompt, 4, kinds=kinds, budget=10)
    for kind in kinds:
        assert 0 <= r[kind]["token_agreement"] <= 1 and 0 <= r[kind]["top1_agreement"] <= 1
        assert r[kind]["max_logit_error"] > 0, kind  # lossy: they must differ from exact decoding
        assert r[kind]["tokens"].shape == (1, 4)
    assert r["int8"]["max_logit_error"] < r["kivi4"]["max_logit_error"] < r["kivi2"]["max_logit_error"]
    assert r["kvquant"]["max_logit_error"] < r["kivi2"]["max_logit_error"]
    # an eviction budget that covers the whole sequence evicts nothing: exact again
    full = compare_with_exact(model, prompt, 4, kinds=("streaming_llm",), budget=32)
    assert full["streaming_llm"]["max_logit_error"] < 1e-4 and full["streaming_llm"]["token_agreement"] == 1.0


def test_make_caches_rejects_unknown_kind(setup):
    model, prompt = setup
    with pytest.raises(ValueError, match="kind must be one of"):
        generate(model, prompt, 2, "zip")
