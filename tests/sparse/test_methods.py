"""Every sparse method, fwd + bwd, against its float64 reference (fp32 odd shapes, one bf16 case)."""
import pytest
import torch

from effattn.registry import REGISTRY
from effattn.testing import assert_matches_reference, odd_shapes

SPARSE = [m.name for m in REGISTRY if m.family == "sparse"]


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("shape", odd_shapes(), ids=lambda s: f"T{s.seq_q}S{s.S}")
def test_fp32(name, shape):
    assert_matches_reference(REGISTRY.get(name), shape=shape, seed=11)


@pytest.mark.parametrize("name", SPARSE)
def test_bf16(name):
    assert_matches_reference(REGISTRY.get(name), shape=odd_shapes()[0], dtype=torch.bfloat16, seed=5)
