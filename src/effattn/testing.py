"""Checking a fast path against its float64 reference: the rule tests and `effattn check` share.

The rule (flash-attn's): for every output and every gradient,
    max|fast - ref64| <= 2 * max|baseline - ref64| + floor(dtype) * max(1, max|ref64|)
where ref64 is the method's reference run in float64 on the CPU and baseline is the same reference run
in the fast path's dtype on its device (plain PyTorch with the same rounding). Fast-path outputs are
allocated poisoned (NaN), so an element a kernel never writes fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from ._memory import poisoned_outputs
from .registry import Method, Shape

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass(frozen=True)
class Comparison:
    name: str  # "o", "out1", "dq", ...
    error: float  # max abs error of the fast path vs the float64 reference
    baseline_error: float  # same for plain PyTorch in the fast path's dtype
    allowed: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAIL"
        return f"{self.name}: err {self.error:.3g} <= allowed {self.allowed:.3g} (baseline {self.baseline_error:.3g}) {flag}"


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {tuple(x.shape)}, reference {tuple(ref.shape)}")
    diff = (x.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs()
    both_inf = torch.isinf(x.detach().cpu().double()) & (x.detach().cpu().double() == ref.detach().cpu().double())
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)  # -inf LSE of an empty row matches -inf
    if diff.numel() == 0:
        return 0.0
    return math.inf if bool(torch.isnan(diff).any()) else float(diff.max())


def compare(name: str, fast: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor, dtype) -> Comparison:
    finite_ref = ref64.detach().double()[torch.isfinite(ref64.detach().double())]
    scale = max(1.0, float(finite_ref.abs().max())) if finite_ref.numel() else 1.0
    base = max_abs_error(baseline, ref64)
    return Comparison(name, max_abs_error(fast, ref64), base, 2 * base + FLOOR[dtype] * scale)


def _flatten(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _prepare(inputs: dict, grad_names: Iterable[str], *, dtype=None, device=None) -> dict:
    """Detached copies of the tensor inputs (optionally cast: floating tensors only), with grads enabled."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            t = t.clone()
            if key in grad_names and t.is_floating_point():
                t.requires_grad_(True)
            value = t
        out[key] = value
    return out


def _forward(fn, inputs: dict, poison: bool = False) -> list[torch.Tensor]:
    with poisoned_outputs(poison):
        return _flatten(fn(**inputs))


def _backward(outs: list[torch.Tensor], grad_outs: list, wrt: list[torch.Tensor],
              poison: bool = False) -> list[torch.Tensor]:
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    loss = sum((o.to(acc) * g.to(device=o.device, dtype=acc)).sum() for o, g in pairs)
    with poisoned_outputs(poison):
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def check_method(method: Method, *, form: str | None = None, shape: Shape = Shape(),
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                 backward: bool | None = None, **input_options) -> list[Comparison]:
    """Run `method` (one of its forms) on fresh random inputs and compare with its float64 reference:
    every output, and with `backward` (default: if the method trains) the gradient of every input in
    `method.grad_inputs` under a random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    inputs = method.make_inputs(shape, dtype, device, gen, **input_options)
    backward = method.trains if backward is None else backward
    grad_names = [n for n in method.grad_inputs
                  if backward and isinstance(inputs.get(n), torch.Tensor) and inputs[n].is_floating_point()]
    ref_in = _prepare(inputs, grad_names, dtype=torch.float64, device="cpu")
    base_in = _prepare(inputs, grad_names)
    fast_in = _prepare(inputs, grad_names)
    if form is not None and form != "default":
        fast_in["form"] = form
    ref_out = _forward(method.reference, ref_in)
    base_out = _forward(method.reference, base_in)
    fast_out = _forward(method.fn, fast_in, poison=True)
    if len(fast_out) != len(ref_out):
        raise AssertionError(f"{method.name}: fast path returned {len(fast_out)} outputs, reference {len(ref_out)}")
    results = [compare("o" if i == 0 else f"out{i}", f, b, r, dtype)
               for i, (f, b, r) in enumerate(zip(fast_out, base_out, ref_out))]
    if grad_names:
        grad_outs = [torch.randn(r.shape, generator=gen, dtype=torch.float64) if r.requires_grad else None
                     for r in ref_out]
        grads = [_backward(outs, grad_outs, [ins[n] for n in grad_names], poison)
                 for outs, ins, poison in ((ref_out, ref_in, False), (base_out, base_in, False),
                                           (fast_out, fast_in, True))]
        results += [compare(f"d{n}", f, b, r, dtype) for n, r, b, f in zip(grad_names, *grads)]
    return results


def assert_matches_reference(method: Method, **kwargs) -> list[Comparison]:
    """`check_method`, raising AssertionError that lists every comparison when one fails."""
    results = check_method(method, **kwargs)
    if not all(r.ok for r in results):
        detail = "\n  ".join(str(r) for r in results)
        raise AssertionError(f"{method.name} {kwargs} does not match its reference:\n  {detail}")
    return results


def odd_shapes() -> list[Shape]:
    """Shapes that are not multiples of typical block sizes, with GQA and T != S where methods allow."""
    base = Shape(batch=2, seq_q=37, heads=4, kv_heads=2, head_dim=32)
    return [base, replace(base, batch=1, seq_q=19, seq_k=45, kv_heads=1)]
