"""Every validation error of the compact functions, layers and cache names the argument and what it expects."""
import pytest
import torch

import effattn
from effattn.compact import (MFA, MLA, TPA, GroupedAttention, LayerCache, build_layer)
from effattn.compact.formulas import MLADims, TPADims
from effattn.registry import REGISTRY, Shape


def _inputs(name, **overrides):
    out = REGISTRY.get(name).make_inputs(Shape(batch=1, seq_q=5, heads=2, head_dim=8), torch.float32, "cpu",
                                         torch.Generator().manual_seed(0))
    out.update(overrides)
    return out


def test_registered_functions_run_through_the_public_api():
    for name in ("mla", "mfa", "tpa"):
        inputs = _inputs(name)
        q, k, v = list(inputs.values())[:3]
        options = {key: val for key, val in list(inputs.items())[3:]}
        expected = REGISTRY.get(name).fn(**inputs)
        torch.testing.assert_close(effattn.attention(q, k, v, method=name, **options), expected)


@pytest.mark.parametrize("name,key,value,err,match", [
    ("mla", "c_kv", torch.zeros(1, 5, 3), ValueError, "w_uk .* need r_kv=3"),
    ("mla", "k_rope", torch.zeros(1, 4, 4), ValueError, "must share B=1 and S"),
    ("mla", "q", torch.zeros(1, 5, 2, 9), ValueError, "head dim d_N \\+ d_R = 8 \\+ 4"),
    ("mla", "w_uk", torch.zeros(32, 2), ValueError, "w_uk must have 3 dimensions"),
    ("mla", "w_uv", None, TypeError, "needs the up-projections"),
    ("mla", "form", "folded", ValueError, "form must be one of"),
    ("mla", "scale", -1.0, ValueError, "scale must be a positive number"),
    ("mla", "c_kv", torch.zeros(1, 5, 32, dtype=torch.float64), TypeError, "same dtype"),
    ("mfa", "q", torch.zeros(1, 5, 7), ValueError, "w_uq must be \\[d_c=7"),
    ("mfa", "v", torch.zeros(1, 4, 8), ValueError, "must share B and S"),
    ("mfa", "k", [1.0], TypeError, "k must be a torch.Tensor"),
    ("mfa", "w_uq", None, TypeError, "needs the query up-projection"),
    ("mfa", "rope_base", -3, ValueError, "rope_base must be None"),
    ("tpa", "a_k", torch.zeros(1, 5, 2, 3), ValueError, "a_k must have shape"),
    ("tpa", "b_v", torch.zeros(1, 5, 3, 8), ValueError, "b_v must have shape"),
    ("tpa", "b_k", torch.zeros(1, 5, 8), ValueError, "b_k must have 4 dimensions"),
    ("tpa", "a_v", None, TypeError, "needs the value factors"),
])
def test_functional_errors(name, key, value, err, match):
    inputs = _inputs(name, **{key: value})
    with pytest.raises(err, match=match):
        REGISTRY.get(name).fn(**inputs)


def test_layer_and_cache_errors():
    layer = GroupedAttention(16, 4, 2, 4)
    with pytest.raises(ValueError, match="x must have last dim d_model=16"):
        layer(torch.zeros(1, 3, 12))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        layer(torch.zeros(3, 16))
    with pytest.raises(ValueError, match="heads=4 must be a multiple of kv_heads=3"):
        GroupedAttention(16, 4, 3, 4)
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        layer(torch.zeros(1, 3, 16), cache={})
    with pytest.raises(ValueError, match="this layer needs"):
        layer(torch.zeros(1, 3, 16), cache=MFA(16, 4, 4).new_cache(1, 4))
    cache = layer.new_cache(batch=1, capacity=4)
    with pytest.raises(ValueError, match="cache overflow: holds 0 of 4 tokens, cannot append 5"):
        layer(torch.zeros(1, 5, 16), cache)
    with pytest.raises(ValueError, match="needs exactly the fields"):
        cache.append(k=torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="v must have shape \\[B=1, T, 2, 4\\]"):
        cache.append(k=torch.zeros(1, 1, 2, 4), v=torch.zeros(2, 1, 2, 4))
    with pytest.raises(ValueError, match="same number of tokens"):
        cache.append(k=torch.zeros(1, 1, 2, 4), v=torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        LayerCache({"k": (2,)}, batch=1, capacity=0)
    with pytest.raises(ValueError, match="dims.kv_rank must be >= 1"):
        MLA(16, 2, MLADims(8, 0, 4, 2, 4))
    with pytest.raises(ValueError, match="dims.d_rope must be even"):
        MLA(16, 2, MLADims(8, 6, 4, 3, 4))
    with pytest.raises(ValueError, match="form must be one of"):
        MLA(16, 2, MLADims(8, 6, 4, 2, 4))(torch.zeros(1, 2, 16), form="naive")
    with pytest.raises(TypeError, match="dims.v_rank must be an int"):
        TPA(16, 2, 4, TPADims(2, 2, 1.5))
    kernel = GroupedAttention(16, 4, 2, 4, decode_kernel=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="the decode kernel supports dtypes"):
        kernel(torch.zeros(1, 2, 16, dtype=torch.float64), kernel.new_cache(1, 4))
    with pytest.raises(ValueError, match="unknown method 'flashy'"):
        GroupedAttention(16, 4, 2, 4, core="flashy")
    with pytest.raises(ValueError, match="name must be one of"):
        build_layer("mha2", Shape(), 64)
