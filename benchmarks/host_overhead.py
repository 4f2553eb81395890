"""Diagnostic probe (GPU): the host time of one call of each forward, where it goes, and the GPU time beside it.

    PYTHONPATH=src python3 benchmarks/host_overhead.py --out DIR [--n 1024] [--d 128]

bf16, B = 1, H = 16. A call whose host time exceeds its GPU time leaves the GPU idle between launches, and
short sequences then measure Python, not kernels. Per method: host microseconds per call (many calls
queued without a sync, at a size where the GPU keeps up), GPU microseconds per call (CUDA events around a
synchronised call) and cProfile's top functions by own time; then the same for a training step (fwd+bwd) of ours
and of SDPA's flash backend. Writes host_overhead.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton

import effattn

CALLS = {
    "flash_bf16": lambda q, k, v: effattn.flash_attention(q, k, v, causal=True),
    "sage_int8": lambda q, k, v: effattn.sage_attention(q, k, v, causal=True),
    "sage_int8_fp8pv": lambda q, k, v: effattn.sage_attention(q, k, v, causal=True, pv_dtype="fp8"),
    "flash_fp8": lambda q, k, v: effattn.flash_fp8(q, k, v, causal=True),
    "flash_fp8_block": lambda q, k, v: effattn.flash_fp8(q, k, v, causal=True, granularity="block"),
}


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), is_causal=True)


# Training steps (inputs requiring grad, an upstream gradient of ones): the backward's host time beside SDPA's.
TRAIN_CALLS = {
    "flash_bf16 fwd+bwd": lambda q, k, v: effattn.flash_attention(q, k, v, causal=True),
    "sdpa_flash fwd+bwd": _sdpa_flash,
}


def _train_step(call, q, k, v) -> None:
    o = call(q, k, v)
    o.backward(torch.ones_like(o))


def _backward_alone(q, k, v):
    """Our backward called directly, on this thread: autograd runs a CUDA backward on its device thread, where its
    Python ran ~2.7x slower under cProfile (H100, 2026-12-07: `torch.empty` 12.5 us a call there against 5 here)."""
    from effattn.hardware.flash_bwd import flash_bwd
    from effattn.hardware.flash_fwd import flash_fwd

    cfg = dict(scale=q.shape[-1] ** -0.5, causal=True, window=None, sinks=0, softcap=None, cu_seqlens=None,
               max_seqlen=None, sparse=None)
    o, lse = flash_fwd(q, k, v, **cfg)
    do = torch.ones_like(o)
    return lambda: flash_bwd(do, None, q, k, v, o, lse, **cfg)


def host_us(call, reps: int = 200) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    t1 = time.perf_counter()  # before the sync: the host's time only
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


def top_functions(call, reps: int = 200, rows: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        call()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(rows)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[1024])
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    for d in args.d:
        for n in args.n:
            q, k, v = (torch.randn(1, n, 16, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            steps = {name: (lambda c=call: c(q, k, v)) for name, call in CALLS.items()}
            steps.update({name: (lambda c=call: _train_step(c, qg, kg, vg)) for name, call in TRAIN_CALLS.items()})
            steps["flash_bf16 bwd alone"] = _backward_alone(q, k, v)  # on this thread, where cProfile sees it
            for name, step in steps.items():
                with torch.set_grad_enabled(name in TRAIN_CALLS):  # (the backward alone needs none)
                    for _ in range(5):
                        step()
                    host = host_us(step)
                    gpu = triton.testing.do_bench(step, warmup=10, rep=50) * 1e3
                    prof = top_functions(step)
                res["rows"].append({"D": d, "N": n, "method": name, "host_us": host, "wall_us": gpu,
                                    "profile": prof})
                print(f"D={d} N={n} {name}: host {host:.1f} us/call, do_bench {gpu:.1f} us", flush=True)
                print("\n".join(prof.splitlines()[:30]), flush=True)
                with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
