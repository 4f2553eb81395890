"""Probe: does Triton 3.6's loop warp specialisation (`tl.range(..., warp_specialize=True)`, Config ws=1) compile
and pay off on Hopper for the flash and quantized forwards' unmasked key loop?

    PYTHONPATH=src python3 benchmarks/flash_ws_probe.py --out DIR

Each ws=1 variant is first compiled in a child process under a time limit (a compiler that fails or hangs
costs that child only); the variants that compiled are then timed against ws=0 at N = 16k and their outputs
compared (max |difference| against the ws=0 output, which the regular benchmarks check). Writes ws.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import triton

import effattn

PINS = {("flash", 64): "fwd=128,64,4,3,1,{ws}", ("flash", 128): "fwd=128,128,8,3,1,{ws}",
        ("quant", 64): "quant=128,64,4,3,0,{ws}", ("quant", 128): "quant=128,64,4,3,0,{ws}"}


def op(kind, q, k, v, causal):
    if kind == "flash":
        return effattn.flash_attention(q, k, v, causal=causal)
    return effattn.sage_attention(q, k, v, causal=causal)


def child(spec: str) -> None:
    kind, D, causal = spec.split(",")
    q, k, v = (torch.randn(1, 1024, 16, int(D), device="cuda", dtype=torch.bfloat16) for _ in range(3))
    op(kind, q, k, v, bool(int(causal)))
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    t0 = time.time()
    variants = [(kind, D, c) for (kind, D) in PINS for c in (0, 1)]
    procs = {}
    for kind, D, c in variants:
        for ws in (0, 1):
            env = {**os.environ, "EFFATTN_FLASH_CONFIGS": PINS[(kind, D)].format(ws=ws)}
            procs[(kind, D, c, ws)] = subprocess.Popen(
                ["timeout", "150", sys.executable, __file__, "--child", f"{kind},{D},{c}"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    compiled = {}
    for key, p in procs.items():
        _, err = p.communicate()
        compiled[key] = p.returncode
        if p.returncode:
            print(key, "rc", p.returncode, err.decode()[-600:], flush=True)
    print(f"compiled {time.time() - t0:.0f}s", flush=True)
    rows = []
    for kind, D, c in variants:
        if compiled[(kind, D, c, 1)] or compiled[(kind, D, c, 0)]:
            rows.append(dict(kind=kind, D=D, causal=c, ws_compiled=False, rc=compiled[(kind, D, c, 1)]))
            continue
        N, H = 16384, 16
        q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * H * N * N * D * (0.5 if c else 1)
        res = dict(kind=kind, D=D, causal=c, ws_compiled=True)
        outs = {}
        for ws in (0, 1):
            os.environ["EFFATTN_FLASH_CONFIGS"] = PINS[(kind, D)].format(ws=ws)
            outs[ws] = op(kind, q, k, v, bool(c))
            res[f"ws{ws}_tflops"] = flops / triton.testing.do_bench(lambda: op(kind, q, k, v, bool(c)),
                                                                    return_mode="median") / 1e9
        res["max_abs_diff"] = float((outs[1].float() - outs[0].float()).abs().max())
        res["nan"] = bool(outs[1].isnan().any())
        rows.append(res)
        print(res, flush=True)
    with open(os.path.join(args.out, "ws.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
