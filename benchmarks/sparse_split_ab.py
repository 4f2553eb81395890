"""Block-sparse work split on / off (hardware/_flash_split.py) in one process on the same masks, beside compiled Flex:
BigBird and Longformer (benchmarks/sparse.py's full config) through their 128 x 64 and 128 x 128 block masks. First a
GPU check at N = 4096: output and gradients (split, unsplit, and parts of 4 blocks forced) against float32 SDPA with
the dense mask, under the 2x rule beside bf16 SDPA.

usage: PYTHONPATH=src:benchmarks python3 benchmarks/sparse_split_ab.py OUT.json [N,...]"""
import json, math, sys, time
import torch, triton.testing
import effattn
from effattn.hardware import _flash_split
from effattn.sparse.pattern_methods import SPECS
import sparse as SB

out = sys.argv[1]
sizes = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [8192, 16384, 32768]
cfg = SB.full_config("cuda")
flex = SB.flex_fn(cfg)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "checks": []}
OFF = 1 << 40

def bench(f):
    return float(triton.testing.do_bench(f, warmup=25, rep=100))

def save():
    json.dump(res, open(out, "w"), indent=1)

# check: split vs no split vs fp32 SDPA with the dense mask, at 4096 (bf16 2x rule on o and grads)
for name in ("bigbird", "longformer"):
    spec = next(s for s in SPECS if s.name == name)
    N = 4096
    pat = spec.build(N, N, cfg.H, **SB._sized_options(name, cfg.pattern_options[name], N))
    q, k, v = SB.rand(cfg, N)
    bm = pat.block_mask(1, cfg.H, N, N, block=(128, 64), device="cuda")
    dense = bm.to_dense()  # [1, H, N, N]
    g = torch.randn_like(q)
    def grads(fn, ins):
        o = fn(*ins); o.backward(g.to(o.dtype)); return [o.detach().float()] + [t.grad.float() for t in ins]
    ins32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    def sd(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(a.transpose(1, 2), b.transpose(1, 2),
                                                                c.transpose(1, 2), attn_mask=dense).transpose(1, 2)
    ref = grads(sd, ins32)
    insb = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain = grads(sd, insb)
    row = {"pattern": name, "N": N}
    for mode, units in (("split", None), ("unsplit", OFF), ("split_forced_4", 4)):
        _flash_split.SPLIT_UNITS = units
        insf = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fast = grads(lambda a, b, c: effattn.flash_attention(a, b, c, block_mask=bm), insf)
        errs = [float((f - r).abs().max()) for f, r in zip(fast, ref)]
        base = [float((p - r).abs().max()) for p, r in zip(plain, ref)]
        row[mode] = {"err": errs, "sdpa_bf16_err": base,
                     "ok": all(e <= 2 * b_ + 1e-3 for e, b_ in zip(errs, base)),
                     "splits": [None if s is None else s.n_parts for s in bm.splits.values()]}
    _flash_split.SPLIT_UNITS = None
    res["checks"].append(row); print(json.dumps(row), flush=True); save()
    del dense

for N in sizes:
    for name in ("bigbird", "longformer"):
        spec = next(s for s in SPECS if s.name == name)
        pat = spec.build(N, N, cfg.H, **SB._sized_options(name, cfg.pattern_options[name], N))
        q, k, v = SB.rand(cfg, N)
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        fbm = SB.flex_block_mask(pat, cfg.H, N, "cuda")
        theirs = lambda: flex(qf, kf, vf, block_mask=fbm)
        row = {"pattern": name, "N": N, "flex_fwd_ms": bench(theirs),
               "flex_fwd_bwd_ms": bench(SB.fwd_bwd(theirs, qf, kf, vf))}
        for block in ((128, 64), (128, 128)):
            bm = pat.block_mask(1, cfg.H, N, N, block=block, device="cuda")
            call = lambda: effattn.flash_attention(q, k, v, block_mask=bm)
            for mode, units in (("unsplit", OFF), ("split", None)):
                _flash_split.SPLIT_UNITS = units
                t0 = time.perf_counter(); call(); torch.cuda.synchronize(); first = time.perf_counter() - t0
                e = {"fwd_ms": bench(call), "fwd_bwd_ms": bench(SB.fwd_bwd(call, q, k, v)), "first_call_s": first,
                     "parts": [None if s is None else (s.n_parts, s.n_groups)
                               for kk, s in bm.splits.items() if kk[4] == units]}
                row[f"{block[0]}x{block[1]} {mode}"] = e
            _flash_split.SPLIT_UNITS = None
        res["rows"].append(row); print(json.dumps(row), flush=True); save()
