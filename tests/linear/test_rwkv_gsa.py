"""RWKV-4/5/7 and gated slot attention: every form vs its float64 reference (outputs, final states, gradients
of every input) at lengths off the chunk size, decode steps == chunk form token by token, bf16 at T = 4096
stays finite, argument errors."""
import pytest
import torch
import torch.nn.functional as F

from effattn.linear.rwkv7 import rwkv7, rwkv7_reference

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


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("strong,state", [(False, True), (True, False)])
def test_rwkv7_matches_reference(form, strong, state):
    check_against_reference(rwkv7, rwkv7_reference, rwkv7_case(strong=strong, state=state), {"scale": 0.5},
                            form=form, chunk_size=8)


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
