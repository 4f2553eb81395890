"""Compile the flash kernels for Hopper (sm_90a) on a machine without a GPU and report what ptxas says.

    TRITON_INTERPRET=0 python benchmarks/sm90_offline.py --kernel fwd --tile 128,64 --warps 8 --stages 3 --sparse
    TRITON_INTERPRET=0 python benchmarks/sm90_offline.py --kernel dkdv --tile 128,128 --warps 8 --stages 2 --sparse

Triton's wheel carries ptxas and cuobjdump, so a kernel configuration's registers, spills, shared memory
and instruction mix can be read here, for free, before spending device time on it (2026-12-02: the
block-sparse forward's bitmask gather showed up as 74 LDGSTS and 82 KB of shared memory against 18 and
49 KB). It does not time anything and does not catch faults that only the GPU shows.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "0")  # compile, do not interpret (effattn turns it on without a GPU)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_SCALARS = {"T", "S", "H", "HKV", "GROUP", "LEFT", "RIGHT", "MB_B", "MB_H", "HM", "NQB", "NKB"}
_INT_TABLES = {"CU", "KV_NUM", "KV_IDX", "Q_NUM", "Q_IDX", "FULL_NUM", "FULL_IDX", "TILE_MAP", "BITS"}
_FP32 = {"LSE", "DELTA", "DLSE"}


def _signature(fn, constexprs: dict) -> dict:
    """Triton types of a flash kernel's arguments: upper-case names are tensors (int32 tables, float32
    statistics, bf16 data), the rest 32-bit integers except the float scales."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
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


def compile_sm90(fn, constexprs: dict, warps: int, stages: int):
    src = ASTSource(fn, _signature(fn, constexprs),
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs={})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def report(kernel) -> dict:
    """Registers and spill bytes (ptxas -v), shared memory, and counts of a few SASS instruction kinds."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        open(ptx, "w").write(kernel.asm["ptx"])
        open(cubin, "wb").write(kernel.asm["cubin"])
        info = subprocess.run([os.path.join(_BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    ops = collections.Counter(m.group(2) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", sass))
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": kernel.metadata.shared, "instructions": sum(ops.values()),
            **{op: ops[op] for op in ("LDG", "LDGSTS", "UTMALDG", "HGMMA", "MUFU", "BAR")}}


def main():
    from effattn.hardware.flash_bwd import _dkdv_kernel, _dq_kernel
    from effattn.hardware.flash_fwd import _flash_fwd_kernel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("fwd", "dkdv", "dq"), default="fwd")
    ap.add_argument("--tile", default="128,64", help="BLOCK_M,BLOCK_N")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sparse", action="store_true", help="the block-sparse variant (index lists, bitmasks)")
    a = ap.parse_args()
    bm, bn = (int(x) for x in a.tile.split(","))
    d = a.head_dim
    common = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_D=d, BLOCK_DV=d, BLOCK_M=bm, BLOCK_N=bn, VARLEN=False,
                  SPARSE=a.sparse, ARITH=not a.sparse, WORDS=max(1, bn // 32), SOFTCAP=False, DOT_PREC=None)
    if a.kernel == "fwd":  # pointer loads (TMA variants take descriptor arguments, not modelled here)
        fn, consts = _flash_fwd_kernel, dict(common, REVERSE=False, TMA=False, WS=False)
    else:
        fn, consts = (_dkdv_kernel if a.kernel == "dkdv" else _dq_kernel), common
    kernel = compile_sm90(fn, consts, a.warps, a.stages)
    print({"kernel": a.kernel, "tile": (bm, bn), "warps": a.warps, "stages": a.stages, "head_dim": d,
           "sparse": a.sparse, **report(kernel)})


if __name__ == "__main__":
    main()
