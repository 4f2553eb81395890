"""Diagnostic probe (GPU): where Mamba's fwd+bwd time goes, per kernel (torch.profiler), at B = 1 and the lengths
given, with the library's tuned kernels; then the tuner's choices.

    PYTHONPATH=src:benchmarks python3 benchmarks/mamba_profile.py 16384 65536

The inputs are benchmarks/mamba.py's (D_inner = 2048, N = 16, bf16). Prints one do_bench median of the fwd+bwd
call and, per kernel, its launches per call and GPU milliseconds per call (3 calls profiled)."""
import sys

import torch
import triton.testing

import mamba as MB
from effattn.hardware import _flash_common
from effattn.linear import selective_scan


def main(sizes):
    for T in sizes:
        ins = MB.mamba_inputs(1, T, True)

        def fwd_bwd():
            y, _ = selective_scan.selective_scan(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], ins["dt_bias"])
            y.backward(torch.ones_like(y))
            for t in ins.values():
                t.grad = None
        fwd_bwd()
        torch.cuda.synchronize()
        print("T", T, "fwd+bwd ms", triton.testing.do_bench(fwd_bwd, warmup=5, rep=50), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd()
            torch.cuda.synchronize()
        for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))[:12]:
            t = getattr(e, "self_device_time_total", 0)
            if t > 0:
                print("  ", e.key[:70], e.count // 3, round(t / 3 / 1000, 4), "ms")
    for k, v in _flash_common._BEST.items():
        if "mamba" in str(k[0]):
            print(k, v)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16384])
