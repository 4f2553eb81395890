"""The interpreter's bounds checker (tests/_bounds.py, installed for the whole suite by conftest) catches a
kernel that reads or writes past its tensors, and lets masked-off lanes point anywhere."""
import os

import pytest
import torch
import triton
import triton.language as tl

from _bounds import OutOfBounds


@triton.jit
def _copy(x, y, n, extra, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    i = tl.arange(0, BLOCK)
    live = i < n + extra
    if MASKED:
        tl.store(y + i, tl.load(x + i, mask=live, other=0.0), mask=live)
    else:
        tl.store(y + i, tl.load(x + i))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks Triton's CPU interpreter")
def test_bounds_checker_flags_out_of_bounds_and_spares_masked_lanes():
    x, y = torch.randn(10), torch.zeros(10)
    _copy[(1,)](x, y, 10, 0, BLOCK=16, MASKED=True)  # lanes 10..15 point past x and y but are masked off
    torch.testing.assert_close(y, x)
    with pytest.raises(Exception, match="OutOfBounds"):
        _copy[(1,)](x, y, 10, 1, BLOCK=16, MASKED=True)  # one live lane past the end
    with pytest.raises(Exception, match="OutOfBounds"):
        _copy[(1,)](x, y, 10, 0, BLOCK=16, MASKED=False)
    assert issubclass(OutOfBounds, AssertionError)
