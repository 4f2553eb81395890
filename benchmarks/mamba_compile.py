"""Compile Mamba's forward kernels (selective_scan.py) for Hopper (sm_90a) on a machine without a GPU: registers,
spills, and the instructions each thread issues per state element, the measure that bounds a scan whose every
state element costs one exp.

    python benchmarks/mamba_compile.py [--n 16] [--dtype bf16]

Per (channel, token) the walk updates N state elements with one exp each. Hopper's exp units (MUFU, 16 per SM,
4 per sub-partition) take 8 cycles per warp instruction, and a sub-partition issues one warp instruction per
cycle, so a warp's (channel, token) costs at least max(8 * MUFU, instructions) cycles: the walk is exp-bound
when it issues fewer than 8 instructions per exp. The walk's loop body is the difference between UNROLL = 8 and
UNROLL = 4 builds, per token; the scan's is its whole kernel per state element of a chunk (an upper bound).
It times nothing: the device confirms.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import flash_compile  # noqa: E402  (sets TRITON_INTERPRET=0 and src on the path first)

import triton  # noqa: E402

from effattn.linear import selective_scan  # noqa: E402


def walk_rows(n: int, dtype: str) -> list[dict]:
    types = dict(x=f"*{dtype}", dt=f"*{dtype}", y=f"*{dtype}", dt_bias="*fp32", A_t="*fp32", Bp="*fp32", Cp="*fp32",
                 start="*fp32", hs="*fp32", ends="*fp32", sums="*fp32", ht="*fp32")
    rows = []
    for emit in (False, True):
        for bd, warps in ((128, 4), (64, 2), (256, 8), (256, 4)):
            built = {}
            for unroll in (4, 8):
                consts = dict(BT=32, BD=bd, BN=triton.next_power_of_2(n), UNROLL=unroll, HAS_BIAS=True,
                              USE_START=emit, EMIT=emit, SAVE=emit, STORE_HT=emit)
                kernel = flash_compile.compile_typed(selective_scan._walk_fwd, types, consts, warps)
                built[unroll] = flash_compile.report(kernel)
            per_thread = bd // (32 * warps)  # channels per thread
            per_token = lambda k: (built[8][k] - built[4][k]) / 4 / per_thread  # noqa: E731
            instr, mufu = per_token("instructions"), per_token("MUFU")
            rows.append({"kernel": "walk pass 2 (y)" if emit else "walk pass 1 (end states)", "BD": bd,
                         "warps": warps, "registers": built[4]["registers"],
                         "spill_bytes": built[4]["spill_store_bytes"],
                         "instr_per_state": instr / n, "mufu_per_state": mufu / n,
                         "bound": "exp" if 8 * mufu >= instr else "issue"})
    return rows


def scan_row(n: int, dtype: str) -> dict:
    types = dict(x=f"*{dtype}", dt=f"*{dtype}", y=f"*{dtype}", Bm=f"*{dtype}", Cm=f"*{dtype}", dt_bias="*fp32",
                 A="*fp32", h0="*fp32", hs="*fp32", ht="*fp32")
    bt, bd, warps = 32, 8, 4  # the H100's tuned scan (benchmarks/results/mamba.md)
    consts = dict(BT=bt, BD=bd, BN=triton.next_power_of_2(n), HAS_BIAS=True, USE_H0=True, SAVE=True, STORE_HT=True)
    r = flash_compile.report(flash_compile.compile_typed(selective_scan._scan_fwd, types, consts, warps))
    states = bt * bd * n / (32 * warps)  # state elements per thread per chunk
    return {"kernel": "scan (one chunk per loop trip)", "BD": bd, "warps": warps, "registers": r["registers"],
            "spill_bytes": r["spill_store_bytes"], "instr_per_state": r["instructions"] / states,
            "mufu_per_state": r["MUFU"] / states, "bound": "exp" if 8 * r["MUFU"] >= r["instructions"] else "issue"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16, help="state size N per channel")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = walk_rows(args.n, args.dtype) + [scan_row(args.n, args.dtype)]
    print("| kernel | BD | warps | registers | spill bytes | instructions / state element | exps / state element "
          "| bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['BD']} | {r['warps']} | {r['registers']} | {r['spill_bytes']} | "
              f"{r['instr_per_state']:.2f} | {r['mufu_per_state']:.2f} | {r['bound']} |")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
