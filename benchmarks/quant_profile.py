"""Diagnostic probe (GPU): where the quantized forwards' time goes, kernel by kernel, and what the tuner timed.

    PYTHONPATH=src python3 benchmarks/quant_profile.py --out DIR [--n 4096 16384] [--d 64 128]

bf16 inputs, B = 1, H = 16. For each size, causal and not, torch.profiler sums the CUDA time of every kernel
of `sage_int8`, `sage_int8_fp8pv` and `flash_fp8` (the quantisers and the attention kernel) beside our bf16
flash forward, and the wall time of a call (do_bench), so the quantisers' share and any host overhead show.
Writes quant_profile.json with the tuner's timing of every candidate configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from flash_bwd_profile import kernel_ms  # noqa: E402

import effattn  # noqa: E402
from effattn.hardware import _flash_common  # noqa: E402

CALLS = {
    "flash_bf16": lambda q, k, v, c: effattn.flash_attention(q, k, v, causal=c),
    "sage_int8": lambda q, k, v, c: effattn.sage_attention(q, k, v, causal=c),
    "sage_int8_fp8pv": lambda q, k, v, c: effattn.sage_attention(q, k, v, causal=c, pv_dtype="fp8"),
    "flash_fp8": lambda q, k, v, c: effattn.flash_fp8(q, k, v, causal=c),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    torch.manual_seed(0)
    for d in args.d:
        for n in args.n:
            q, k, v = (torch.randn(1, n, 16, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                for name, call in CALLS.items():
                    with torch.no_grad():
                        kernels = kernel_ms(lambda: call(q, k, v, causal))
                        wall = triton.testing.do_bench(lambda: call(q, k, v, causal), warmup=25, rep=100)
                    row = {"D": d, "N": n, "causal": causal, "method": name, "wall_ms": wall, "kernels": kernels}
                    res["rows"].append(row)
                    top = {key[:40]: round(ms, 3) for key, ms in list(kernels.items())[:6]}
                    print(d, n, causal, name, f"wall {wall:.3f} ms", top, flush=True)
                    save(res, args.out)  # after every row: a run cut short keeps what it measured


def save(res: dict, out: str) -> None:
    res["tuner"] = {repr(k): {repr(c): ms for c, ms in v.items()} for k, v in _flash_common.TIMINGS.items()}
    with open(os.path.join(out, "quant_profile.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
