"""Probe (GPU): how fast can a backward add float32 dQ tiles into global memory? The single-kernel backward
(FlashAttention-2's: the dK/dV program adds dS K of each tile pair into dQ) lives or dies by this.

    PYTHONPATH=src:benchmarks python3 benchmarks/dq_reduce_probe.py

One program per (key block of 64, head) adds STEPS tiles of [64, 128] float32 into a [T, H * 128] buffer, as a
1024-key window's dK/dV programs would (T = 8192, 17 steps: 1.14 GB) and as dense attention at 16k would (128
steps: 17.2 GB), four ways: plain stores (the bandwidth ceiling, racy), `tl.atomic_add` with its default
acq_rel semantics, with relaxed semantics (sm_90a: vectorised REDG), and a TMA reduce-add of the whole tile
(`tensor_descriptor.atomic_add`, cp.reduce.async.bulk). Prints ms and TB/s of each, and checks that the TMA
reduce adds what the atomics add.
"""
import torch
import triton
import triton.language as tl
import triton.testing

MODES = {0: "store", 1: "atomic acq_rel", 2: "TMA reduce-add", 3: "atomic relaxed"}


@triton.jit
def _add_tiles(DQ, T, H, STEPS, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D)
    val = tl.full([BM, D], 1.0, tl.float32) + pid_n.to(tl.float32)
    if MODE == 2:
        desc = tl.make_tensor_descriptor(DQ, shape=[T, H * D], strides=[H * D, 1], block_shape=[BM, D])
    for j in range(STEPS):
        m0 = (pid_n * BN + j * BM) % T
        offs_m = m0 + tl.arange(0, BM)
        ptrs = DQ + offs_m[:, None] * (H * D) + h * D + offs_d[None, :]
        if MODE == 0:
            tl.store(ptrs, val)
        elif MODE == 1:
            tl.atomic_add(ptrs, val)
        elif MODE == 3:
            tl.atomic_add(ptrs, val, sem="relaxed")
        else:
            desc.atomic_add([m0, h * D], val)
        val = val * 0.5


def main():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    H, D, BM, BN = 16, 128, 64, 64
    for T, steps in ((8192, 17), (16384, 128)):
        dq = torch.zeros(T, H * D, device="cuda", dtype=torch.float32)
        nbytes = (T // BN) * H * steps * BM * D * 4
        for mode in (0, 1, 3, 2):
            for warps in (4, 8):
                def run():
                    _add_tiles[(T // BN, H)](dq, T, H, steps, MODE=mode, BM=BM, BN=BN, D=D, num_warps=warps)
                ms = triton.testing.do_bench(run, warmup=10, rep=100)
                print(f"T {T} steps {steps} {MODES[mode]}, {warps} warps: {ms:.4f} ms, {nbytes / ms / 1e9:.2f} TB/s "
                      f"({nbytes / 1e9:.2f} GB)", flush=True)
    T = 256
    tma, atomic = (torch.zeros(T, H * D, device="cuda") for _ in range(2))
    _add_tiles[(T // BM, H)](tma, T, H, 3, MODE=2, BM=BM, BN=BN, D=D)
    _add_tiles[(T // BM, H)](atomic, T, H, 3, MODE=3, BM=BM, BN=BN, D=D)
    print("TMA reduce-add equals the atomics:", torch.equal(tma, atomic))


if __name__ == "__main__":
    main()
