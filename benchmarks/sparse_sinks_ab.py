"""A/B of the sinks' dK/dV row split and the grid patterns' tile order, on the GPU: where the tree has the split
(flash_bwd.SINK_PART_ROWS), its gradients beside the unsplit walk against float64 at N = 4096; then fwd / fwd+bwd of
neighborhood 2D (16k; a tree without tile order runs its raster block mask, built before timing), StreamingLLM
and Longformer (16k, 32k) through pattern_attention, and compiled Flex with the same mask if argv[2] == 'flex'.

usage: PYTHONPATH=<tree>/src:benchmarks python3 benchmarks/sparse_sinks_ab.py OUT.json [flex]"""
import json
import os
import sys
import time

import torch
import triton.testing

import effattn
from effattn.hardware import flash_bwd
from effattn.hardware.flash import flash_reference
from effattn.sparse.pattern_methods import longformer_pattern, pattern_attention, streaming_llm_pattern

out, with_flex = sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "flex"
H, D = 16, 128
res = {"src": effattn.__file__, "gpu": torch.cuda.get_device_name(), "checks": [], "rows": []}


def save():
    json.dump(res, open(out, "w"), indent=1)


def rand(N, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, N, H, D, generator=g).to("cuda", dtype).requires_grad_() for _ in range(3)]


if hasattr(flash_bwd, "SINK_PART_ROWS"):
    for name, opts in (("streaming", dict(window=(1024, 0), causal=True, sink_tokens=64)),
                       ("noncausal", dict(window=(512, 512), sink_tokens=16))):
        N = 4096
        q, k, v = rand(N, 1)
        g = torch.randn(1, N, H, D, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
        x = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = flash_reference(*x, **opts)
        ref.backward(g.double())
        errs = {}
        for label, rows in (("split", 1024), ("whole", 1 << 30)):
            flash_bwd.SINK_PART_ROWS = rows
            flash_bwd._PLANS.clear()
            for t in (q, k, v):
                t.grad = None
            o = effattn.flash_attention(q, k, v, **opts)
            o.backward(g)
            errs[label] = {"o": float((o.double() - ref).abs().max())}
            for n, a, b in zip("qkv", (q, k, v), x):
                errs[label]["d" + n] = float((a.grad.double() - b.grad).abs().max())
                errs[label]["d" + n + "_sinks"] = float((a.grad.double() - b.grad)[:, :64].abs().max())
        flash_bwd.SINK_PART_ROWS = 1024
        flash_bwd._PLANS.clear()
        ok = all(errs["split"][m] <= 1.5 * errs["whole"][m] + 1e-3 for m in errs["split"])
        res["checks"].append({"case": name, "N": N, "errs": errs, "ok": ok})
        print(name, "ok" if ok else "FAILED", json.dumps(errs), flush=True)
        del x, ref
        torch.cuda.empty_cache()
    save()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse as SB  # noqa: E402

if with_flex:
    flex = SB.flex_fn(SB.full_config("cuda"))

from effattn.sparse.pattern_methods import neighborhood_2d_pattern  # noqa: E402

CASES = [(16384, "neighborhood_2d", neighborhood_2d_pattern(16384, 16384, H, grid=(128, 128), kernel=(13, 13)))]
for N in (16384, 32768):
    CASES += [(N, "streaming_llm", streaming_llm_pattern(N, N, H, sinks=64, window=1024)),
              (N, "longformer", longformer_pattern(N, N, H, window=512, global_tokens=tuple(range(16))))]
for N, name, pattern in CASES:
    q, k, v = rand(N)

    def ours():
        return pattern_attention(q, k, v, pattern)
    if name == "neighborhood_2d" and not hasattr(pattern, "grid"):  # base tree: its raster mask, prebuilt
        bm0 = pattern.block_mask(1, H, N, N, device="cuda")

        def ours():  # noqa: F811
            return effattn.flash_attention(q, k, v, block_mask=bm0)

    t0 = time.time()
    if getattr(pattern, "grid", None) is not None:  # the plan (tile order or raster), built before timing
        from effattn.sparse.pattern_methods import grid_plan
        ours()
        row0 = {"plan_tile": grid_plan(pattern, 1, H, N, None, "cuda")[0]}
    else:
        row0 = {}
    row = {**row0, "method": name, "N": N, "fwd_ms": triton.testing.do_bench(ours, warmup=25, rep=100),
           "fwd_bwd_ms": triton.testing.do_bench(SB.fwd_bwd(ours, q, k, v), warmup=25, rep=100)}
    if with_flex:
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        fbm = SB.flex_block_mask(pattern, H, N, "cuda")

        def theirs():
            return flex(qf, kf, vf, block_mask=fbm)
        row["flex_fwd_ms"] = triton.testing.do_bench(theirs, warmup=25, rep=100)
        row["flex_fwd_bwd_ms"] = triton.testing.do_bench(SB.fwd_bwd(theirs, qf, kf, vf), warmup=25, rep=100)
        row["max_abs_diff_vs_flex"] = float((ours().float() - theirs().transpose(1, 2).float()).abs().max())
    row["s"] = time.time() - t0
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    save()
