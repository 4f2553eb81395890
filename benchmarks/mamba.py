"""GPU benchmark of Mamba's selective scan (S6) beside the engine's scalar-gate chunk kernel at the same state size.

    PYTHONPATH=src python3 benchmarks/mamba.py --out DIR [--sizes 4096,16384] [--batch B] [--skip-checks]

1. Correctness on the GPU: the registered "mamba" (chunk form) vs its float64 reference (effattn.testing rule,
   fp32 and bf16), and the Triton scan vs the recurrent form (both fp32 on the GPU) at T = 2048, D = 256.
2. Speed, bf16, B = --batch or max(1, 16384 // T): Mamba D_inner = 2048, N = 16 (state 2048 x 16 per sequence)
   beside the engine's chunk_gated_linear_attn with a scalar gate, H = 16, Dk = 16, Dv = 128 (the same 32768-element
   state: Mamba2's layout). triton.testing.do_bench medians of fwd and fwd+bwd; ratios in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton

import effattn  # noqa: F401  (registers every method)
from effattn.linear import chunk_gated_linear_attn, mamba, selective_scan
from effattn.registry import REGISTRY
from effattn.testing import check_method, odd_shapes

D_INNER, N, H, DK, DV = 2048, 16, 16, 16, 128
Fwd, Bwd = selective_scan.FwdConfig, selective_scan.BwdConfig
# the checks run each forward kernel with each backward kernel; the walks in chunks of 32 tokens (2 at T = 37, 64
# at T = 2048) so that the passes between chunks run too. The timing tunes over the library's own candidates.
VARIANTS = {"walk,walk_bwd": ([Fwd("walk", 32, 128, 4, 32)], [Bwd("walk", 32, 1, 32)]),
            "walk,walk_bwd_sub2": ([Fwd("walk", 32, 128, 4, 32)], [Bwd("walk", 32, 1, 32, 2)]),
            "walk,scan_bwd": ([Fwd("walk", 32, 128, 4, 32)], [Bwd("scan", 16, 4)]),
            "scan,scan_bwd": ([Fwd("scan", 32, 8, 4)], [Bwd("scan", 8, 4)])}


def bench(fn):
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=25)


def mamba_inputs(B, T, grad):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    ins = dict(x=r(B, T, D_INNER).bfloat16(), dt=(r(B, T, D_INNER) - 2).bfloat16(), A=-torch.exp(r(D_INNER, N) * 0.5),
               B=r(B, T, N).bfloat16(), C=r(B, T, N).bfloat16(), dt_bias=r(D_INNER) * 0.5)
    for t in ins.values():
        t.requires_grad_(grad)
    return ins


def engine_inputs(B, T, grad):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    ins = dict(q=r(B, T, H, DK).bfloat16(), k=r(B, T, H, DK).bfloat16(), v=r(B, T, H, DV).bfloat16(),
               g=F.logsigmoid(r(B, T, H)))
    for t in ins.values():
        t.requires_grad_(grad)
    return ins


def timed(name, make, run, B, T):
    out = {}
    ins = make(B, T, False)
    with torch.no_grad():
        out["fwd_ms"] = bench(lambda: run(ins))
    ins = make(B, T, True)
    y = run(ins)
    dy = torch.randn_like(y)

    def fwd_bwd():
        for t in ins.values():
            t.grad = None
        run(ins).backward(dy)
    out["fwd_bwd_ms"] = bench(fwd_bwd)
    out["fwd_Mtok_s"] = B * T / out["fwd_ms"] / 1e3
    out["fwd_bwd_Mtok_s"] = B * T / out["fwd_bwd_ms"] / 1e3
    print(f"{name} T={T} B={B}: fwd {out['fwd_ms']:.3f} ms, fwd+bwd {out['fwd_bwd_ms']:.3f} ms", flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--sizes", default="4096,16384")
    p.add_argument("--batch", type=int, default=None, help="sequences per call (default: max(1, 16384 // T))")
    p.add_argument("--skip-checks", action="store_true", help="time only (the checks passed on this GPU before)")
    args = p.parse_args()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "command": "PYTHONPATH=src python3 benchmarks/mamba.py " + " ".join(sys.argv[1:]), "checks": {}, "speed": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mamba_{torch.cuda.get_device_name().split()[1].lower()}.json")
    save = lambda: json.dump(res, open(path, "w"), indent=1)  # noqa: E731
    m = REGISTRY.get("mamba")
    library_configs = selective_scan._configs, selective_scan._bwd_configs
    for dtype in () if args.skip_checks else (torch.float32, torch.bfloat16):
        for variant, (fwd, bwd) in VARIANTS.items():
            selective_scan._configs, selective_scan._bwd_configs = (lambda *s, c=fwd: c), (lambda *s, c=bwd: c)
            r = check_method(m, form="chunk", shape=odd_shapes()[0], dtype=dtype, device="cuda")
            res["checks"][f"reference_{dtype}_{variant}"] = {c.name: [c.error, c.allowed, c.ok] for c in r}
            print(dtype, variant, all(c.ok for c in r), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    big = dict(x=torch.randn(1, 2048, 256, device="cuda", generator=gen),
               dt=torch.randn(1, 2048, 256, device="cuda", generator=gen) - 2,
               A=-torch.exp(torch.randn(256, 16, device="cuda", generator=gen) * 0.5),
               B=torch.randn(1, 2048, 16, device="cuda", generator=gen),
               C=torch.randn(1, 2048, 16, device="cuda", generator=gen))
    selective_scan._configs = lambda *s: [Fwd("walk", 32, 128, 4, 32)]  # noqa: E731  (the walk, 64 chunks)
    y1, h1 = mamba(**big, form="chunk", output_final_state=True)
    y2, h2 = mamba(**big, form="recurrent", output_final_state=True)
    res["checks"]["chunk_vs_recurrent_T2048"] = {"max_rel_y": float((y1 - y2).abs().max() / y2.abs().max()),
                                                 "max_rel_h": float((h1 - h2).abs().max() / h2.abs().max())}
    print(res["checks"]["chunk_vs_recurrent_T2048"], flush=True)
    # the forward's launch plans: calls replayed through the compiled kernels give what the JIT's launches give
    for fwd in ([Fwd("walk", 32, 128, 4, 64)], [Fwd("scan", 32, 8, 4)]):
        selective_scan._configs = lambda *s, c=fwd: c  # noqa: E731
        selective_scan._FWD_PLANS.clear()
        other = {n: t if n == "A" else 0.9 * t for n, t in big.items()}
        first = mamba(**other, form="chunk", output_final_state=True)  # the JIT's launches (a new plan)
        mamba(**big, form="chunk", output_final_state=True)
        again = mamba(**other, form="chunk", output_final_state=True)  # replayed
        same = all(torch.equal(a, b) for a, b in zip(first, again))
        res["checks"][f"replayed_launches_{fwd[0].kernel}"] = same
        print(f"replayed launches ({fwd[0].kernel}) equal the JIT's:", same, flush=True)
    save()
    selective_scan._configs, selective_scan._bwd_configs = library_configs
    scan = lambda i: selective_scan.selective_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], i["dt_bias"])[0]  # noqa
    engine = lambda i: chunk_gated_linear_attn(i["q"], i["k"], i["v"], i["g"], scale=1.0)  # noqa: E731
    for T in (int(s) for s in args.sizes.split(",")):
        B = args.batch or max(1, 16384 // T)
        row = {"T": T, "B": B, "mamba_scan": timed("mamba scan", mamba_inputs, scan, B, T)}
        save()
        row["engine_scalar_gate"] = timed("engine scalar gate", engine_inputs, engine, B, T)
        for k in ("fwd_ms", "fwd_bwd_ms"):
            row[f"ratio_{k}"] = row["mamba_scan"][k] / row["engine_scalar_gate"][k]
        res["speed"].append(row)
        save()
        tune = __import__("effattn.hardware._flash_common", fromlist=["_BEST"])
        res["tuned"] = {str(k): str(v) for k, v in tune._BEST.items() if "mamba" in str(k)}
        res["timings"] = {str(k): {str(c): ms for c, ms in v.items()} for k, v in tune.TIMINGS.items()
                          if "mamba" in str(k)}
        save()


if __name__ == "__main__":
    main()
