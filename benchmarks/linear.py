"""GPU benchmark of the linear-attention chunk kernels beside FLA 0.6.0 and exact attention.

    PYTHONPATH=src python3 benchmarks/linear.py --out DIR [--fla simple_gla,gla,gated_delta] [--sizes 4096,16384,65536]

1. Correctness on the GPU: every linear method's "chunk" form vs its float64 reference (fwd, final state,
   all gradients; effattn.testing rule), and ours vs FLA's output at one benchmark size.
2. Speed: layout [B, T, H, D], H = 16, D = 128, B = max(1, 16384 // T), bf16; million tokens/s of fwd and
   fwd+bwd (triton.testing.do_bench medians), ours beside FLA in the same run; and causal exact attention
   (our flash kernel, cuDNN SDPA) for the crossover length. Results are written after every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

import effattn  # noqa: F401  (registers every method)
from effattn.linear import chunk_gated_linear_attn
from effattn.registry import REGISTRY, Shape
from effattn.testing import check_method

H, D = 16, 128
KINDS = {  # kind: (our arguments, FLA op name)
    "simple_gla": (dict(gate="scalar"), "chunk_simple_gla"),
    "gla": (dict(gate="vector"), "chunk_gla"),
    "gated_delta": (dict(gate="scalar", delta=True), "chunk_gated_delta_rule"),
}


def inputs(kind, B, T, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    spec = KINDS[kind][0]
    q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    if spec.get("delta"):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = F.logsigmoid(r(B, T, H, D)) / 16 if spec["gate"] == "vector" else F.logsigmoid(r(B, T, H))
    beta = torch.sigmoid(r(B, T, H)) if spec.get("delta") else None
    out = dict(q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16(), g=g.float(), beta=None if beta is None else beta.bfloat16())
    if requires_grad:
        for t in out.values():
            if t is not None:
                t.requires_grad_(True)
    return out


def ours(kind, x, chunk=64):
    return chunk_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                   delta_rule=bool(KINDS[kind][0].get("delta")), chunk_size=chunk)


def fla(kind, x):
    import fla.ops as ops  # noqa: F401
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla
    if kind == "simple_gla":
        return chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"])[0]
    if kind == "gla":
        return chunk_gla(x["q"], x["k"], x["v"], g=x["g"])[0]
    return chunk_gated_delta_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"])[0]


def bench(fn, backward: bool) -> float:
    """Median ms of fn() (and of fn().backward with a fixed upstream gradient)."""
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    o = fn()
    do = torch.randn_like(o)
    return triton.testing.do_bench(lambda: fn().backward(do), warmup=10, rep=60, return_mode="median")


class Report:
    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "linear.json")
        self.data = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
                     "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "command": " ".join(sys.argv), "layout": f"[B, T, H={H}, D={D}], B = max(1, 16384 // T), bf16",
                     "correctness": [], "speed": [], "errors": [], "profile": []}

    def add(self, key, row):
        self.data[key].append(row)
        print(key, json.dumps(row), flush=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def correctness(rep: Report):
    shape = Shape(batch=2, seq_q=203, heads=2, head_dim=64)
    for name in ("simple_gla", "gla", "delta_net", "gated_delta_net", "retnet"):
        for dtype in (torch.float32, torch.bfloat16):
            res = check_method(REGISTRY.get(name), form="chunk", shape=shape, dtype=dtype, device="cuda", seed=1)
            rep.add("correctness", {"method": name, "dtype": str(dtype), "ok": all(r.ok for r in res),
                                    "detail": [str(r) for r in res]})


def timed(rep, label, kind, T, fn, backward, **extra):
    B = max(1, 16384 // T)
    try:
        ms = bench(fn, backward)
        rep.add("speed", {"impl": label, "kind": kind, "T": T, "B": B, "pass": "fwd+bwd" if backward else "fwd",
                          "ms": ms, "mtok_s": B * T / ms / 1e3, **extra})
    except Exception as e:  # an anchor that refuses to run (FLA's gated backward on Hopper) is a result too
        rep.add("errors", {"impl": label, "kind": kind, "T": T, "pass": "fwd+bwd" if backward else "fwd",
                           "error": f"{type(e).__name__}: {str(e)[:300]}"})
        torch.cuda.empty_cache()


def profile(rep, label, kind, fn, backward):
    """CUDA time per call of every kernel of fn (and of its backward), after a warm-up call."""
    do = torch.randn(1, 16384, H, D, device="cuda", dtype=torch.bfloat16)

    def step():
        o = fn()
        if backward:
            o.backward(do)
    try:
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    except Exception as e:
        rep.add("errors", {"impl": label, "kind": kind, "error": f"profile: {type(e).__name__}: {str(e)[:300]}"})
        return
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            rep.add("profile", {"impl": label, "kind": kind, "pass": "fwd+bwd" if backward else "fwd",
                                "kernel": ev.key[:60], "us_per_call": ev.device_time_total / 5})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fla", default="simple_gla,gla,gated_delta")
    ap.add_argument("--sizes", default="4096,16384,65536")
    ap.add_argument("--cross", default="512,1024,2048,4096,8192")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which of ours to time")
    ap.add_argument("--chunks", default="64", help="our chunk sizes to time (FLA's is 64)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--passes", default="fwd,fwd+bwd")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profiles at the end")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds; later measurements are skipped after it")
    a = ap.parse_args()
    t_start = time.time()
    rep = Report(a.out)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if not a.skip_check:
        correctness(rep)
    fla_kinds = [k for k in a.fla.split(",") if k]
    left = lambda: time.time() - t_start < a.budget  # noqa: E731
    kinds = [k for k in a.kinds.split(",") if k]
    chunks = [int(c) for c in a.chunks.split(",") if c]
    for kind in kinds:  # ours first (cheap to compile), then FLA (60-110 s of autotuning per op)
        for T in sizes:
            x = inputs(kind, max(1, 16384 // T), T)
            for c in chunks:
                timed(rep, "effattn", kind, T, lambda: ours(kind, x, c), False, chunk=c)
    if "fwd+bwd" in a.passes:
        for kind in kinds:
            for T in sizes:
                xg = inputs(kind, max(1, 16384 // T), T, requires_grad=True)
                for c in chunks:
                    if left():
                        timed(rep, "effattn", kind, T, lambda: ours(kind, xg, c), True, chunk=c)
    for kind in fla_kinds:
        if not left():
            rep.add("errors", {"impl": "fla", "kind": kind, "error": "skipped: time budget of this run spent"})
            continue
        x = inputs(kind, 4, 4096)
        try:
            ref = ours(kind, x).float()
            got = fla(kind, x).float()
            rep.add("correctness", {"method": f"ours vs FLA {KINDS[kind][1]}", "T": 4096,
                                    "max_abs_diff": float((ref - got).abs().max()), "ref_max": float(ref.abs().max())})
        except Exception:
            rep.add("errors", {"impl": "fla", "kind": kind, "error": traceback.format_exc()[-500:]})
            continue
        for T in sizes:
            x = inputs(kind, max(1, 16384 // T), T)
            timed(rep, "fla", kind, T, lambda: fla(kind, x), False)
            if "fwd+bwd" in a.passes:
                xg = inputs(kind, max(1, 16384 // T), T, requires_grad=True)
                timed(rep, "fla", kind, T, lambda: fla(kind, xg), True)
    for T in [int(s) for s in a.cross.split(",") if s]:
        if not left():
            break
        B = max(1, 16384 // T)
        x = inputs("simple_gla", B, T)
        timed(rep, "effattn", "simple_gla", T, lambda: ours("simple_gla", x), False)
        from effattn.hardware.flash import flash_attention
        timed(rep, "effattn_flash", "causal_softmax", T, lambda: flash_attention(x["q"], x["k"], x["v"], causal=True), False)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qt, kt, vt = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        timed(rep, "sdpa_cudnn", "causal_softmax", T, sdpa, False)
    # where the time goes, per kernel (T = 16384, B = 1): ours forward and forward + backward, FLA's forward
    ours_passes = (False, True) if "fwd+bwd" in a.passes else (False,)
    profiles = [] if a.no_profile else ([("effattn", k, b) for k in kinds for b in ours_passes]
                                        + [("fla", k, False) for k in fla_kinds])
    for label, kind, backward in profiles:
        if not left():  # profiling a first backward also tunes it: minutes at this size
            rep.add("errors", {"impl": label, "kind": kind, "error": "profile skipped: time budget spent"})
            continue
        x = inputs(kind, 1, 16384, requires_grad=backward)
        profile(rep, label, kind, lambda: (ours if label == "effattn" else fla)(kind, x), backward)
    print("total", time.time() - t_start, "s", flush=True)


if __name__ == "__main__":
    main()
