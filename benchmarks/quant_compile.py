"""Compile the quantized attention forward (quant_fwd.py) for Hopper (sm_90a) on a machine without a GPU: for
each path and tuner candidate, registers, spills, shared memory and how its tiles reach shared memory.

    python benchmarks/quant_compile.py [--head-dim 64 128] [--json FILE]

A tile the software pipeline takes is copied asynchronously (LDGSTS, cp.async) stages ahead of its use; one it
refuses is loaded by the threads (LDG) and stored to shared memory at the point of use, its latency exposed
on every key block. The pipeline refuses loads narrower than 4 bytes per thread, which is what a load
contiguous along tokens becomes when its mask or its start varies along them. Tensor-core instructions:
HGMMA (16-bit), IGMMA (int8), QGMMA (fp8). It times nothing: the device confirms.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import flash_compile  # noqa: E402  (sets TRITON_INTERPRET=0 and src on the path first)

import torch  # noqa: E402

from effattn.hardware import quant_fwd  # noqa: E402

# path: (Q/K type, V type, P V in fp8)
PATHS = {"sage_int8": ("*i8", "*fp16", False), "sage_int8_fp8pv": ("*i8", "*fp8e4nv", True),
         "flash_fp8": ("*fp8e4nv", "*fp8e4nv", True)}


def rows(dims) -> list[dict]:
    out = []
    for d in dims:
        for path, (qk, v, pv8) in PATHS.items():
            types = dict(Q=qk, K=qk, V=v, QS="*fp32", KS="*fp32", VS="*fp32", O="*bf16", qk_scale="fp32")
            for cfg in quant_fwd.quant_configs(d, pv8, torch.float16):
                bm, bn, warps, stages = cfg[:4]
                consts = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, BLOCK_M=bm, BLOCK_N=bn, PV_FP8=pv8,
                              REVERSE=False, DOT_PREC=None, GRID_ROUND=False, K_SCALAR=True, QK_INT=qk == "*i8",
                              WS=False, AHEAD=bool(cfg[6]), LAZY=bool(cfg[8]) and not pv8)
                consts["sv_t" if pv8 else "sv_d"] = 1  # V's unit stride, which the launcher specialises
                r = flash_compile.report(flash_compile.compile_typed(quant_fwd._quant_fwd_kernel, types, consts,
                                                                     warps, stages))
                out.append({"path": path, "head_dim": d, "tile": (bm, bn), "warps": warps, "stages": stages,
                            "ahead": bool(cfg[6]), "lazy": bool(cfg[8]), **r})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    table = rows(args.head_dim)
    keys = ("ahead", "lazy", "registers", "spill_store_bytes", "shared_bytes", "LDGSTS", "LDG", "HGMMA", "IGMMA",
            "QGMMA", "wgmma_serialized", "loop_instructions", "loop_mufu_in_flight", "loop_LDG", "loop_skippable")
    print("| path | D | tile | warps | stages | " + " | ".join(keys) + " |")
    print("|---" * (5 + len(keys)) + "|")
    for r in table:
        print(f"| {r['path']} | {r['head_dim']} | {r['tile'][0]}x{r['tile'][1]} | {r['warps']} | {r['stages']} | "
              + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        json.dump(table, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
