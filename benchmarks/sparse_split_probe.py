"""BigBird at 8k and 16k (128 x 64 block mask): the work split on and off, alternating twice, fwd and fwd+bwd wall
times, then a torch.profiler trace of five fwd+bwd calls of each (GPU time per kernel): wall against kernel time.

usage: PYTHONPATH=src:benchmarks python3 benchmarks/sparse_split_probe.py OUT.json"""
import json, sys
import torch, triton.testing
import effattn
from effattn.hardware import _flash_split
from effattn.sparse.pattern_methods import SPECS
import sparse as SB
cfg = SB.full_config("cuda")
res = []
for N in (8192, 16384):
    spec = next(s for s in SPECS if s.name == "bigbird")
    pat = spec.build(N, N, cfg.H, **cfg.pattern_options["bigbird"])
    q, k, v = SB.rand(cfg, N)
    bm = pat.block_mask(1, cfg.H, N, N, block=(128, 64), device="cuda")
    call = lambda: effattn.flash_attention(q, k, v, block_mask=bm)
    fb = SB.fwd_bwd(call, q, k, v)
    for units in (None, 1 << 40):  # compile + tune both first
        _flash_split.SPLIT_UNITS = units; fb(); torch.cuda.synchronize()
    for rnd in range(2):
        for mode, units in (("split", None), ("unsplit", 1 << 40)):
            _flash_split.SPLIT_UNITS = units
            r = {"N": N, "round": rnd, "mode": mode, "fwd_ms": triton.testing.do_bench(call, warmup=25, rep=100),
                 "fwd_bwd_ms": triton.testing.do_bench(fb, warmup=25, rep=100)}
            res.append(r); print(json.dumps(r), flush=True)
    for mode, units in (("split", None), ("unsplit", 1 << 40)):
        _flash_split.SPLIT_UNITS = units
        for _ in range(3): fb()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fb()
            torch.cuda.synchronize()
        ks = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "self_device_time_total", 0) > 0:
                t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                if t > 0: ks[e.key[:60]] = round(t / 5 / 1000, 4)
        r = {"N": N, "mode": mode, "profile_ms_per_iter": dict(sorted(ks.items(), key=lambda kv: -kv[1])[:12])}
        res.append(r); print(json.dumps(r), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
