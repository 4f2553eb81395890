"""Turning a registered method into something to time: inputs, the call per mode, FLOPs, accuracy.

Nothing here knows a particular method: everything comes from the registry record (make_inputs,
supports, complexity, state_or_cache, approximates_softmax), and calls go through `effattn.attention`,
the public entry point, whenever the record's inputs are q, k, v plus options it declares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..inputs import randn
from ..registry import Method, Shape
from .config import BenchConfig, Cell

SOFTMAX_FAMILIES = ("baseline", "hardware", "compact")
# Backward work relative to the forward: FlashAttention's convention (ANCHORS.md) for softmax attention
# (fwd + bwd = 3.5 fwd); a linear recurrence's backward is about two forward passes (dq; dk and dv).
FWDBWD_FACTOR = {"softmax": 3.5, "linear": 3.0}
# Options that restrict which keys a query visits: with any of them set, the dense pair count is wrong.
RESTRICTING_OPTIONS = ("window", "mask", "block_mask", "sink", "sinks", "topk", "block_size")


class Skip(Exception):
    """The cell does not apply to this subject (reason in the message); recorded, not an error."""


@dataclass
class Prepared:
    """A cell ready to run: `call()` is what is timed, plus what the record needs."""

    call: Callable[[], Any]
    batch: int
    seq_q: int
    seq_k: int
    causal: bool | None
    flops: float | None = None
    bytes_read: float | None = None  # decode: KV cache / state bytes read per generated token batch
    tokens: int = 0  # tokens produced per call (tokens/s = tokens / time)
    forward: Callable[[], Any] | None = None  # for accuracy: returns o in every mode that has one
    exact_inputs: dict | None = None  # q, k, v, causal, scale to compute exact softmax attention
    notes: list[str] = field(default_factory=list)


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def infer_causal(method: Method, inputs: dict) -> bool | None:
    if "causal" in inputs:
        return bool(inputs["causal"])
    if "causal" in method.supports and "noncausal" not in method.supports:
        return True  # causal-only methods (recurrences) take no flag
    return None


def _caller(method: Method, inputs: dict) -> Callable[[dict], Any]:
    """Through `effattn.attention` when the inputs are q, k, v and declared options of a method registered
    under that name; else the record's fn (records outside the registry, methods with other inputs)."""
    import effattn

    extra = set(inputs) - {"q", "k", "v"}
    public = method.name in effattn.REGISTRY and effattn.REGISTRY.get(method.name) is method
    if public and {"q", "k", "v"} <= set(inputs) and extra <= set(method.options):
        return lambda d: effattn.attention(d["q"], d["k"], d["v"], method=method.name,
                                           **{k: v for k, v in d.items() if k not in ("q", "k", "v")})
    return lambda d: method.fn(**d)


def pair_count(t: int, s: int, causal: bool | None) -> float:
    """Query-key pairs a dense softmax visits; causal with T == S counts half (ANCHORS.md's convention),
    bottom-right causal with T < S counts exactly."""
    if not causal:
        return float(t * s)
    if t == s:
        return t * s / 2
    return float(t * s - t * (t - 1) / 2) if t < s else float(s * (s + 1) / 2)


def nominal_flops(method: Method, shape: Shape, inputs: dict, mode: str, causal: bool | None,
                  tokens: int) -> float | None:
    """FLOPs the method's family defines, or None (then only tokens/s is reported). `tokens` = B * T run."""
    if method.family == "linear" and not method.state_or_cache.per_token:
        # one state update (k^T v) and one read (q S) per token: 2 multiply-adds per state element each;
        # defined by the shape alone, whatever the method names its inputs (Mamba2's x, B, C; RWKV's r, w)
        fwd = 4.0 * tokens * method.state_or_cache.elements(shape)
        return fwd * FWDBWD_FACTOR["linear"] if mode == "fwdbwd" else fwd
    q, k, v = inputs.get("q"), inputs.get("k"), inputs.get("v")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    B, T, H, D = q.shape[0], q.shape[1], q.shape[2], q.shape[-1]
    S, Dv = k.shape[1], v.shape[-1]
    if method.family in SOFTMAX_FAMILIES and method.complexity.time_exponent >= 2:
        if any(inputs.get(o) is not None for o in RESTRICTING_OPTIONS):
            return None
        return softmax_flops(B, H, T, S, D, Dv, causal, mode)
    return None


def softmax_flops(B, H, T, S, D, Dv, causal, mode) -> float:
    """QK^T and PV: 2 (D + Dv) FLOPs per visited query-key pair and head."""
    fwd = 2.0 * B * H * pair_count(T, S, causal) * (D + Dv)
    return fwd * FWDBWD_FACTOR["softmax"] if mode == "fwdbwd" else fwd


def with_grads(call: Callable[[dict], Any], inputs: dict, names, generator) -> Callable[[], Any]:
    """forward + backward of every output that needs a gradient, under fixed random upstream gradients
    (drawn at the first call, which is the untimed warm-up)."""
    wrt = [inputs[n] for n in names if isinstance(inputs.get(n), torch.Tensor) and inputs[n].is_floating_point()]
    if not wrt:
        raise Skip("no floating input to differentiate")
    for t in wrt:
        t.requires_grad_(True)
    grads: list[torch.Tensor] = []

    def step():
        outs = [o for o in _flat(call(inputs)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not outs:
            raise Skip("outputs do not require grad")
        if not grads:
            grads.extend(torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in outs)
        return torch.autograd.grad(outs, wrt, grads, allow_unused=True)

    return step


def _flat(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def key_length(inputs: dict, wanted: int, default: int) -> int:
    """Length of the keys / cache: k's dim 1, else `wanted` when some other token-major input `[B, S, ...]`
    has it (latent caches such as MLA's c_kv), else `default`."""
    k = inputs.get("k")
    if isinstance(k, torch.Tensor):
        return k.shape[1]
    others = [t for name, t in inputs.items() if name != "q" and isinstance(t, torch.Tensor) and t.dim() >= 3]
    return wanted if any(t.shape[1] == wanted for t in others) else default


def cell_shape(cfg: BenchConfig, mode: str, n: int) -> Shape:
    b = cfg.batch_for(n)
    if mode == "decode":
        return Shape(batch=b, seq_q=1, seq_k=n, heads=cfg.heads, head_dim=cfg.head_dim)
    return Shape(batch=b, seq_q=n, heads=cfg.heads, head_dim=cfg.head_dim)


def prepare_method(method: Method, cell: Cell, cfg: BenchConfig, generator: torch.Generator) -> Prepared:
    if cell.mode == "fwdbwd" and not method.trains:
        raise Skip("no backward (does not train)")
    if cell.mode == "decode" and "decode" not in method.supports:
        raise Skip("no decode support")
    shape = cell_shape(cfg, cell.mode, cell.n)
    inputs = method.make_inputs(shape, cfg.torch_dtype, cfg.device, generator)
    if cell.form != "default":
        inputs["form"] = cell.form
    q = inputs.get("q")
    B = q.shape[0] if isinstance(q, torch.Tensor) else shape.batch
    T = q.shape[1] if isinstance(q, torch.Tensor) else shape.seq_q
    S = key_length(inputs, shape.S, T)
    notes = []
    keys_count = cell.mode != "decode" or method.state_or_cache.per_token  # a state has no key length
    if T != shape.seq_q or (keys_count and S != shape.S):
        drawn = f"make_inputs drew T={T}, S={S} for T={shape.seq_q}, S={shape.S}"
        only_qkv = {n for n, t in inputs.items() if isinstance(t, torch.Tensor)} == {"q", "k", "v"}
        if cell.mode != "decode":
            # its length is fixed by its options (a token grid, a test shape): measure it as drawn, say so;
            # the slope fit uses the lengths actually run
            notes.append(f"ran at T={T}, S={S}: make_inputs fixes the length")
        elif not only_qkv:
            raise Skip(drawn)
        else:  # the decode contract is one query against a cache of N: redraw plain q, k, v that way
            for name, length in (("q", shape.seq_q), ("k", shape.S), ("v", shape.S)):
                t = inputs[name]
                inputs[name] = randn((t.shape[0], length, *t.shape[2:]), t.dtype, t.device, generator)
            T, S = shape.seq_q, shape.S
            notes.append(f"q, k, v redrawn at T={T}, S={S} ({drawn})")
    if cell.mode == "decode" and not method.state_or_cache.per_token:
        notes.append("one recurrent step from a fixed-size state (independent of N)")
    causal = infer_causal(method, inputs)
    call = _caller(method, inputs)
    forward = lambda: call(inputs)  # noqa: E731
    timed = with_grads(call, inputs, method.grad_inputs, generator) if cell.mode == "fwdbwd" else forward
    if cell.mode == "decode":
        per = method.state_or_cache.bytes(shape, cfg.torch_dtype.itemsize)
        bytes_read = float(B * (per * S if method.state_or_cache.per_token else per))
    else:
        bytes_read = None
    exact = None
    if method.approximates_softmax and all(isinstance(inputs.get(n), torch.Tensor) for n in "qkv"):
        exact = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "causal": bool(causal),
                 "scale": inputs.get("scale")}
    return Prepared(call=timed, batch=B, seq_q=T, seq_k=S, causal=causal,
                    flops=nominal_flops(method, shape, inputs, cell.mode, causal, B * T), bytes_read=bytes_read,
                    tokens=B * T, forward=forward, exact_inputs=exact, notes=notes)


def exact_attention(q, k, v, causal: bool, scale=None) -> torch.Tensor:
    """Exact softmax attention `[B, T, H, Dv]` for accuracy: float64 on the CPU (the library's reference);
    on CUDA in float32 on the device (the reference while its N x N scores fit in 4 GiB, else SDPA)."""
    from ..reference import softmax_attention

    if q.device.type == "cpu":
        return softmax_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    B, T, H, _ = q.shape
    S = k.shape[1]
    if B * H * T * S * 4 <= 4 * 2**30:
        return softmax_attention(q.float(), k.float(), v.float(), causal=causal, scale=scale)
    if causal and T != S:
        raise Skip("exact attention too large for the reference and SDPA's causal mask is top-left")
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale,
                                                         enable_gqa=k.shape[2] != H)
    return o.transpose(1, 2)


def accuracy(out: torch.Tensor, exact: torch.Tensor) -> dict:
    """Relative L2 error and cosine similarity of `out` against `exact`, over all elements."""
    a, b = out.detach().to(exact.device, torch.float64).flatten(), exact.detach().double().flatten()
    denom = float(b.norm())
    rel = float((a - b).norm()) / denom if denom > 0 else math.nan
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"rel_l2": rel, "cosine": cos}
