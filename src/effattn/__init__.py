"""effattn: efficient attention methods of the survey by Zhang et al. (2025), one API for all four classes.

    import effattn
    o = effattn.attention(q, k, v, method="gqa", causal=True)   # q [B, T, H, D], k/v [B, S, Hkv, D]
    effattn.methods()                                            # the registry, see `effattn list`
"""
from . import _triton_mode

_triton_mode.configure()  # before any kernel module is imported: Triton reads it at decoration time

from . import compact, hardware, linear, nn, reference, sparse  # noqa: E402  (registers their methods)
from . import kvcache  # noqa: E402
from .hardware import decode, flash_attention, flash_fp8, sage_attention  # noqa: E402
from .api import attention  # noqa: E402
from . import distributed  # noqa: E402  (context parallelism; after api, which it wraps)
from .registry import REGISTRY, Method, methods  # noqa: E402

__all__ = ["attention", "flash_attention", "sage_attention", "flash_fp8", "decode", "methods", "Method", "REGISTRY", "reference", "hardware",
           "compact", "sparse", "linear", "nn", "kvcache", "distributed"]
__version__ = "0.1.0"
