"""Compile the linear family's sequential kernels (walks and state passes) for Hopper (sm_90a) on a machine without a
GPU, and report what bounds a latency-bound loop: for each `scf.for` in the TTGIR, its global loads: synchronous
(`tt.load`: the step waits for it where its value is first used or converted), carried a step ahead (a `tt.load`
whose value the loop yields as loaded), or asynchronous (the software pipeline's copies); and the longest SASS
loop body (instructions, barriers, mma). Registers and spills from ptxas, as in flash_compile.py.

    python benchmarks/walk_compile.py                 # every preset
    python benchmarks/walk_compile.py ttt gsa         # presets whose name contains one of these
    EFFATTN_SRC=/path/to/old/src python benchmarks/walk_compile.py   # the same for another tree (before / after)

A synchronous tile load inside a sequential loop whose value is needed in the same step puts one memory latency
(~0.5-1 us) on every step; loading it a step ahead (a loop-carried register tile) takes it off. Nothing is timed.
"""
from __future__ import annotations

import collections
import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(__file__))

import flash_compile  # noqa: E402  (puts this tree's src first on the path)

if os.environ.get("EFFATTN_SRC"):
    sys.path.insert(0, os.environ["EFFATTN_SRC"])

BF, F32, I32 = "*bf16", "*fp32", "*i32"


def loop_loads(ttgir: str) -> list[list[str]]:
    """Per `scf.for` (innermost first, in the order their regions close), the global loads of its step, those
    in its `scf.if` branches included and its inner loops' not: 'async' (the pipeline's copies), 'ahead' (a
    synchronous load whose value the loop's `scf.yield` carries unconverted to the next step) or 'sync' (used, or
    converted, in the step that issues it)."""
    out, regions = [], []  # regions: [is a loop, its loads, the names its scf.yield carries]
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            is_loop, loads, carried = regions.pop()
            if is_loop:
                out.append(["ahead" if kind == "load" and name in carried else "sync" if kind == "load" else kind
                            for kind, name in loads])
            if text.endswith("{"):  # } else {
                regions.append([False, [], set()])
        elif text.endswith("{"):
            regions.append(["scf.for" in text, [], set()])
        elif "scf.yield" in text and regions:
            regions[-1][2] = set(re.findall(r"%[\w.#]+", text))
        elif "async_copy_global" in text or "tt.load" in text:
            loop = next((r for r in reversed(regions) if r[0]), None)
            if loop is not None:
                loop[1].append(("async", "") if "async_copy_global" in text else ("load", text.split(" = ")[0]))
    return out


def longest_loop(kernel) -> dict:
    """The longest SASS loop body: instruction count and a few instruction kinds in it."""
    ins, loops = flash_compile.sass_loops(flash_compile.sass_of(kernel))
    body = max((ins[lo:hi + 1] for lo, hi in loops), key=len, default=[])
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    return {"loop_instructions": len(body),
            **{f"loop_{op}": ops[op] for op in ("LDG", "LDGSTS", "BAR", "HMMA", "MUFU")}}


def presets() -> dict:
    """name -> (kernel, argument types, constexprs, warps, stages), the bf16 configurations the launchers pick
    at K = V = 64 (D = 64 for TTT, M = 64 slots for gsa)."""
    from effattn.linear import chunk, chunk_bwd, gsa_chunk, ttt_fused

    ttt = dict(H=16, D=64, MB=16, BT=16, BD=64, EPS=1e-6, PREC="bf16", HAS_P0=False)
    walk = {n: F32 for n in ("lw_ptr", "lb_ptr", "c", "w0", "p0", "w_end", "pend", "ws", "dw_end", "dpend", "dk_part",
                             "deta_part", "dg_out", "dw_out", "dp0_part", "dw0", "dp0", "dnorm", "dc_last_out")}
    walk.update(k=BF, v=BF, eta=BF, dk=BF, dv=BF, deta=BF)
    gsa = dict(T="i32", H="i32", K="i32", M="i32", NT="i32", NS="i32", SS="i32", scale="fp32")
    # tokens per super-chunk: this tree's first forward candidate (a constant SUPER in older trees)
    sup = gsa_chunk.FWD_CONFIGS[0][0] if hasattr(gsa_chunk, "FWD_CONFIGS") else gsa_chunk.SUPER
    sub = sup // gsa_chunk.CHUNK  # chunks per super-chunk, as the launchers pass it
    # (the state pass takes S, tokens a step, before 12b8675 and since b70ce89; C and SUB in between)
    states = dict(C=16, SUB=sub, S=sup, BKS=32, SM=32, BM=64, USE_H0=True, DOT_PREC="tf32")
    engine = dict(H=16, K=64, V=64, BT=64, BK=64, BV=32, PREC=None)
    state_fwd = dict(k=BF, u=BF, w=BF, g=F32, h=BF, x=BF, h0=F32, ht=F32, cu=I32, first=I32)
    state_bwd = dict(q=BF, k=BF, w=BF, gc=F32, do=BF, dxi=BF, dx=BF, dh=BF, dht=F32, dh0=F32, cu=I32, first=I32,
                     scale="fp32")
    return {
        "ttt forward walk": (ttt_fused._ttt_fwd_states, walk, ttt, 4, 2),
        "ttt reverse walk": (ttt_fused._ttt_bwd_states, walk, ttt, 8, 3),
        "gsa state pass": (gsa_chunk._gsa_pass1_states, dict(a=BF, b=BF, **{n: F32 for n in (
            "X", "Xb", "Lb", "h0", "ht", "HB", "g")}, **gsa), dict(states, REVERSE=False), 8, 2),
        "gsa reverse state pass": (gsa_chunk._gsa_pass1_states, dict(a=BF, b=F32, **{n: F32 for n in (
            "X", "Xb", "Lb", "h0", "ht", "HB", "g")}, **gsa), dict(states, REVERSE=True), 8, 2),
        "gsa scan": (gsa_chunk._gsa_pass1_scan, dict(
            {n: BF for n in ("q", "k", "s", "g", "p")}, **{n: F32 for n in ("o", "HB")}, **gsa),
            dict(C=16, SUB=sub, BK=64, BM=64, STORE_O=True, DOT_PREC="tf32"), 8, 2),
        "gsa backward walk": (gsa_chunk._gsa_pass1_bwd, dict(
            {n: BF for n in ("q", "k", "s", "g", "dk", "ds")},
            **{n: F32 for n in ("o", "do", "dg", "dg_sum", "DHB")}, **gsa),
            dict(C=16, SUB=sub, BK=64, BM=64, DOT_PREC="tf32"), 8, 2),
        "gsa backward dq walk": (gsa_chunk._gsa_pass1_bwd_dq, dict(
            {n: BF for n in ("k", "s", "g", "dq")}, **{n: F32 for n in ("do", "HB")}, **gsa),
            dict(C=16, SUB=sub, BK=64, BM=64, DOT_PREC="tf32"), 4, 2),
        "engine state_fwd, vector gate": (chunk._state_fwd, state_fwd, dict(
            engine, GATE=2, DELTA=False, USE_H0=False, STORE_HT=True, RAW_G=False), 4, 2),
        "engine state_bwd, vector gate": (chunk_bwd._state_bwd, state_bwd, dict(
            engine, GATE=2, DELTA=False, USE_DHT=True), 4, 2),
        "engine state_bwd, delta rule, scalar gate": (chunk_bwd._state_bwd, state_bwd, dict(
            engine, GATE=1, DELTA=True, USE_DHT=True), 4, 2),
    }


def main() -> None:
    want = sys.argv[1:]
    for name, (fn, types, consts, warps, stages) in presets().items():
        if want and not any(w in name for w in want):
            continue
        # (a preset may name more arguments than a kernel has: one table serves both walks, and older trees)
        types = {n: t for n, t in types.items() if n in fn.arg_names}
        consts = {n: v for n, v in consts.items() if n in fn.arg_names}
        kernel = flash_compile.compile_typed(fn, types, consts, warps, stages)
        r = flash_compile.report(kernel)
        print({"kernel": name, "warps": warps, "stages": stages, "registers": r["registers"],
               "spill_store_bytes": r["spill_store_bytes"], **longest_loop(kernel),
               "loads_per_loop": [dict(collections.Counter(lp)) for lp in loop_loads(kernel.asm["ttgir"])]},
              flush=True)


if __name__ == "__main__":
    main()
