"""Decode benchmark (issue 6): split-KV FlashDecoding vs SDPA, one query token, H=32, Hkv=8, D=128, bf16.

    PYTHONPATH=src python3 benchmarks/decode.py --out DIR [--quick]

One run does: a correctness check of every cache type on the GPU against float64 references; for each
(B, L) in (1, 32k), (32, 4k), (8, 128k): SDPA (the anchor), the contiguous cache over a small sweep of
kernel configurations, the paged cache (block size 16, blocks shuffled in the pool) and the KIVI-4 and
INT8 caches. Reports KV bytes read per second (K + V of the bf16 cache: B * L * Hkv * D * 2 * 2 bytes; for
quantized caches the same *logical* bytes, and separately the bytes they actually hold) and wall time,
timed as CUDA-graph replays (`do_bench_cudagraph`, median) so host launch overhead is excluded for every
contender alike; `effattn.decode` through the public API is also timed without graphs.
"""
from __future__ import annotations

import argparse
import itertools
from math import nan
import json
import os
import platform
import random
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

import effattn
from effattn.hardware.decode_kernels import default_config, flash_decode
from effattn.kvcache import ContiguousKVCache, PagedKVCache, decode_reference, int8_cache, kivi_cache
from effattn.testing import compare

H, HKV, D = 32, 8, 128
SIZES = [(1, 32768), (32, 4096), (8, 131072)]
ANCHOR_TBPS = {(1, 32768): 2.08, (32, 4096): 2.82, (8, 131072): 3.08}
COPY_CEILING = 3.0


def log(*a):
    print(*a, flush=True)


def bench(fn, rep=60):
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


# ------------------------------------------------------------------------------------------ correctness
def make_caches(B, Hkv, Dh, dtype, dev, max_len):
    caches = {"contiguous": ContiguousKVCache(B, max_len, Hkv, Dh, dtype=dtype, device=dev),
              "paged": PagedKVCache(B * max_len // 16 + B, 16, Hkv, Dh, dtype=dtype, device=dev),
              "kivi2": kivi_cache(B, max_len, Hkv, Dh, bits=2, group=32, residual=32, dtype=dtype, device=dev),
              "kivi4": kivi_cache(B, max_len, Hkv, Dh, bits=4, group=32, residual=32, dtype=dtype, device=dev),
              "int8": int8_cache(B, max_len, Hkv, Dh, dtype=dtype, device=dev)}
    for _ in range(B):
        caches["paged"].add_sequence()
    return caches


def correctness(dev) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    lens = [1000, 37, 2049]
    for dtype in (torch.bfloat16, torch.float32):
        k = torch.randn(3, max(lens), HKV, D, generator=g)
        v = torch.randn(3, max(lens), HKV, D, generator=g)
        q = torch.randn(3, 2, H, D, generator=g)
        for name, cache in make_caches(3, HKV, D, dtype, dev, 2112).items():
            try:
                cache.append(k.to(dev, dtype), v.to(dev, dtype), lengths=lens)
                o = effattn.decode(q.to(dev, dtype), cache)
                ref = decode_reference(q.to(dtype), cache)  # float64 on the CPU
                base = decode_reference(q.to(dev, dtype), cache, dtype=dtype)  # plain PyTorch, same dtype, GPU
                c = compare("o", o, base, ref, dtype)
            except Exception as e:  # report and go on to the timings
                log(f"check {name} {dtype} FAILED to run: {type(e).__name__}: {str(e)[:300]}")
                out.append({"cache": name, "dtype": str(dtype), "error": nan, "baseline_error": nan,
                            "allowed": nan, "ok": False})
                continue
            out.append({"cache": name, "dtype": str(dtype), "error": c.error, "baseline_error": c.baseline_error,
                        "allowed": c.allowed, "ok": c.ok})
            log(f"check {name:10s} {str(dtype):15s} {c}")
    return out


# ----------------------------------------------------------------------------------------------- timing
def kernel_fn(q, cache, cfg):
    segs, totals = cache.segments()
    scale = D ** -0.5
    return lambda: flash_decode(q, segs, totals, scale=scale, **cfg)


def sweep(q, cache, variants, splits_choices):
    results = []
    for (bn, nw, ns), sp in itertools.product(variants, splits_choices):
        cfg = dict(block_n=bn, num_warps=nw, num_stages=ns, num_splits=sp)
        try:
            t = bench(kernel_fn(q, cache, cfg), rep=30)
        except Exception as e:  # a configuration the compiler rejects (shared memory) is skipped
            log(f"   skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        results.append({**cfg, "ms": t})
    return sorted(results, key=lambda r: r["ms"])


def maxdiff(o, ref):
    return float((o.float() - ref.float()).abs().max()) if ref is not None else float("nan")


def run_size(B, L, dev, quick) -> dict:
    log(f"== B={B} L={L}")
    rec = {"B": B, "L": L}
    nbytes = B * L * HKV * D * 2 * 2
    rec["kv_bytes"] = nbytes
    tbps = lambda ms: nbytes / (ms * 1e-3) / 1e12  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(B * L)
    q = torch.randn(B, 1, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, L, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, L, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)

    # SDPA anchor, in its own [B, H, L, D] layout.
    qs, ks, vs = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)  # noqa: E731
    try:
        o_sdpa = sdpa().transpose(1, 2)
        rec["sdpa_ms"] = bench(sdpa)
    except Exception as e:  # keep measuring our kernels; the table shows the anchor as missing
        log(f"   sdpa failed: {type(e).__name__}: {str(e)[:200]}")
        o_sdpa, rec["sdpa_ms"] = None, float("nan")
    rec["sdpa_tbps"] = tbps(rec["sdpa_ms"])
    log(f"   sdpa            {rec['sdpa_ms']:.4f} ms {rec['sdpa_tbps']:.2f} TB/s")
    del qs, ks, vs
    torch.cuda.empty_cache()
    cont = ContiguousKVCache(B, L, HKV, D, dtype=torch.bfloat16, device=dev)
    cont.append(k, v)
    auto = default_config(q, cont.segments()[0], H // HKV)
    auto_splits = auto["num_splits"]
    variants = [(128, 4, 3)] if quick else [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (64, 8, 4)]
    splits = sorted({max(1, auto_splits // 2), auto_splits, min(256, auto_splits * 2), min(256, auto_splits * 4)})
    res = sweep(q, cont, variants, splits)
    best = res[0]
    rec["contiguous_sweep"] = res
    rec["contiguous_auto_ms"] = bench(kernel_fn(q, cont, {}))
    rec["contiguous_best"] = best
    rec["contiguous_ms"] = min(best["ms"], rec["contiguous_auto_ms"])
    rec["contiguous_tbps"] = tbps(rec["contiguous_ms"])
    o = effattn.decode(q, cont)
    rec["contiguous_vs_sdpa_maxdiff"] = maxdiff(o, o_sdpa)
    log(f"   contiguous auto {rec['contiguous_auto_ms']:.4f} ms ({auto}); best {best} -> "
        f"{rec['contiguous_tbps']:.2f} TB/s; max|o - sdpa| {rec['contiguous_vs_sdpa_maxdiff']:.3g}")
    rec["decode_api_ms_no_graph"] = do_bench(lambda: effattn.decode(q, cont), rep=100, return_mode="median")
    best_cfg = {k2: best[k2] for k2 in ("block_n", "num_warps", "num_stages", "num_splits")}
    rec["contiguous_auto_config"] = auto
    del cont

    paged = PagedKVCache(B * triton.cdiv(L, 16), 16, HKV, D, dtype=torch.bfloat16, device=dev)
    random.Random(0).shuffle(paged.free_blocks)  # sequences' blocks scattered over the pool
    for _ in range(B):
        paged.add_sequence()
    paged.append(k, v)
    rec["paged_auto_ms"] = bench(kernel_fn(q, paged, {}))
    rec["paged_bestcfg_ms"] = bench(kernel_fn(q, paged, best_cfg))
    rec["paged_ms"] = min(rec["paged_auto_ms"], rec["paged_bestcfg_ms"])
    rec["paged_tbps"] = tbps(rec["paged_ms"])
    rec["paged_over_contiguous"] = rec["paged_ms"] / rec["contiguous_ms"]
    o = effattn.decode(q, paged)
    rec["paged_vs_sdpa_maxdiff"] = maxdiff(o, o_sdpa)
    log(f"   paged(16)       {rec['paged_ms']:.4f} ms {rec['paged_tbps']:.2f} TB/s, x{rec['paged_over_contiguous']:.3f} "
        f"of contiguous; max|o - sdpa| {rec['paged_vs_sdpa_maxdiff']:.3g}")
    del paged

    for name, make in (("kivi4", lambda: kivi_cache(B, L, HKV, D, bits=4, dtype=torch.bfloat16, device=dev)),
                       ("kivi2", lambda: kivi_cache(B, L, HKV, D, bits=2, dtype=torch.bfloat16, device=dev)),
                       ("int8", lambda: int8_cache(B, L, HKV, D, dtype=torch.bfloat16, device=dev))):
        if quick and name != "kivi4":
            continue
        cache = make()
        cache.append(k, v)
        held = sum(t.numel() * t.element_size() for t in (cache.k_codes, cache.v_codes, cache.k_scale,
                                                           cache.k_zero, cache.v_scale, cache.v_zero))
        full = name == "kivi4" and not quick  # the bar's contender gets the full sweep
        qvariants = [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3)] if full else [(64, 4, 3)]
        qsplits = sorted({*splits, default_config(q, cache.segments()[0], H // HKV)["num_splits"]})
        qres = sweep(q, cache, qvariants, qsplits)
        auto_ms = bench(kernel_fn(q, cache, {}))
        ms = min(qres[0]["ms"], auto_ms)
        o = effattn.decode(q, cache)
        rel = float((o.float() - o_sdpa.float()).norm() / o_sdpa.float().norm()) if o_sdpa is not None else nan
        rec[name] = {"ms": ms, "auto_ms": auto_ms, "best": qres[0],
                     "sweep": qres, "held_bytes": held,
                     "logical_tbps": tbps(ms), "held_tbps": held / (ms * 1e-3) / 1e12,
                     "speedup_vs_bf16": rec["contiguous_ms"] / ms, "rel_error_vs_sdpa": rel}
        log(f"   {name:6s}          {ms:.4f} ms (auto {auto_ms:.4f}; best {qres[0]}), "
            f"x{rec['contiguous_ms'] / ms:.2f} vs bf16, holds {held / 1e9:.2f} GB "
            f"({held / (ms * 1e-3) / 1e12:.2f} TB/s of it), rel err vs exact {rel:.3g}")
        del cache
    del k, v
    torch.cuda.empty_cache()
    return rec


def markdown(report) -> str:
    env = report["env"]
    lines = [f"# Decode benchmark ({env['date']})", "",
             f"GPU {env['gpu']}, torch {env['torch']}, Triton {env['triton']}. Command: `{env['command']}`.",
             "One query token, H = 32, Hkv = 8, D = 128, bf16. TB/s = K+V bytes of the bf16 cache / time "
             "(CUDA-graph replay medians). Floor: bytes / 3.0 TB/s copy ceiling.", "",
             "| B | L | SDPA TB/s (anchor) | ours contiguous TB/s | % of copy ceiling | paged/contiguous time | "
             "KIVI-4 ms | bf16 ms | KIVI-4 speedup | floor ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["sizes"]:
        kv = r.get("kivi4", {})
        lines.append(f"| {r['B']} | {r['L']} | {r['sdpa_tbps']:.2f} ({ANCHOR_TBPS[(r['B'], r['L'])]}) | "
                     f"{r['contiguous_tbps']:.2f} | {100 * r['contiguous_tbps'] / COPY_CEILING:.0f}% | "
                     f"{r['paged_over_contiguous']:.3f} | {kv.get('ms', float('nan')):.4f} | "
                     f"{r['contiguous_ms']:.4f} | {kv.get('speedup_vs_bf16', float('nan')):.2f}x | "
                     f"{r['kv_bytes'] / 3.0e12 * 1e3:.4f} |")
    lines += ["", "Correctness on the GPU (error vs float64 reference, allowed = 2x plain PyTorch + floor):", "",
              "| cache | dtype | error | allowed | ok |", "|---|---|---|---|---|"]
    for c in report["correctness"]:
        lines.append(f"| {c['cache']} | {c['dtype']} | {c['error']:.3g} | {c['allowed']:.3g} | {c['ok']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="all")
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.time()
    report = {"env": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      "python": platform.python_version(), "command": " ".join(["benchmarks/decode.py"] + sys.argv[1:])},
              "correctness": correctness(dev), "sizes": []}
    log(f"correctness done in {time.time() - t0:.0f}s")
    sizes = SIZES if args.sizes == "all" else [SIZES[int(i)] for i in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    for B, L in sizes:
        try:
            report["sizes"].append(run_size(B, L, dev, args.quick))
        except Exception as e:  # keep what the other sizes measured
            log(f"   size ({B}, {L}) failed: {type(e).__name__}: {e}")
            report.setdefault("failures", []).append(f"({B}, {L}): {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        log(f"   t={time.time() - t0:.0f}s")
        with open(os.path.join(args.out, "decode.json"), "w") as f:  # after every size: a timeout keeps it
            json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
