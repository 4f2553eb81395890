"""Benchmark of effattn.flash_attention on one GPU beside SDPA (flash, cuDNN) and compiled FlexAttention.

    PYTHONPATH=src python benchmarks/flash.py --out DIR [--dims 64 128] [--sizes 1024 4096 16384 65536]

1. Correctness on the GPU: fp32 vs SDPA's math backend, and the 2x rule vs the float64 reference for
   windows, softcap, GQA, varlen and block masks (effattn.testing).
2. bf16, H = 16, N in sizes (B = 16k / N), causal and not, fwd and fwd+bwd: TFLOP/s (fwd = 4 B H N^2 D,
   halved when causal; fwd+bwd = 3.5 x fwd), do_bench medians; ratios to each anchor. Every function of a cell is
   timed twice, the second round in reverse order, and keeps its better median: the clocks follow the load that
   ran before (H100, 2026-12-07: one D = 128 16k launch took 4.10 ms in the tuner, 4.25 ms timed last in its cell
   and 4.62 ms timed first, right after the tuning; flash_2026-12-07_h100_fwd_lazy.json).
3. Causal sliding window 1024 vs FlexAttention with the same mask (FLOPs counted on the 1024 / N fraction).
4. Peak memory of fwd+bwd at the largest N (must be linear in N).
Prints a table and writes flash.json to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import effattn
from effattn.hardware import _flash_common
from effattn.registry import REGISTRY, Shape
from effattn.sparse import block_mask
from effattn.testing import check_method

PEAK = 702.0  # measured bf16 dense TFLOP/s of the H100 (ANCHORS.md)


def log(*a):
    print(*a, flush=True)


def correctness() -> list[dict]:
    out = []
    torch.manual_seed(0)
    for causal in (False, True):
        for D in (64,):
            B, N, H, Hkv = 2, 1000, 8, 2
            q = torch.randn(B, N, H, D, device="cuda")
            k, v = torch.randn(B, N, Hkv, D, device="cuda"), torch.randn(B, N, Hkv, D, device="cuda")
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            o = effattn.flash_attention(q, k, v, causal=causal)
            g = torch.randn_like(o)
            dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
            with sdpa_kernel(SDPBackend.MATH):
                r = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=causal, enable_gqa=True).transpose(1, 2)
            rq, rk, rv = torch.autograd.grad(r, (q, k, v), g)
            rel = {n: float((a - b).detach().norm() / b.detach().norm()) for n, a, b in
                   (("o", o, r), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv))}
            ok = all(x < 1e-4 for x in rel.values())
            out.append(dict(check=f"fp32 vs SDPA math, causal={causal}, D={D}, GQA 8/2, N=1000", rel=rel, ok=ok))
            log(out[-1])
    flash = REGISTRY.get("flash")
    shape = Shape(batch=2, seq_q=333, seq_k=517, heads=4, kv_heads=2, head_dim=128)
    masks = [block_mask(lambda b, h, q, k: ((q // 64 + k // 64 + h) % 3 != 0) | (k < 5), 1, 4, 333, 517,
                        block=blk, device="cuda") for blk in ((128, 64), (128, 128))]
    cases = [(torch.bfloat16, dict(causal=True)), (torch.bfloat16, dict(window=(100, 20), softcap=10.0)),
             (torch.float16, dict(causal=True, window=64, return_lse=True))]
    cases += [(torch.bfloat16, dict(causal=False, block_mask=bm, return_lse=True)) for bm in masks]
    # the first candidates (this process runs untuned), then the one-warpgroup tiles the tuner picks for short
    # programs: block-sparse forward programs of half a mask block's rows, in 64-key steps under 128-key
    # blocks; the block-sparse backward keeps the mask's key block (dK/dV) and query block (dQ)
    def pinned(opts):
        if "block_mask" not in opts:
            return "fwd=64,64,4,3,1;dkdv=64,64,4,2;dq=64,32,4,3"
        bm, bn = opts["block_mask"].block
        return f"fwd=64,64,4,3,1;dkdv={bm // 2},{bn},4,2;dq={bm},{bn // 2},8,3"

    for pin_all in (False, True):
        for dtype, opts in cases:
            pin = pinned(opts) if pin_all else ""
            os.environ["EFFATTN_FLASH_CONFIGS"] = pin
            res = check_method(flash, shape=shape, dtype=dtype, device="cuda", **opts)
            desc = sorted(k if k != "block_mask" else f"block_mask {opts[k].block}" for k in opts)
            out.append(dict(check=f"2x rule {dtype} {desc}" + (f" pinned {pin}" if pin else ""),
                            ok=all(r.ok for r in res), detail=[str(r) for r in res]))
            log(out[-1]["check"], out[-1]["ok"], "; ".join(out[-1]["detail"]))
    os.environ.pop("EFFATTN_FLASH_CONFIGS")
    for D, causal in ((64, True), (128, False)):  # repeated calls: the cached launch plans, fwd and bwd
        errs = []
        for step in range(3):
            q, k, v = (torch.randn(2, 1024, 8, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            o = effattn.flash_attention(q, k, v, causal=causal)
            g = torch.randn_like(o)
            grads = torch.autograd.grad(o, (q, k, v), g)
            x = [t.detach().float().requires_grad_() for t in (q, k, v)]
            with sdpa_kernel(SDPBackend.MATH):
                r = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in x), is_causal=causal).transpose(1, 2)
            rg = torch.autograd.grad(r, x, g.float())
            errs.append(max(float((a.float() - b).norm() / b.norm()) for a, b in zip((o,) + grads, (r,) + rg)))
        out.append(dict(check=f"bf16 repeated calls (cached plans) vs SDPA math fp32, D={D}, causal={causal}",
                        rel=errs, ok=all(e < 2e-2 for e in errs)))
        log(out[-1])
    cu = torch.tensor([0, 100, 357, 1000], dtype=torch.int32, device="cuda")
    res = check_method(flash, shape=Shape(batch=1, seq_q=1000, heads=4, kv_heads=1, head_dim=64),
                       dtype=torch.bfloat16, device="cuda", cu_seqlens=cu, causal=True)
    out.append(dict(check="2x rule bf16 varlen causal", ok=all(r.ok for r in res), detail=[str(r) for r in res]))
    log(out[-1]["check"], out[-1]["ok"])
    return out


def bench(fn, backward: bool, tensors) -> float:
    if not backward:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    o = fn()
    g = torch.randn_like(o)

    def step():
        torch.autograd.backward(fn(), g)

    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=tensors, return_mode="median")


def graph_ms(fn) -> float:
    """Kernel-only time: fn captured in a CUDA graph, replays timed (no Python, no launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def host_us() -> dict:
    """Host time per call at a tiny shape (the GPU work is a few us): 300 calls back to back, one sync."""
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    cases = {"flash_attention (no grad)": lambda: effattn.flash_attention(q, k, v, causal=True),
             "flash_attention (inputs require grad)": lambda: effattn.flash_attention(qg, kg, vg, causal=True),
             "flash_attention fwd+bwd": lambda: effattn.flash_attention(qg, kg, vg, causal=True).sum().backward(),
             "SDPA (flash backend)": lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)}
    out = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(300):
            fn()
        out[name] = (time.perf_counter() - t) / 300 * 1e6
        torch.cuda.synchronize()
        log(f"host us/call {name}: {out[name]:.1f}")
    return out


def run_cell(B, N, H, D, causal, modes, flex_on, window=None, only_flex=False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    fns = {"flash": (lambda: effattn.flash_attention(q, k, v, causal=causal, window=window), [q, k, v])}
    if only_flex:
        fns.clear()
    if window is None and not only_flex:
        def sdpa(backend):
            def f():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
            return f
        fns["sdpa_flash"] = (sdpa(SDPBackend.FLASH_ATTENTION), [qh, kh, vh])
        fns["sdpa_cudnn"] = (sdpa(SDPBackend.CUDNN_ATTENTION), [qh, kh, vh])
    if flex_on:
        if window is not None:
            def mod(b, h, qi, ki):
                return (ki <= qi) & (qi - ki <= window[0])
        elif causal:
            def mod(b, h, qi, ki):
                return ki <= qi
        else:
            mod = None
        fm = create_block_mask(mod, None, None, N, N, device="cuda") if mod is not None else None
        cflex = torch.compile(flex_attention, dynamic=False)
        fns["flex"] = (lambda: cflex(qh, kh, vh, block_mask=fm), [qh, kh, vh])
    if not only_flex and window is None:  # inference calls (no autograd); short sequences: what host time costs
        qn, kn, vn = (x.detach() for x in (q, k, v))
        fns["flash_nograd"] = (lambda: effattn.flash_attention(qn, kn, vn, causal=causal), [])
    flops = 4 * B * H * N * N * D * (0.5 if causal and window is None else 1.0)
    if window is not None:
        flops = 4 * B * H * N * window[0] * D
    res = {}
    if "flash_nograd" in fns and "fwd" in modes and N <= 4096:
        ms = graph_ms(fns["flash_nograd"][0])
        res[("flash_graph", "fwd")] = dict(ms=ms, tflops=flops / ms / 1e9)
    return flops, {**res, **time_cell(fns, modes, flops)}


def time_cell(fns: dict, modes, flops: float) -> dict:
    """(name, mode) -> ms (the better of two rounds' medians), TFLOP/s and both rounds' ms, for fns name -> (fn,
    tensors whose grads to reset); a function that raises is reported and left out."""
    res = {}
    for mode in modes:
        names = [n for n in fns if n != "flash_nograd" or mode == "fwd"]
        for order in (names, names[::-1]):  # each once early and once late in the cell (see the docstring)
            for name in order:
                fn, ts = fns[name]
                if res.get((name, mode), {}).get("failed"):
                    continue
                try:
                    ms = bench(fn, mode == "fwd+bwd", ts)
                except Exception as e:  # an anchor that refuses a shape is reported, not fatal
                    log(f"  {name} {mode} failed: {type(e).__name__}: {str(e)[:200]}")
                    res[(name, mode)] = dict(failed=True)
                    continue
                rounds = res.get((name, mode), {}).get("rounds_ms", []) + [ms]
                tf = flops * (3.5 if mode == "fwd+bwd" else 1.0) / min(rounds) / 1e9
                res[(name, mode)] = dict(ms=min(rounds), tflops=tf, rounds_ms=rounds)
    return {key: r for key, r in res.items() if not r.get("failed")}


def _compile_one(spec: str) -> None:
    """Child process: run fwd+bwd once with the configuration pinned by EFFATTN_FLASH_CONFIGS, so that its
    kernels land in the shared Triton cache (same specialisation as the timed shapes: all multiples of 16)."""
    D, causal, win = (int(x) for x in spec.split(","))
    q, k, v = (torch.randn(1, 1024, 16, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    effattn.flash_attention(q, k, v, causal=bool(causal), window=(1024, 0) if win else None).sum().backward()
    torch.cuda.synchronize()


def _flex_one(spec: str) -> None:
    """Child process: compile FlexAttention fwd+bwd at one timed shape into the shared inductor cache."""
    N, causal, win, D = (int(x) for x in spec.split(","))
    run_cell(max(1, 16384 // N), N, 16, D, bool(causal), ["fwd+bwd"], True, window=(1024, 0) if win else None,
             only_flex=True)


def precompile(args) -> list:
    """Compile every candidate configuration and every Flex graph in parallel child processes (Triton and
    inductor compile one kernel at a time per process); returns the correctness-check process."""
    import os
    import subprocess
    from effattn.hardware.flash_bwd import bwd_configs
    from effattn.hardware.flash_fwd import fwd_configs

    def spawn(flag, spec, env=None):
        return subprocess.Popen([sys.executable, __file__, flag, spec, "--out", args.out],
                                env={**os.environ, **(env or {})})

    jobs = []
    variants = [(D, c, 0) for D in args.dims for c in args.causal] + ([(128, 1, 1)] if args.window_sizes else [])
    for D, causal, win in variants:
        cands = [fwd_configs(D, torch.bfloat16, None), bwd_configs(D, torch.bfloat16, None, "dkdv"),
                 bwd_configs(D, torch.bfloat16, None, "dq")]
        for i in range(max(map(len, cands))):
            pin = ";".join(f"{kind}={','.join(map(str, c[min(i, len(c) - 1)]))}"
                           for kind, c in zip(("fwd", "dkdv", "dq"), cands))
            jobs.append(("--compile-one", f"{D},{causal},{win}", {"EFFATTN_FLASH_CONFIGS": pin}))
    for N in args.window_sizes:
        if N <= 16384:  # Flex's mask builder needs tens of GiB at 64k: compiled later, alone
            jobs.append(("--flex-one", f"{N},1,1,128", None))
    if args.flex != "none":
        for D in args.dims:
            for N in args.sizes:
                for causal in args.causal:
                    if args.flex == "all" or causal:
                        jobs.append(("--flex-one", f"{N},{causal},0,{D}", None))
    checks = None if args.skip_check else spawn("--checks-only", "x", {"EFFATTN_FLASH_TUNE": "0"})
    running = []
    for job in jobs:
        while len(running) >= args.jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(0.2)
        running.append(spawn(*job))
    for p in running:
        p.wait()
    return checks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-one")
    ap.add_argument("--flex-one")
    ap.add_argument("--checks-only")
    ap.add_argument("--jobs", type=int, default=15)
    ap.add_argument("--markdown", help="only rewrite the Markdown report of this flash.json")
    ap.add_argument("--out", default=".")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--flex", choices=["none", "causal", "all"], default="none")
    ap.add_argument("--window-sizes", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)), end="")
        return 0
    if args.compile_one:
        return _compile_one(args.compile_one)
    if args.flex_one:
        return _flex_one(args.flex_one)
    if args.checks_only:
        with open(f"{args.out}/checks.json", "w") as f:
            json.dump(correctness(), f, default=str)
        return 0
    t0 = time.time()
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                command="PYTHONPATH=src python3 benchmarks/flash.py " + " ".join(sys.argv[1:]), peak_tflops=PEAK)
    log(info)
    checks = precompile(args)
    log(f"precompiled {time.time() - t0:.0f}s")
    if checks is not None:
        checks.wait()
        with open(f"{args.out}/checks.json") as f:
            checks = json.load(f)
        log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok")
    result = dict(info=info, checks=checks or [], cells=[], window=[], memory=None, host_us=host_us())

    def save():  # after every cell, so that a run cut off at its time limit still reports what it measured
        result["tuner"] = {repr(k): {repr(c): ms for c, ms in v.items()} for k, v in _flash_common.TIMINGS.items()}
        result["chosen"] = {repr(k): repr(v) for k, v in _flash_common._BEST.items()}
        with open(f"{args.out}/flash.json", "w") as f:
            json.dump(result, f, indent=1, default=str)

    H = 16
    for D in args.dims:
        for N in args.sizes:
            for causal in args.causal:
                B = max(1, 16384 // N)
                flex_on = args.flex == "all" or (args.flex == "causal" and causal)
                flops, res = run_cell(B, N, H, D, bool(causal), args.modes, flex_on)
                for mode in args.modes:
                    row = dict(D=D, N=N, B=B, causal=bool(causal), mode=mode,
                               floor_ms=flops * (3.5 if mode == "fwd+bwd" else 1) / PEAK / 1e9,
                               **{f"{n}_tflops": r["tflops"] for (n, m), r in res.items() if m == mode},
                               **{f"{n}_rounds_ms": r["rounds_ms"] for (n, m), r in res.items() if m == mode
                                  and "rounds_ms" in r})
                    result["cells"].append(row)
                    save()
                    log(f"[{time.time() - t0:5.0f}s] " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                                       for k, v in row.items()}))
    for N in args.window_sizes:
        flops, res = run_cell(max(1, 16384 // N), N, H, 128, True, args.modes, True, window=(1024, 0))
        for mode in args.modes:
            row = dict(D=128, N=N, mode=mode, **{f"{n}_tflops": r["tflops"] for (n, m), r in res.items() if m == mode},
                       **{f"{n}_rounds_ms": r["rounds_ms"] for (n, m), r in res.items() if m == mode})
            result["window"].append(row)
            save()
            log("window1024 " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    # Peak memory of fwd+bwd at the largest N: inputs + outputs + grads + O(N) statistics, no N^2 term.
    N = max(args.sizes)
    q, k, v = (torch.randn(1, N, H, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    # a first call tunes the shape if no cell did (do_bench's 256 MB cache-flush buffer is no part of the call)
    effattn.flash_attention(q, k, v, causal=True).sum().backward()
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    effattn.flash_attention(q, k, v, causal=True).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io_bytes = q.numel() * 2 * 4  # o, dq, dk, dv
    result["memory"] = dict(N=N, extra_peak_bytes=extra, io_bytes=io_bytes, n2_bf16_bytes=N * N * H * 2)
    assert extra < 3 * io_bytes, f"peak {extra} is not linear in N"
    log("memory", result["memory"])
    save()
    print_table(result)
    with open(f"{args.out}/flash.md", "w") as f:
        f.write(markdown(result))
    log(f"total {time.time() - t0:.0f}s")
    return 0


BARS = "fwd >= 1.35x SDPA flash and >= 0.8x cuDNN; fwd+bwd >= 1.15x SDPA flash; window 1024 >= 1.2x Flex"


def markdown(result) -> str:
    """The committed report: setup, the table with ratios and bars, the floor, the tuner's choices."""
    i = result["info"]
    lines = [f"# flash_attention on {i['gpu']}, {i['date']}", "",
             f"torch {i['torch']}, Triton {i['triton']}, Python {i['python']}. Command (repo root, device):",
             f"`{i['command']}`", "",
             "bf16, H = 16, B = 16384 / N, do_bench medians. TFLOP/s: fwd = 4 B H N^2 D (halved when causal), "
             "fwd+bwd = 3.5 x fwd. floor = FLOPs / 702 TFLOP/s (measured bf16 peak, ANCHORS.md); "
             "'of peak' = flash TFLOP/s / 702.", "", f"Bars: {BARS}.", "",
             "| D | N | B | causal | mode | flash | SDPA flash | cuDNN | x FA2 | x cuDNN | bar | floor ms | of peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["cells"]:
        f, fa, cu = (r.get(k, math.nan) for k in ("flash_tflops", "sdpa_flash_tflops", "sdpa_cudnn_tflops"))
        if r["mode"] == "fwd":
            ok = f / fa >= 1.35 and f / cu >= 0.8
        else:
            ok = f / fa >= 1.15
        lines.append(f"| {r['D']} | {r['N']} | {r['B']} | {r['causal']} | {r['mode']} | {f:.0f} | {fa:.0f} | {cu:.0f} "
                     f"| {f / fa:.2f} | {f / cu:.2f} | {'met' if ok else 'MISSED'} | {r['floor_ms']:.3f} | {f / PEAK:.0%} |")
    lines += ["", "Causal sliding window (left 1024), D = 128, FLOPs counted on the 1024 / N fraction:", "",
              "| N | mode | flash | Flex (compiled, same mask) | x Flex | bar 1.2x |", "|---|---|---|---|---|---|"]
    for r in result["window"]:
        f, c = r.get("flash_tflops", math.nan), r.get("flex_tflops", math.nan)
        lines.append(f"| {r['N']} | {r['mode']} | {f:.0f} | {c:.0f} | {f / c:.2f} | {'met' if f / c >= 1.2 else 'MISSED'} |")
    short = [r for r in result["cells"] if "flash_graph_tflops" in r]
    if short:
        lines += ["", "Short sequences, forward: end to end (inputs requiring grad, as in the table; and without grad) "
                      "against the kernel alone (CUDA-graph replay of the no-grad call); target e2e >= 0.9x kernel:", "",
                  "| D | N | causal | flash e2e | flash e2e no grad | kernel only (graph) | e2e / kernel |",
                  "|---|---|---|---|---|---|---|"]
        for r in short:
            f, n, g = (r.get(k, math.nan) for k in ("flash_tflops", "flash_nograd_tflops", "flash_graph_tflops"))
            lines.append(f"| {r['D']} | {r['N']} | {r['causal']} | {f:.0f} | {n:.0f} | {g:.0f} | {f / g:.2f} |")
    if result.get("host_us"):
        lines += ["", "Host time per call (us; B=1, N=128, H=2, D=64, causal; GPU work a few us): "
                  + "; ".join(f"{k} {v:.0f}" for k, v in result["host_us"].items()) + "."]
    m = result.get("memory")
    if m:
        lines += ["", f"Peak memory, causal fwd+bwd at N = {m['N']} (B = 1, H = 16, D = 128): "
                      f"{m['extra_peak_bytes'] / 2**30:.2f} GiB above the inputs, against "
                      f"{m['io_bytes'] / 2**30:.2f} GiB for o, dq, dk, dv (linear in N); one bf16 N x N score "
                      f"matrix would be {m['n2_bf16_bytes'] / 2**30:.0f} GiB."]
    checks = result.get("checks") or []
    lines += ["", f"GPU correctness checks: {sum(c['ok'] for c in checks)}/{len(checks)} passed "
                  "(fp32 vs SDPA math; 2x rule vs float64 for bf16/fp16 windows, softcap, block mask, varlen)."]
    lines += ["", "Tuner choices (key -> (BLOCK_M, BLOCK_N, warps, stages, tma[, ws])):", ""]
    lines += [f"- {k}: {v}" for k, v in result.get("chosen", {}).items()]
    return "\n".join(lines) + "\n"


def print_table(result) -> None:
    log("\n| D | N | B | causal | mode | flash | SDPA flash | cuDNN | Flex | x FA2 | x cuDNN | x Flex | floor ms |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["cells"]:
        f = r.get("flash_tflops", math.nan)
        cells = [r.get(k, math.nan) for k in ("sdpa_flash_tflops", "sdpa_cudnn_tflops", "flex_tflops")]
        ratios = [f / c if c == c and c else math.nan for c in cells]
        log(f"| {r['D']} | {r['N']} | {r['B']} | {r['causal']} | {r['mode']} | {f:.0f} | "
            + " | ".join(f"{c:.0f}" for c in cells) + " | " + " | ".join(f"{x:.2f}" for x in ratios)
            + f" | {r['floor_ms']:.3f} |")
    for r in result["window"]:
        f, c = r.get("flash_tflops", math.nan), r.get("flex_tflops", math.nan)
        log(f"window1024 N={r['N']} {r['mode']}: flash {f:.0f} flex {c:.0f} ratio {f / c:.2f}")


if __name__ == "__main__":
    sys.exit(main())
