"""Diagnostic probe (one device call): host time per flash_attention call, N = 1k cells end-to-end vs
kernel-only (CUDA graph replay), and the quantized forward's kernel vs quantisation-prep time.

    PYTHONPATH=src python3 benchmarks/flash_probe.py --out DIR

Kernels are compiled first in parallel child processes (each pins one tuner candidate). Prints tables and
writes probe.json to --out.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import effattn
from effattn.hardware import _flash_common
from flash import graph_ms  # benchmarks/flash.py: kernel-only time through a CUDA graph

QUANT_CFGS = ["128,64,4,3", "128,64,8,3", "128,64,4,4", "128,64,8,4", "128,128,8,3"]


def log(*a):
    print(*a, flush=True)


def rnd(*shape, rg=False):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(rg)


def quant_methods():
    return {
        "sage_int8": lambda q, k, v, c: effattn.sage_attention(q, k, v, causal=c),
        "sage_int8_fp8pv": lambda q, k, v, c: effattn.sage_attention(q, k, v, causal=c, pv_dtype="fp8"),
        "flash_fp8": lambda q, k, v, c: effattn.flash_fp8(q, k, v, causal=c, granularity="block"),
    }


def child_quant(spec: str) -> None:
    D, causal = (int(x) for x in spec.split(","))
    q, k, v = (rnd(1, 1024, 16, D) for _ in range(3))
    bn = int(os.environ["EFFATTN_FLASH_CONFIGS"].split("=")[1].split(",")[1])
    for name, fn in quant_methods().items():
        if name == "sage_int8" or bn == 64:
            fn(q, k, v, bool(causal))
    torch.cuda.synchronize()


def precompile(out: str) -> None:
    jobs = []
    here = os.path.join(os.path.dirname(__file__), "flash.py")
    from effattn.hardware.flash_bwd import bwd_configs
    from effattn.hardware.flash_fwd import fwd_configs

    for D in (64, 128):
        for causal in (0, 1):
            cands = [fwd_configs(D, torch.bfloat16, None), bwd_configs(D, torch.bfloat16, None, "dkdv"),
                     bwd_configs(D, torch.bfloat16, None, "dq")]
            for i in range(max(map(len, cands))):
                pin = ";".join(f"{kind}={','.join(map(str, c[min(i, len(c) - 1)]))}"
                               for kind, c in zip(("fwd", "dkdv", "dq"), cands))
                jobs.append(([sys.executable, here, "--compile-one", f"{D},{causal},0", "--out", out],
                             {"EFFATTN_FLASH_CONFIGS": pin}))
            for cfg in QUANT_CFGS:
                for scalar in ("0", "1"):
                    jobs.append(([sys.executable, __file__, "--child-quant", f"{D},{causal}"],
                                 {"EFFATTN_FLASH_CONFIGS": f"quant={cfg}", "EFFATTN_QUANT_SCALAR": scalar}))
    running = []
    for cmd, env in jobs:
        while len(running) >= 15:
            running = [p for p in running if p.poll() is None]
            time.sleep(0.1)
        running.append(subprocess.Popen(cmd, env={**os.environ, **env}))
    for p in running:
        p.wait()


def host_overhead(res):
    """Per-call host time at a tiny shape (GPU time ~ few us): calls issued back to back, one sync at the end."""
    q, k, v = (rnd(1, 128, 2, 64) for _ in range(3))
    qg, kg, vg = (rnd(1, 128, 2, 64, rg=True) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    cases = {
        "flash no-grad": lambda: effattn.flash_attention(q, k, v, causal=True),
        "flash requires_grad (fwd)": lambda: effattn.flash_attention(qg, kg, vg, causal=True),
        "flash fwd+bwd": lambda: effattn.flash_attention(qg, kg, vg, causal=True).sum().backward(),
        "sdpa flash": lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),
        "sage_int8": lambda: effattn.sage_attention(q, k, v, causal=True),
    }
    out = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(300):
            fn()
        host = (time.perf_counter() - t) / 300 * 1e6
        torch.cuda.synchronize()
        out[name] = host
        log(f"host us/call {name}: {host:.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        effattn.flash_attention(qg, kg, vg, causal=True)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    log(s.getvalue()[-3500:])
    res["host_us"] = out


def short_cells(res):
    rows = []
    for D in (64, 128):
        for causal in (False, True):
            B, N, H = 16, 1024, 16
            q, k, v = (rnd(B, N, H, D, rg=True) for _ in range(3))
            qn, kn, vn = (x.detach() for x in (q, k, v))
            qh, kh, vh = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))
            flops = 4 * B * H * N * N * D * (0.5 if causal else 1)
            tf = lambda ms: flops / ms / 1e9  # noqa: E731
            full = lambda: effattn.flash_attention(q, k, v, causal=causal)  # noqa: E731
            nograd = lambda: effattn.flash_attention(qn, kn, vn, causal=causal)  # noqa: E731
            full()
            r = dict(D=D, causal=causal)
            r["e2e_grad"] = tf(triton.testing.do_bench(full, warmup=25, rep=100, return_mode="median"))
            r["e2e_nograd"] = tf(triton.testing.do_bench(nograd, warmup=25, rep=100, return_mode="median"))
            r["graph"] = tf(graph_ms(nograd))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                r["sdpa_flash"] = tf(triton.testing.do_bench(
                    lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), return_mode="median"))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                r["cudnn"] = tf(triton.testing.do_bench(
                    lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), return_mode="median"))
            g = torch.randn_like(q)
            r["fwdbwd"] = 3.5 * tf(triton.testing.do_bench(lambda: torch.autograd.backward(full(), g),
                                                          grad_to_none=[q, k, v], return_mode="median"))
            rows.append(r)
            log("1k", {a: round(b, 1) if isinstance(b, float) else b for a, b in r.items()})
    res["short"] = rows


def quant_cells(res):
    from effattn.hardware.quant_prep import quantize_qk

    rows = []
    for D in (64, 128):
        for causal in (False, True):
            N, H = 16384, 16
            q, k, v = (rnd(1, N, H, D) for _ in range(3))
            flops = 4 * H * N * N * D * (0.5 if causal else 1)
            qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
            fns = {"flash_bf16": lambda: effattn.flash_attention(q, k, v, causal=causal)}
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cud = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal),
                                              return_mode="median")
            for name, fn in quant_methods().items():
                fns[name] = (lambda fn=fn: fn(q, k, v, causal))
            try:
                from sageattention import sageattn

                fns["sageattention_1.0.6"] = lambda: sageattn(q, k, v, tensor_layout="NHD", is_causal=causal)
            except Exception as e:  # noqa: BLE001
                log("no sageattention", e)
            r = dict(D=D, causal=causal, cudnn=flops / cud / 1e9)
            for name, fn in fns.items():
                fn()
                r[name] = flops / triton.testing.do_bench(fn, return_mode="median") / 1e9
            os.environ["EFFATTN_QUANT_SCALAR"] = "0"
            fns["sage_int8"]()
            r["sage_int8_vector_scales"] = flops / triton.testing.do_bench(fns["sage_int8"], return_mode="median") / 1e9
            os.environ["EFFATTN_QUANT_SCALAR"] = "1"
            r["prep_q_ms"] = triton.testing.do_bench(lambda: quantize_qk(q, 128, fp8=False, smooth=False),
                                                     return_mode="median")
            r["prep_k_ms"] = triton.testing.do_bench(lambda: quantize_qk(k, 64, fp8=False, smooth=True),
                                                     return_mode="median")
            rows.append(r)
            log("quant16k", {a: round(b, 3) if isinstance(b, float) else b for a, b in r.items()})
    res["quant"] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--child-quant")
    args = ap.parse_args()
    if args.child_quant:
        return child_quant(args.child_quant)
    t0 = time.time()
    precompile(args.out)
    log(f"precompiled {time.time() - t0:.0f}s")
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for step in (host_overhead, short_cells, quant_cells):
        try:
            step(res)
        except Exception as e:  # noqa: BLE001
            log(step.__name__, "failed", type(e).__name__, str(e)[:500])
        log(f"[{time.time() - t0:.0f}s] {step.__name__} done")
        res["tuner"] = {repr(k): {repr(c): ms for c, ms in v.items()} for k, v in _flash_common.TIMINGS.items()}
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(res, f, indent=1)
    for k, v in res["tuner"].items():
        log(k, {c: round(ms, 4) for c, ms in v.items()})


if __name__ == "__main__":
    main()
