"""Compile Mamba's kernels (selective_walk.py, selective_scan.py) for Hopper (sm_90a) on a machine without a GPU:
registers, spills, barriers, and the instructions each thread issues per state element, the measure that bounds a
scan whose every state element costs an exp.

    python benchmarks/mamba_compile.py [--n 16] [--dtype bf16] [--json FILE]

Integer arguments are compiled as the launcher specialises them at the benchmark's shapes (multiples of 16),
except those a kernel marks `do_not_specialize`. Hopper's exp units (MUFU, 16 per SM, 4 per sub-partition)
take 8 cycles per warp instruction and a sub-partition issues one warp instruction per cycle, so a warp spends
at least max(instructions, 8 x exps) cycles per state element: "exp"-bound or "issue"-bound below. Per element:
- walk forward passes and the backward's carry pass: the difference between UNROLL = 8 and 4 builds, per token;
- the walk backward: the whole kernel over its two loop bodies (SUB tokens each), an upper bound;
- the chunk chain (`_pass_states`): the whole kernel over one group of chunks, an upper bound;
- the scan kernels: the whole kernel over one chunk, an upper bound.
BAR counts barriers in the whole kernel (a layout change through shared memory costs one). It times nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import flash_compile  # noqa: E402  (sets TRITON_INTERPRET=0 and src on the path first)

import triton  # noqa: E402

from effattn.linear import selective_scan, selective_walk  # noqa: E402

INTS = ("T", "D", "N", "TC", "TP", "NC")  # multiples of 16 at the benchmark's shapes


def _build(fn, types, consts, warps) -> dict:
    return flash_compile.report(flash_compile.compile_typed(fn, types, consts, warps, multiples_of_16=INTS))


def _row(kernel, bd, warps, r, instr, mufu, n) -> dict:
    return {"kernel": kernel, "BD": bd, "warps": warps, "registers": r["registers"],
            "spill_bytes": r["spill_store_bytes"], "BAR": r["BAR"], "instr_per_state": instr / n,
            "mufu_per_state": mufu / n, "bound": "exp" if 8 * mufu >= instr else "issue"}


def walk_rows(n: int, dtype: str) -> list[dict]:
    bn = triton.next_power_of_2(n)
    types = dict(x=f"*{dtype}", dt=f"*{dtype}", y=f"*{dtype}", dy=f"*{dtype}", dx=f"*{dtype}")
    types.update({name: "*fp32" for name in ("dt_bias", "A_t", "Bp", "Cp", "start", "hs", "ends", "sums", "ht", "carry",
                                             "ddt", "dA", "dB", "dC", "dh0", "ckpt")})
    rows = []
    for bd, warps in ((128, 4), (64, 2), (32, 1)):
        per_thread = bd // (32 * warps)  # channels per thread
        kernels = [("walk fwd pass 1 (end states)", selective_walk._walk_fwd,
                    dict(BT=32, BD=bd, BN=bn, HAS_BIAS=True, USE_START=False, EMIT=False, SAVE=False, STORE_HT=False)),
                   ("walk fwd pass 2 (y)", selective_walk._walk_fwd,
                    dict(BT=32, BD=bd, BN=bn, HAS_BIAS=True, USE_START=True, EMIT=True, SAVE=True, STORE_HT=True)),
                   ("walk bwd carries", selective_walk._walk_carry, dict(BD=bd, BN=bn, HAS_BIAS=True))]
        for name, fn, consts in kernels:
            built = {u: _build(fn, types, dict(consts, UNROLL=u), warps) for u in (4, 8)}
            diff = lambda k: (built[8][k] - built[4][k]) / 4 / per_thread  # noqa: E731  (per channel and token)
            rows.append(_row(name, bd, warps, built[4], diff("instructions"), diff("MUFU"), n))
        for sub, defer in ((4, False), (2, False), (4, True), (2, True)):
            if defer and bd != 32:  # deferred stores: a 32-channel walk's option (the tuner lists SUB = 2's)
                continue
            r = _build(selective_walk._walk_bwd, types, dict(BT=32, BD=bd, BN=bn, SUB=sub, HAS_BIAS=True,
                                                             USE_CARRY=True, STORE_DH0=False, EMULATE=False,
                                                             LANES=bd == 32 and warps == 1 and bn <= 32, DEFER=defer),
                       warps)
            steps = sub * per_thread  # (channel, token) pairs a thread handles per trip of each loop body
            name = f"walk bwd, SUB = {sub}{', stores deferred' if defer else ''} (bound: whole kernel)"
            rows.append(_row(name, bd, warps, r, r["instructions"] / steps, r["MUFU"] / steps, n))
    return rows


def chain_rows(n: int) -> list[dict]:
    """`_pass_states` (the scan over chunks that chains the walks) at the launcher's tile; per state element and
    chunk: each thread holds GROUP x BLOCK / (32 x warps) of them per group."""
    from effattn.linear.selective_scan import PASS_TILE
    tile = dict(PASS_TILE)
    warps = tile.pop("num_warps")
    types = {name: "*fp32" for name in ("A_t", "ends", "sums", "h0", "start")}
    r = _build(selective_walk._pass_states, types, dict(tile, USE_H0=True), warps)
    per_thread = tile["GROUP"] * tile["BLOCK"] / (32 * warps)
    return [_row("chunk chain (whole kernel)", tile["BLOCK"], warps, r, r["instructions"] / per_thread * n,
                 r["MUFU"] / per_thread * n, n)]


def scan_rows(n: int, dtype: str) -> list[dict]:
    bn = triton.next_power_of_2(n)
    types = dict(x=f"*{dtype}", dt=f"*{dtype}", y=f"*{dtype}", Bm=f"*{dtype}", Cm=f"*{dtype}", dy=f"*{dtype}",
                 dx=f"*{dtype}")
    types.update({name: "*fp32" for name in ("dt_bias", "A", "h0", "hs", "ht", "dht", "ddt", "dA", "dB", "dC", "dh0")})
    bt, bd, warps = 32, 8, 4  # the H100's tuned scan (benchmarks/results/mamba.md)
    states = bt * bd * n / (32 * warps) / n  # (channel, token) pairs per thread per chunk
    fwd = _build(selective_scan._scan_fwd, types, dict(BT=bt, BD=bd, BN=bn, HAS_BIAS=True, USE_H0=True, SAVE=True,
                                                       STORE_HT=True), warps)
    bwd = _build(selective_scan._scan_bwd, types, dict(BT=bt, BD=bd, BN=bn, HAS_BIAS=True, USE_DHT=False,
                                                       STORE_DH0=False), warps)
    return [_row("scan fwd (bound: whole kernel)", bd, warps, fwd, fwd["instructions"] / states, fwd["MUFU"] / states,
                 n),
            _row("scan bwd (bound: whole kernel)", bd, warps, bwd, bwd["instructions"] / states, bwd["MUFU"] / states,
                 n)]


def shuffle_layouts(n: int, sub: int, defer: bool = False) -> list[str]:
    """The register layouts (TTGIR) of the walk backward's lane shuffles (`_lane_sums`) as compiled for sm_90a at
    32 channels a warp: their inline PTX exchanges physical lanes, so each must map lane bit i to channel bit i."""
    types = {name: "*fp32" for name in ("dt_bias", "A_t", "Bp", "Cp", "hs", "carry", "ddt", "dA", "dB", "dC", "dh0",
                                        "ckpt")}
    types.update(x="*bf16", dt="*bf16", dy="*bf16", dx="*bf16")
    kernel = flash_compile.compile_typed(selective_walk._walk_bwd, types,
                                         dict(BT=32, BD=32, BN=triton.next_power_of_2(n), SUB=sub, HAS_BIAS=True,
                                              USE_CARRY=True, STORE_DH0=False, LANES=True, EMULATE=False,
                                              DEFER=defer), 1,
                                         multiples_of_16=INTS)
    ttgir = kernel.asm["ttgir"]
    layouts = dict(re.findall(r"^#(\w+) = (#ttg\.\w+<.*>)$", ttgir, re.M))
    return [layouts[m] for m in re.findall(r"elementwise_inline_asm \"shfl[^\n]*-> tensor<[^,]+, #(\w+)>", ttgir)]


def lanes_are_channels(layout: str) -> bool:
    """A one-warp `[rows, 32]` layout whose lane l holds column l (linear: lane bases (0, 2^i); blocked: 32
    threads along the columns, one column each)."""
    return ("lane = [[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]]" in layout or
            bool(re.search(r"sizePerThread = \[\d+, 1\], threadsPerWarp = \[1, 32\]", layout)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16, help="state size N per channel")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--json", default=None)
    p.add_argument("--check-lanes", action="store_true",
                   help="only check that the walk backward's shuffles see lane l = channel l (exit 1 if not)")
    args = p.parse_args()
    if args.check_lanes:
        found = [lay for sub, defer in ((2, False), (4, False), (2, True))
                 for lay in shuffle_layouts(args.n, sub, defer)]
        bad = [lay for lay in found if not lanes_are_channels(lay)]
        print(f"{len(found)} shuffles, {len(bad)} with lanes off the channels", *bad, sep="\n")
        sys.exit(1 if bad or not found else 0)
    rows = walk_rows(args.n, args.dtype) + chain_rows(args.n) + scan_rows(args.n, args.dtype)
    print("| kernel | BD | warps | registers | spill bytes | BAR | instructions / state element | exps / state element "
          "| bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['BD']} | {r['warps']} | {r['registers']} | {r['spill_bytes']} | {r['BAR']} | "
              f"{r['instr_per_state']:.2f} | {r['mufu_per_state']:.2f} | {r['bound']} |")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
