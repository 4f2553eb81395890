"""Where Triton kernels can run.

Triton decides at decoration time (module import) whether kernels are compiled for a GPU or run by its
CPU interpreter (`TRITON_INTERPRET=1`). On a machine with no CUDA device the interpreter is the only way
to run them, so `effattn` turns it on before importing any kernel, unless the user set the variable.
"""
from __future__ import annotations

import os

import torch


def configure() -> None:
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_triton(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors through the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def require_triton(name: str, t: torch.Tensor) -> None:
    if not can_run_triton(t):
        raise ValueError(
            f"{name} runs Triton kernels: it needs CUDA tensors (got device {t.device}); on a CPU-only "
            f"machine set TRITON_INTERPRET=1 before importing effattn to use Triton's interpreter"
        )
