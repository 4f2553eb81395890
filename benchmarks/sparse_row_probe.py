"""Diagnostic probe (GPU): sparse.py's BigBird row at N (default 8192) in this process, then the tuner's timings of
each kernel configuration, the wall time of the first calls on a fresh mask, the launch-plan cache sizes, a
torch.profiler table of five fwd+bwd calls and a fwd+bwd timing after the tuner's choices are cleared and redone.
Written when one `sparse.py --row bigbird,8192,128` process timed the 128 x 64 tile's fwd+bwd at 4.4 ms against
0.81 ms in sparse_split_probe.py (2026-12-07).

usage: PYTHONPATH=src:benchmarks python3 benchmarks/sparse_row_probe.py [N]"""
import json
import sys
import time

import torch
import triton.testing

import effattn
from effattn.hardware import _flash_common, flash_bwd, flash_fwd
from effattn.sparse.pattern_methods import SPECS
import sparse as SB  # benchmarks/sparse.py

cfg = SB.full_config("cuda")
spec = next(s for s in SPECS if s.name == "bigbird")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
row = SB._pattern_row(cfg, SB.flex_fn(cfg), spec, N, 128)
print(json.dumps({k: (v["fwd_ms"], v["fwd_bwd_ms"]) for k, v in row["by_block"].items()}))
for k, t in _flash_common.TIMINGS.items():
    print(k[:3], {tuple(c)[:4]: round(ms, 4) for c, ms in t.items()})
pat = spec.build(N, N, cfg.H, **SB._sized_options("bigbird", cfg.pattern_options["bigbird"], N))
q, k, v = SB.rand(cfg, N)
bm = pat.block_mask(1, cfg.H, N, N, block=(128, 64), device="cuda")
fb = SB.fwd_bwd(lambda: effattn.flash_attention(q, k, v, block_mask=bm), q, k, v)
n0 = (len(flash_fwd._PLANS), len(flash_bwd._PLANS))
for i in range(3):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fb()
    torch.cuda.synchronize()
    print("call", i, round((time.perf_counter() - t0) * 1e3, 3), "ms", flush=True)
print("plans", n0, (len(flash_fwd._PLANS), len(flash_bwd._PLANS)))
print("again fwd_bwd", triton.testing.do_bench(fb, warmup=25, rep=100))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        fb()
    torch.cuda.synchronize()
for e in prof.key_averages():
    t = getattr(e, "self_device_time_total", 0)
    if t > 0:
        print(e.key[:60], e.count, round(t / 5 / 1000, 4))
_flash_common._BEST.clear()
_flash_common.TIMINGS.clear()
fb()
torch.cuda.synchronize()
print("retuned fwd_bwd", triton.testing.do_bench(fb, warmup=25, rep=100))
for k, t in _flash_common.TIMINGS.items():
    print(k[:3], {tuple(c)[:4]: round(ms, 4) for c, ms in t.items()})
