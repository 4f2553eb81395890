"""Compile the flash kernels for sm_90 on a machine without a GPU (Triton ships ptxas) and print each
variant's registers, spills and shared memory: catches compile errors and spills before device time.

    TRITON_INTERPRET=0 PYTHONPATH=src python benchmarks/flash_compile.py
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from effattn.hardware import flash_bwd, flash_fwd  # noqa: E402

FLOATS = {"qk_scale", "cap_in", "cap_out"}
INT_PTRS = {"CU", "KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "Q_NUM", "Q_IDX", "TILE_MAP", "BITS"}
F32_PTRS = {"LSE", "DELTA", "DLSE"}


def compile_one(fn, dtype: str, warps: int, stages: int, descs=None, **const):
    sig = {}
    for n in fn.arg_names:
        if descs and n in descs:
            sig[n] = descs[n]
        elif n in const:
            sig[n] = "constexpr"
        elif n in FLOATS:
            sig[n] = "fp32"
        elif n in INT_PTRS:
            sig[n] = "*i32"
        elif n in F32_PTRS:
            sig[n] = "*fp32"
        elif n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[n] = "*" + dtype
        else:
            sig[n] = "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = k.asm["ptx"]
    return dict(shared=k.metadata.shared, n_regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx)


def main():
    base = dict(VARLEN=False, SPARSE=False, ARITH=False, WORDS=1, SOFTCAP=False, DOT_PREC=None)
    dims = [int(a) for a in sys.argv[1:]] or [128]
    only = os.environ.get("ONLY")
    for D in dims:
        d = dict(HEAD_DIM=D, HEAD_DIM_V=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                 BLOCK_DV=max(16, triton.next_power_of_2(D)))
        for cfg in flash_fwd.fwd_configs(D, None, None):
            bm, bn, warps, stages, tma = cfg
            descs = None
            if tma:
                descs = {n: f"tensordesc<bf16[1,{b},{D}]>" for n, b in (("Q", bm), ("K", bn), ("V", bn), ("O", bm))}
            for extra in (dict(), dict(ARITH=True, REVERSE=True)) + ((dict(SPARSE=True, ARITH=True),) if not tma else ()):
                c = {**base, "REVERSE": False, "TMA": bool(tma), **d, **extra}
                r = compile_one(flash_fwd._flash_fwd_kernel, "bf16", warps, stages, descs, BLOCK_M=bm, BLOCK_N=bn, **c)
                print("fwd", D, cfg, extra, r, flush=True)
        for kind, fn in (("dkdv", flash_bwd._dkdv_kernel), ("dq", flash_bwd._dq_kernel)):
            for cfg in flash_bwd.bwd_configs(D, None, None, kind):
                r = compile_one(fn, "bf16", cfg[2], cfg[3], BLOCK_M=cfg[0], BLOCK_N=cfg[1], **base, **d)
                print(kind, D, cfg, r, flush=True)


if __name__ == "__main__":
    main()
