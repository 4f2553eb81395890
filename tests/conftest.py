import os

# Triton kernels run through the interpreter on CPU; must be set before effattn (and triton) import.
if os.environ.get("EFFATTN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # every kernel launch in the suite is bounds-checked: an access the GPU would fault on fails the test
    import sys  # noqa: E402

    sys.path.insert(0, os.path.dirname(__file__))
    from _bounds import install  # noqa: E402

    install()


@pytest.fixture
def device() -> str:
    return os.environ.get("EFFATTN_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
