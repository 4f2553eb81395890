"""Anchors: what users would otherwise call, measured beside the methods on the same inputs in the same run.

Each anchor is detected when it can run here (importable, right device, a tiny call succeeds) and
recorded as unavailable with the reason otherwise. Softmax anchors (SDPA per backend, compiled
FlexAttention with the same causal mask, flash-attn, SageAttention) take the causal softmax inputs every
method of that shape gets; linear anchors (FLA's chunk kernels) take the gated-recurrence inputs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..inputs import linear_inputs, softmax_inputs
from ..registry import Shape
from .cells import Prepared, Skip, cell_shape, softmax_flops, with_grads
from .config import BenchConfig, Cell


@dataclass(frozen=True)
class Anchor:
    name: str
    group: str  # "softmax" or "linear"
    run: Callable[[dict], object]  # inputs dict -> outputs
    cuda_only: bool = False
    module: str | None = None  # importable module it needs
    trains: bool = True
    decodes: bool = True
    approximates_softmax: bool = False
    inputs: dict | None = None  # linear_inputs options (linear anchors)
    description: str = ""
    probe: bool = False  # detect by a tiny call (cheap SDPA backends); others compile for minutes at first call


def _sdpa(backend_name: str) -> Callable[[dict], object]:
    def run(d):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (x.transpose(1, 2) for x in (d["q"], d["k"], d["v"]))
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=d["causal"], enable_gqa=k.shape[1] != q.shape[1])
        return o.transpose(1, 2)
    return run


_FLEX_CACHE: dict = {}


def _flex(d):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (x.transpose(1, 2) for x in (d["q"], d["k"], d["v"]))
    T, S = q.shape[2], k.shape[2]
    key = (T, S, d["causal"], str(q.device))
    if key not in _FLEX_CACHE:  # block mask and compiled kernel built once per shape, outside the timing
        def causal(b, h, q_idx, kv_idx):
            return q_idx + (S - T) >= kv_idx
        mask = create_block_mask(causal, None, None, T, S, device=q.device) if d["causal"] else None
        _FLEX_CACHE[key] = (torch.compile(flex_attention, dynamic=False), mask)
    fn, mask = _FLEX_CACHE[key]
    return fn(q, k, v, block_mask=mask).transpose(1, 2)


def _flash_attn(d):
    import flash_attn

    return flash_attn.flash_attn_func(d["q"], d["k"], d["v"], causal=d["causal"])


def _sage(d):
    import sageattention

    return sageattention.sageattn(d["q"], d["k"], d["v"], tensor_layout="NHD", is_causal=d["causal"])


def _fla(module: str, fn_name: str, args: tuple[str, ...]) -> Callable[[dict], object]:
    def run(d):
        fn = getattr(importlib.import_module(module), fn_name)
        return fn(*(d[a] for a in args))[0]
    return run


ANCHORS = [
    Anchor("sdpa_math", "softmax", _sdpa("MATH"), probe=True, description="PyTorch SDPA, math backend"),
    Anchor("sdpa_flash", "softmax", _sdpa("FLASH_ATTENTION"), probe=True,
           description="PyTorch SDPA, FlashAttention-2 backend"),
    Anchor("sdpa_efficient", "softmax", _sdpa("EFFICIENT_ATTENTION"), cuda_only=True, probe=True,
           description="PyTorch SDPA, memory-efficient backend"),
    Anchor("sdpa_cudnn", "softmax", _sdpa("CUDNN_ATTENTION"), cuda_only=True, probe=True,
           description="PyTorch SDPA, cuDNN backend"),
    Anchor("flex", "softmax", _flex, cuda_only=True, decodes=False,
           description="torch.compile(flex_attention) with the same causal block mask"),
    Anchor("flash_attn", "softmax", _flash_attn, cuda_only=True, module="flash_attn",
           description="flash-attn flash_attn_func"),
    Anchor("sageattention", "softmax", _sage, cuda_only=True, module="sageattention", trains=False,
           approximates_softmax=True, description="SageAttention sageattn (INT8 QK), forward only"),
    Anchor("fla_simple_gla", "linear", _fla("fla.ops.simple_gla", "chunk_simple_gla", ("q", "k", "v", "g")),
           cuda_only=True, module="fla", decodes=False, inputs={"gate": "scalar"},
           description="FLA chunk_simple_gla (scalar gate)"),
    Anchor("fla_gla", "linear", _fla("fla.ops.gla", "chunk_gla", ("q", "k", "v", "g")), cuda_only=True,
           module="fla", decodes=False, inputs={"gate": "vector"}, description="FLA chunk_gla (vector gate)"),
    Anchor("fla_gated_delta_rule", "linear",
           _fla("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", ("q", "k", "v", "g", "beta")),
           cuda_only=True, module="fla", decodes=False, inputs={"gate": "scalar", "beta": True, "normalize_qk": True},
           description="FLA chunk_gated_delta_rule"),
]


def anchor_inputs(anchor: Anchor, shape, cfg: BenchConfig, generator, causal: bool = True) -> dict:
    if anchor.group == "linear":
        return linear_inputs(shape, cfg.torch_dtype, cfg.device, generator, initial_state=False,
                             **(anchor.inputs or {}))
    # bottom-right causal with one query token sees the whole cache: no mask at all
    return softmax_inputs(shape, cfg.torch_dtype, cfg.device, generator, causal=causal and shape.seq_q > 1)


def detect(cfg: BenchConfig, names=None) -> dict[str, str]:
    """anchor name -> "available" or "unavailable: <why>", for `names` (default: all) on cfg's device.
    SDPA backends are probed with a tiny call (availability depends on dtype and head dim); the others are
    checked by import only, since their first call compiles for up to minutes (a failing call is then
    recorded in its cells)."""
    status = {}
    for a in ANCHORS:
        if names is not None and a.name not in names:
            continue
        if a.cuda_only and cfg.device != "cuda":
            status[a.name] = "unavailable: needs CUDA"
            continue
        try:
            if a.module:
                importlib.import_module(a.module)
            if a.name == "flex":
                from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            if a.probe:
                tiny = Shape(batch=1, seq_q=16, heads=cfg.heads, head_dim=cfg.head_dim)
                a.run(anchor_inputs(a, tiny, cfg, torch.Generator().manual_seed(0)))
            status[a.name] = "available"
        except Exception as exc:  # any failure means "cannot be used here"; the reason is reported
            status[a.name] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return status


def select(spec: str, cfg: BenchConfig) -> tuple[list[Anchor], dict[str, str]]:
    """Anchors to measure for `--anchors auto|none|a,b,...` and the detection status of each."""
    if spec == "none":
        return [], {}
    names = None
    if spec != "auto":
        names = [s.strip() for s in spec.split(",") if s.strip()]
        known = {a.name for a in ANCHORS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--anchors: unknown anchor(s) {unknown}; known: {sorted(known)}, or auto / none")
    status = detect(cfg, names)
    return [a for a in ANCHORS if status.get(a.name) == "available"], status


def prepare_anchor(anchor: Anchor, cell: Cell, cfg: BenchConfig, generator: torch.Generator) -> Prepared:
    if cell.mode == "fwdbwd" and not anchor.trains:
        raise Skip("no backward")
    if cell.mode == "decode" and not anchor.decodes:
        raise Skip("no decode path measured")
    shape = cell_shape(cfg, cell.mode, cell.n)
    inputs = anchor_inputs(anchor, shape, cfg, generator)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    B, T, H, D = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    causal = bool(inputs.get("causal", True))
    forward = lambda: anchor.run(inputs)  # noqa: E731
    call = with_grads(anchor.run, inputs, ("q", "k", "v"), generator) if cell.mode == "fwdbwd" else forward
    if anchor.group == "softmax":
        flops = softmax_flops(B, H, T, S, D, Dv, causal, cell.mode)
    else:
        flops = 4.0 * B * T * H * D * Dv * (3.0 if cell.mode == "fwdbwd" else 1.0)
    bytes_read = float(B * S * k.shape[2] * (D + Dv) * k.element_size()) if cell.mode == "decode" else None
    exact = {"q": q, "k": k, "v": v, "causal": causal, "scale": None} if anchor.approximates_softmax else None
    return Prepared(call=call, batch=B, seq_q=T, seq_k=S, causal=causal, flops=flops, bytes_read=bytes_read,
                    tokens=B * T, forward=forward, exact_inputs=exact)
