"""The fused elu+1 Triton kernel (run by Triton's interpreter on CPU) against PyTorch."""
import pytest
import torch

from effattn._memory import poisoned_outputs
from effattn.linear.feature_maps import _EluPlusOne, elu_plus_one_reference


@pytest.mark.parametrize("shape", [(3, 1000, 7), (2049,), (1, 5, 2, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elu_plus_one_kernel(shape, dtype, device):
    x = (torch.randn(shape) * 3).to(device=device, dtype=dtype).requires_grad_()
    with poisoned_outputs():
        y = _EluPlusOne.apply(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().cpu().requires_grad_()
    y64 = elu_plus_one_reference(x64)
    (g64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(y.double().cpu(), y64, rtol=tol, atol=tol)
    assert torch.allclose(gx.double().cpu(), g64, rtol=tol, atol=tol)
    assert (y > 0).all()
