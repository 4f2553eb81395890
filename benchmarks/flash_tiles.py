"""Probe (one device call): the flash kernels at pinned tile configurations, beside SDPA's flash and cuDNN
backends (dense) or compiled FlexAttention (causal sliding window). Forward: kernel-only times (CUDA graphs);
fwd+bwd: do_bench medians of a training step.

    PYTHONPATH=src:benchmarks python3 benchmarks/flash_tiles.py --out DIR --configs 128,128,8,3,1 64,64,4,3,1
    PYTHONPATH=src:benchmarks python3 benchmarks/flash_tiles.py --out DIR --mode fwd+bwd --cells window \
        --configs "dkdv=64,64,4,3;dq=64,64,4,3"

A configuration without "=" pins the forward (BLOCK_M,BLOCK_N,warps,stages[,tma[,ws[,ahead]]]); one with it is
a whole EFFATTN_FLASH_CONFIGS value.

Short programs (N = 1k, or a 1024-key window) spend a larger share of their time outside the key loop (Q
load, pipeline fill, O store); a tile that lets two programs share an SM can hide it. This times any tile
against the tuner's pick without touching the tuner's list. Each pinned configuration is compiled first in
a child process, in parallel. Writes tiles.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import effattn
from flash import graph_ms  # benchmarks/flash.py

WINDOW = 1024


def log(*a):
    print(*a, flush=True)


def cells(sizes, dims, which):
    """(D, N, causal, window) cells: dense causal and not at each N, and the causal window at the largest N."""
    out = [(D, N, c, None) for D in dims for N in sizes for c in (False, True)] if "dense" in which else []
    return out + ([(128, max(sizes), True, WINDOW)] if "window" in which else [])


def pin(cfg: str) -> str:
    return cfg if "=" in cfg else f"fwd={cfg}"


def inputs(D, N, grad=False):
    B = max(1, 16384 // N)
    return [torch.randn(B, N, 16, D, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)]


def flops(D, N, causal, window, backward):
    B = max(1, 16384 // N)
    keys = min(window, N) if window else N
    return 4 * B * 16 * N * keys * D * (0.5 if causal and not window else 1.0) * (3.5 if backward else 1.0)


def timed(fn, tensors, backward: bool) -> float:
    if not backward:
        return graph_ms(fn)
    g = torch.randn_like(fn())

    def step():
        torch.autograd.backward(fn(), g)
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=tensors, return_mode="median")


def ours(q, k, v, causal, window):
    return lambda: effattn.flash_attention(q, k, v, causal=causal, window=(window, 0) if window else None)


def anchors(q, k, v, causal, window) -> dict:
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if window:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        N = q.shape[1]
        mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= window), None, None, N, N)
        flex = torch.compile(flex_attention, dynamic=False)
        return {"flex": lambda: flex(qt, kt, vt, block_mask=mask)}

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return run
    return {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def compile_one(cfg: str, sizes, dims, which, backward) -> None:
    """Child process: run every cell once with cfg pinned (fills the shared Triton cache)."""
    os.environ["EFFATTN_FLASH_CONFIGS"] = pin(cfg)
    for D, N, causal, window in cells(sizes, dims, which):
        try:
            o = ours(*inputs(D, N, backward), causal, window)()
            if backward:
                o.sum().backward()
        except Exception as e:  # out of resources: reported by the parent's timing
            log("compile", cfg, D, N, causal, window, type(e).__name__)
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="+", required=True, help="BLOCK_M,BLOCK_N,warps,stages[,tma[,ws[,ahead]]]")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--dims", nargs="+", type=int, default=[128])
    ap.add_argument("--cells", default="dense,window", help="dense, window or both")
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    ap.add_argument("--compile-one")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--no-tuned", action="store_true", help="skip the tuner's own pick (saves its compiles)")
    a = ap.parse_args()
    if a.compile_one:
        compile_one(a.compile_one, a.sizes, a.dims, a.cells, a.mode == "fwd+bwd")
        return 0
    t0 = time.time()
    procs = []
    for cfg in a.configs:
        while sum(p.poll() is None for p in procs) >= a.jobs:
            time.sleep(0.2)
        procs.append(subprocess.Popen([sys.executable, __file__, "--out", a.out, "--configs", "x",
                                       "--sizes", *map(str, a.sizes), "--dims", *map(str, a.dims),
                                       "--cells", a.cells, "--mode", a.mode,
                                       "--compile-one", cfg]))
    for p in procs:
        p.wait()
    log(f"compiled {len(a.configs)} configurations in {time.time() - t0:.0f} s")
    rows = []
    backward = a.mode == "fwd+bwd"
    for D, N, causal, window in cells(a.sizes, a.dims, a.cells):
        q, k, v = inputs(D, N, backward)
        f = flops(D, N, causal, window, backward)
        row = {"D": D, "N": N, "causal": causal, "window": window, "mode": a.mode, "tflops": {}}
        for name, fn in anchors(q, k, v, causal, window).items():
            row["tflops"][name] = f / timed(fn, (q, k, v), backward) * 1e-9
        for cfg in a.configs:
            os.environ["EFFATTN_FLASH_CONFIGS"] = pin(cfg)
            try:
                row["tflops"][cfg] = f / timed(ours(q, k, v, causal, window), (q, k, v), backward) * 1e-9
            except Exception as e:
                row["tflops"][cfg] = None
                log("failed", cfg, type(e).__name__, str(e)[:200])
        os.environ.pop("EFFATTN_FLASH_CONFIGS")
        if not a.no_tuned:
            o = ours(q, k, v, causal, window)()  # tunes outside the graph capture
            if backward:
                o.sum().backward()
            torch.cuda.synchronize()
            row["tflops"]["tuned"] = f / timed(ours(q, k, v, causal, window), (q, k, v), backward) * 1e-9
        rows.append(row)
        log(D, N, "causal" if causal else "full", f"window {window}" if window else "",
            "  ".join(f"{n}: {x:.0f}" if x else f"{n}: -" for n, x in row["tflops"].items()))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "command": " ".join(sys.argv),
            "unit": "TFLOP/s; fwd: kernel only (CUDA graph); fwd+bwd: do_bench of a step, 3.5x the forward's FLOPs"}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"tiles_{a.mode.replace('+', '_')}.json"), "w") as fh:
        json.dump({**meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
