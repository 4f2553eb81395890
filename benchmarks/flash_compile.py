"""Compile the flash kernels for Hopper (sm_90a) on a machine without a GPU and report what ptxas says.

    python benchmarks/flash_compile.py --kernel fwd --tile 128,64 --warps 8 --stages 3 --sparse   # one config
    python benchmarks/flash_compile.py --candidates --head-dim 64 128     # every pointer-load tuner candidate

Triton's wheel carries ptxas and cuobjdump, so a kernel configuration's registers, spills, shared memory
and instruction mix can be read here, for free, before spending device time on it (2026-12-02: the
block-sparse forward's per-score bitmask gather showed up as 102 asynchronous copies and 131 KB of shared
memory, against 46 and 99 KB with one load per row). It times nothing and cannot catch faults that only
the GPU shows. `EFFATTN_SRC=<tree>/src` compiles another tree's kernels (an A/B of two commits).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (effattn turns the interpreter on without a GPU)
sys.path.insert(0, os.environ.get("EFFATTN_SRC", os.path.join(os.path.dirname(__file__), "..", "src")))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_SCALARS = {"T", "S", "H", "HKV", "GROUP", "LEFT", "RIGHT", "SINKS", "KV_GRID", "SINK_SPLIT", "SINK_ROWS", "MB_B",
            "MB_H", "HM", "NQB", "NKB", "NPARTS", "NBH"}
_INT_TABLES = {"CU", "KV_NUM", "KV_IDX", "Q_NUM", "Q_IDX", "FULL_NUM", "FULL_IDX", "TILE_MAP", "BITS", "FLAGS", "PARTS"}
_FP32 = {"LSE", "DELTA", "DLSE", "SINK_DK", "SINK_DV", "O_PART", "LSE_PART", "DQ_PART", "DK_PART", "DV_PART"}


def _signature(fn, constexprs: dict, descriptors: dict | None = None) -> dict:
    """Triton types of a flash kernel's arguments: upper-case names are tensors (int32 tables, float32
    statistics, bf16 data, or TMA descriptors where `descriptors` names a type), the rest 32-bit integers
    except the float scales."""
    sig = {}
    for name in fn.arg_names:
        if descriptors and name in descriptors:
            sig[name] = descriptors[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_TABLES:
            sig[name] = "*i32"
        elif name in _FP32:
            sig[name] = "*fp32"
        elif name.isupper() and name not in _SCALARS:
            sig[name] = "*bf16"
        elif name in ("qk_scale", "cap_in", "cap_out"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_sm90(fn, constexprs: dict, warps: int, stages: int, descriptors: dict | None = None, regs: int = 0):
    sig = _signature(fn, constexprs, descriptors)
    # As the launcher specialises them on the GPU: pointers 16-byte aligned, strides multiples of 16 (without
    # these hints the compiler cannot prove the alignment that asynchronous copies need, and does not pipeline)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if sig[name].startswith("*") or (sig[name] == "i32" and name.startswith("s"))}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=aligned)
    options = {"num_warps": warps, "num_stages": stages} | ({"maxnreg": regs} if regs else {})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_typed(fn, types: dict, constexprs: dict, warps: int, stages: int = 1, multiples_of_16=()):
    """Compile any kernel for sm_90a: `types` gives the Triton type of each non-constexpr argument (default
    i32). As the launcher specialises them on the GPU: pointers are 16-byte aligned, and integers named s*
    (strides) or listed in `multiples_of_16` are multiples of 16 unless the kernel says `do_not_specialize`;
    integer arguments equal to 1 belong in `constexprs`."""
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    fixed = {fn.arg_names[a] if isinstance(a, int) else a for a in getattr(fn, "do_not_specialize", ())}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if sig[n].startswith("*") or (sig[n] == "i32" and (n.startswith("s") or n in multiples_of_16)
                                             and n not in fixed)}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def sass_of(kernel) -> str:
    """The compiled kernel's SASS (cuobjdump of its cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(kernel.asm["cubin"])
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout


def report(kernel) -> dict:
    """Registers and spill bytes (ptxas -v), whether ptxas serialized the wgmma instructions, shared memory,
    counts of a few SASS instruction kinds, and the main loop's shape (`mma_loop`)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        open(ptx, "w").write(kernel.asm["ptx"])
        info = subprocess.run([os.path.join(_BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                              capture_output=True, text=True).stderr
    sass = sass_of(kernel)
    ops = collections.Counter(m.group(2) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", sass))
    loop = mma_loop(sass)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": kernel.metadata.shared, "instructions": sum(ops.values()),
            # ptxas C7515 / C7510...: it waits for each wgmma before the next (no tensor-core pipelining)
            "wgmma_serialized": "wgmma.mma_async instructions are serialized" in info,
            **{op: ops[op] for op in ("LDG", "LDGSTS", "UTMALDG", "HGMMA", "IGMMA", "QGMMA", "MUFU", "BAR")}, **loop}


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """The SASS instructions in order, as (address, text)."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def sass_loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The SASS instructions (text, in order) and every loop as (first, last) indices into them: a backward
    branch and its target."""
    ins = sass_instructions(sass)
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in index:
            loops.append((index[int(target.group(1), 16)], i))
    return [t for _, t in ins], loops


def mma_loop(sass: str) -> dict:
    """The main tensor-core loop (an innermost loop body, between a backward branch and its target, holding
    the most wgmma instructions; of those, the shortest, the unmasked one): its instruction count, and how
    many of its MUFU instructions (exp2) issue while a wgmma is in flight, i.e. after a wgmma and before the
    wait (WARPGROUP.DEPBAR) that follows it. A loop that waits for Q K^T before its softmax has none; one
    that issues the next block's Q K^T first has its exponentials overlap the tensor cores. loop_LDG:
    synchronous global loads in it (tiles the software pipeline refused, or scalars). loop_skippable: the most
    instructions one conditional forward branch in it jumps over (a lazy rescale's skipped block)."""
    ins, loops = sass_loops(sass)
    addr = [a for a, _ in sass_instructions(sass)]

    def mmas_in(lo, hi):
        return sum("GMMA" in t for t in ins[lo:hi + 1])

    best = None
    for lo, hi in loops:
        if any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) and mmas_in(lo2, hi2) for lo2, hi2 in loops):
            continue  # an outer loop (e.g. over the heads of a KV group): its inner tile loops are the ones to read
        body = ins[lo:hi + 1]  # (inner loops without wgmma, e.g. a TMA barrier's spin, stay in)
        mmas = mmas_in(lo, hi)
        if mmas and (best is None or (mmas, -len(body)) > (best[0], -len(best[1]))):
            best = (mmas, body, lo, hi)  # the unmasked loop: the shortest of those with the most wgmma
    if best is None:
        return {"loop_instructions": 0, "loop_mufu_in_flight": 0, "loop_LDG": 0, "loop_skippable": 0}
    lo, hi = best[2], best[3]
    skip = 0
    for i in range(lo, hi + 1):
        jump = re.match(r"@!?P\d+ BRA.*?0x([0-9a-f]+)", ins[i])
        if jump and addr[i] < int(jump.group(1), 16) <= addr[hi]:
            skip = max(skip, addr.index(int(jump.group(1), 16)) - i - 1)
    in_flight, overlapped = False, 0
    for t in best[1]:
        if "GMMA" in t:
            in_flight = True
        elif "WARPGROUP.DEPBAR" in t:
            in_flight = False
        elif "MUFU" in t and in_flight:
            overlapped += 1
    loads = sum(t.split()[0 if not t.startswith("@") else 1].startswith("LDG.") for t in best[1])
    return {"loop_instructions": len(best[1]), "loop_mufu_in_flight": overlapped, "loop_LDG": loads,
            "loop_skippable": skip}


def _constexprs(kernel: str, bm: int, bn: int, d: int, sparse: bool, tma: bool, mask_m: int, ahead: bool = False,
                mask_n: int | None = None, sink_parts: bool = False, split: bool = False, lazy: bool = False) -> dict:
    mask_n = bn if mask_n is None else mask_n
    common = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, BLOCK_M=bm, BLOCK_N=bn, VARLEN=False,
                  SPARSE=sparse, ARITH=not sparse, WORDS=max(1, mask_n // 32), SOFTCAP=False, DOT_PREC=None,
                  SPLIT=split)
    if kernel == "fwd":
        return dict(common, REVERSE=False, TMA=tma, WS=False, AHEAD=ahead, MASK_M=mask_m, MASK_N=mask_n,
                    LAZY=lazy)
    if kernel == "dkdv":
        return dict(common, MASK_M=mask_m, EARLY_DP=ahead, SINK_PARTS=sink_parts, TMA=tma)
    return dict(common, MASK_N=mask_n, HAS_DLSE=False)


def _kernel_fn(kernel: str):
    from effattn.hardware import flash_bwd, flash_fwd
    return {"fwd": flash_fwd._flash_fwd_kernel, "dkdv": flash_bwd._dkdv_kernel, "dq": flash_bwd._dq_kernel}[kernel]


def one(kernel: str, bm: int, bn: int, warps: int, stages: int, d: int, sparse: bool, tma: bool = False,
        mask_m: int | None = None, ahead: bool = False, mask_n: int | None = None,
        sink_parts: bool = False, split: bool = False, regs: int = 0, lazy: bool = False) -> dict:
    """Compile one configuration; `tma`: Q, K, V, O (forward) or Q, dO (dK/dV) as [B, N, H * D] descriptors;
    `regs`: a register cap per thread (Config's, ptx .maxnreg; 0: none);
    `mask_m` (block-sparse forward and dK/dV): the block mask's query rows, of which a program takes bm
    (forward) or walks them bm at a time (dK/dV) (default bm); `mask_n` (block-sparse forward and dQ): its key
    columns, walked bn at a time (default bn); `ahead`:
    the forward's unmasked loop issues the next block's Q K^T before this block's softmax, dK/dV issues
    dP^T before its exponentials (EARLY_DP); `sink_parts` (dK/dV): the attention sinks' rows split over extra
    programs (SINK_PARTS); `split` (block-sparse): the long walks' part programs (SPLIT)."""
    if tma and kernel == "dq":
        raise ValueError("dQ has no TMA variant")
    if sink_parts and (kernel != "dkdv" or sparse):
        raise ValueError("only the dense dK/dV kernel splits the sinks' rows")
    if split and not sparse:
        raise ValueError("only block-sparse launches split long walks")
    if ahead and kernel == "dq":
        raise ValueError("dQ has no look-ahead variant")
    mask_m = bm if mask_m is None else mask_m
    tiles = (("Q", bm), ("K", bn), ("V", bn), ("O", bm)) if kernel == "fwd" else (("Q", bm), ("DO", bm))
    descs = {n: f"tensordesc<bf16[1,{b},{d}]>" for n, b in tiles} if tma else None
    compiled = compile_sm90(_kernel_fn(kernel), _constexprs(kernel, bm, bn, d, sparse, tma, mask_m, ahead, mask_n,
                                                            sink_parts, split, lazy), warps, stages, descs, regs)
    return {"kernel": kernel, "tile": (bm, bn), "mask_rows": mask_m if kernel != "dq" else None,
            "mask_cols": (mask_n or bn) if kernel != "dkdv" else None, "warps": warps,
            "stages": stages, "head_dim": d, "sparse": sparse, "tma": tma, "ahead": ahead, "sink_parts": sink_parts,
            "split": split, "regs": regs, "lazy": lazy, **report(compiled)}


def candidates(dims):
    """Every candidate of the bf16 tuner lists (dense; block-sparse at 128 x 64 and 128 x 128 block masks)."""
    import torch

    from effattn.hardware import flash_bwd, flash_fwd
    for d in dims:
        for cfg in flash_fwd.fwd_configs(d, torch.bfloat16, None):
            print(one("fwd", cfg[0], cfg[1], cfg[2], cfg[3], d, False, bool(cfg[4]), ahead=bool(cfg[6]), regs=cfg[7],
                      lazy=bool(cfg[8])), flush=True)
        for mask in ((128, 64), (128, 128)):
            for cfg in flash_fwd.fwd_configs(d, torch.bfloat16, mask):
                print(one("fwd", cfg[0], cfg[1], cfg[2], cfg[3], d, True, bool(cfg[4]), mask_m=mask[0],
                          ahead=bool(cfg[6]), mask_n=mask[1]), flush=True)
        for kind in ("dkdv", "dq"):
            for cfg in flash_bwd.bwd_configs(d, torch.bfloat16, None, kind):
                print(one(kind, cfg[0], cfg[1], cfg[2], cfg[3], d, False, bool(cfg[4]), ahead=bool(cfg[6]),
                          regs=cfg[7]), flush=True)
            for mask in ((128, 64), (128, 128)):
                for cfg in flash_bwd.bwd_configs(d, torch.bfloat16, mask, kind):
                    print(one(kind, cfg[0], cfg[1], cfg[2], cfg[3], d, True, mask_m=mask[0], ahead=bool(cfg[6]),
                              mask_n=mask[1]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("fwd", "dkdv", "dq"), default="fwd")
    ap.add_argument("--tile", default="128,64", help="BLOCK_M,BLOCK_N")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--head-dim", type=int, nargs="+", default=[128])
    ap.add_argument("--sparse", action="store_true", help="the block-sparse variant (index lists, bitmasks)")
    ap.add_argument("--tma", action="store_true", help="fwd, dkdv: TMA descriptor loads (Q, K, V, O; Q, dO)")
    ap.add_argument("--ahead", action="store_true",
                    help="fwd: next block's Q K^T before this softmax; dkdv: dP^T before the exponentials")
    ap.add_argument("--mask-rows", type=int, default=None,
                    help="block-sparse fwd / dkdv: the block mask's query rows, BLOCK_M a program / a step "
                         "(default BLOCK_M)")
    ap.add_argument("--mask-cols", type=int, default=None,
                    help="block-sparse fwd / dq: the block mask's key columns, walked BLOCK_N at a time "
                         "(default BLOCK_N)")
    ap.add_argument("--sink-parts", action="store_true",
                    help="dkdv: the attention sinks' rows below the band split over extra programs")
    ap.add_argument("--split", action="store_true",
                    help="block-sparse: the long walks split over part programs (the launches' SPLIT variant)")
    ap.add_argument("--regs", type=int, default=0, help="a register cap per thread (ptx .maxnreg; 0: none)")
    ap.add_argument("--lazy", action="store_true", help="fwd: the running max moves only past a growth threshold")
    ap.add_argument("--candidates", action="store_true", help="every tuner candidate instead of one config")
    a = ap.parse_args()
    if a.candidates:
        candidates(a.head_dim)
        return
    bm, bn = (int(x) for x in a.tile.split(","))
    print(one(a.kernel, bm, bn, a.warps, a.stages, a.head_dim[0], a.sparse, a.tma, a.mask_rows, a.ahead,
              a.mask_cols, a.sink_parts, a.split, a.regs, a.lazy))


if __name__ == "__main__":
    main()
