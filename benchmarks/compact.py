"""Decode throughput and KV-cache bytes per token of the compact attention layers (survey Table 3).

One attention layer at a 7B-like width (d_model 4096, 32 heads of 128) decodes one token per sequence
against a cache of N tokens, N = 4k .. 128k, for MHA, GQA-8, MQA, MLA (absorbed and expanded), MFA and TPA.
For each (method, N) the batch is the largest that fits a whole model's cache (--layers layers) beside its
weights in --budget-gb of GPU memory (capped at --max-batch; MLA expanded shrinks further when its
per-step expansion of the cache does not fit). Reported per layer: step time, tokens/s (batch / step
time), KV bytes per token (measured on the layer's cache) and the cache bytes read per second.
Before timing, each variant's decode step is checked against its layer's reference path (`reference=True`:
the survey's equations literally, e.g. MLA's expansion of the latents; same weights, cache and dtype), on
two sequences; the relative error is reported and the script exits 1 when it exceeds 2e-2 (1e-4 in fp32).
tokens/s is per attention layer: batch / step time.

    python benchmarks/compact.py --out benchmarks/results          # GPU, bf16, full sizes
    python benchmarks/compact.py --quick                            # CPU smoke run at a tiny width
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import effattn  # noqa: E402
from effattn.compact import build_layer  # noqa: E402
from effattn.registry import Shape  # noqa: E402

# (label, registry method, layer keyword arguments for the decode step)
VARIANTS = [("MHA", "mha", {}), ("GQA", "gqa", {}), ("MQA", "mqa", {}), ("MLA absorbed", "mla", {"form": "absorbed"}),
            ("MLA expanded", "mla", {"form": "expanded"}), ("MFA", "mfa", {}), ("TPA", "tpa", {})]
# Layers that can hand their cache to the split-KV Triton decode kernel (head dims it supports)
KERNEL_LAYERS = ("mha", "gqa", "mqa", "mfa")


def timer(fn, device) -> float:
    """Median seconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn(), fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def fill(cache, n: int) -> None:
    """Pretend n tokens were prefilled: random contents, length n (values only need to be realistic in scale)."""
    for buf in cache.buffers.values():
        buf.normal_()
    cache.length = n


def decode_step(layer, cache, x, n, kwargs):
    cache.length = n  # every timed step appends token n + 1 again, to the same cache state
    return layer(x, cache, **kwargs)


def extra_bytes(label: str, layer, batch: int, n: int, elem: int) -> int:
    """Transient memory of one decode step beyond the cache: MLA expanded materialises per-head K and V."""
    if label == "MLA expanded":
        d = layer.dims
        return batch * n * layer.heads * (d.d_nope + d.d_rope + d.d_v) * elem * 3  # K, V, copies in attention
    return batch * n * layer.heads * 4 * 2  # fp32 scores / probabilities of one query token per head


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elem = torch.tensor([], dtype=dtype).element_size()
    shape = Shape(batch=1, seq_q=1, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    budget = int(args.budget_gb * 2**30) - int(args.weights_gb * 2**30)
    rows = []
    kernel = args.decode_kernel == "on" or (args.decode_kernel == "auto" and device.type == "cuda")
    variants = [(label, name, kwargs, {}) for label, name, kwargs in VARIANTS]
    if kernel:
        variants += [(f"{label} +kernel", name, kwargs, {"decode_kernel": True})
                     for label, name, kwargs in VARIANTS if name in KERNEL_LAYERS]
    for label, name, kwargs, build in variants:
        label = label.replace("GQA", f"GQA-{args.kv_heads}")
        torch.manual_seed(0)
        if name in ("mha", "gqa", "mqa", "mla"):  # MFA/TPA run their own attention paths
            build["core"] = args.core
        layer = build_layer(name, shape, args.d_model, dtype=dtype, device=device, **build)
        per_token = layer.cache_elements_per_token() * elem
        record = effattn.REGISTRY.get(name)
        assert per_token == record.state_or_cache.bytes(shape, elem), (label, per_token)
        for n in args.contexts:
            fit = max(0, budget // (args.layers * n * per_token))  # sequences whose whole-model cache fits
            batch = min(fit, args.max_batch)
            need = lambda b: b * n * per_token + extra_bytes(label, layer, b, n, elem)  # noqa: E731
            while batch > 0 and need(batch) > args.layer_gb * 2**30:
                batch //= 2
            row = {"method": label, "context": n, "kv_bytes_per_token_layer": per_token,
                   "kv_bytes_per_token_model": per_token * args.layers, "batch_fits_model": fit, "batch": batch}
            if batch == 0:
                rows.append({**row, "note": "does not fit"})
                print(f"{label:>13} N={n:>6}: does not fit", flush=True)
                continue
            cache = layer.new_cache(batch, n + 1)
            assert cache.nbytes == batch * (n + 1) * per_token
            with torch.no_grad():
                fill(cache, n)
                x = torch.randn(batch, 1, args.d_model, dtype=dtype, device=device)
                fast = decode_step(layer, cache, x, n, kwargs).float()
                if n <= args.check_max_context:  # on two sequences: the reference path expands K/V
                    sub = cache.narrow_batch(min(2, batch))
                    ref = decode_step(layer, sub, x[:2], n, {"reference": True}).float()
                    row["rel_err_vs_reference"] = float((fast[:2] - ref).norm() / ref.norm())
                try:
                    t = timer(lambda: decode_step(layer, cache, x, n, kwargs), device)
                except torch.OutOfMemoryError:
                    rows.append({**row, "note": "out of memory"})
                    print(f"{label:>13} N={n:>6}: out of memory at batch {batch}", flush=True)
                    continue
            row.update(step_ms=t * 1e3, tokens_per_s=batch / t, kv_read_GBps=batch * n * per_token / t / 1e9)
            rows.append(row)
            print(f"{label:>13} N={n:>6} B={batch:>4}: {t * 1e3:8.3f} ms/step  {batch / t:10.0f} tok/s  "
                  f"KV {per_token:>6} B/token/layer  read {row['kv_read_GBps']:7.1f} GB/s  "
                  f"err {row.get('rel_err_vs_reference', float('nan')):.1e}", flush=True)
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del layer
    return {"rows": rows, "config": vars(args), "meta": meta(device, dtype)}


def meta(device, dtype) -> dict:
    import triton

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype),
            "command": " ".join(sys.argv)}


def markdown(result: dict) -> str:
    m, c = result["meta"], result["config"]
    lines = [f"# Compact attention decode, one layer (d_model {c['d_model']}, {c['heads']} heads of {c['head_dim']})",
             "", f"{m['date']}, {m['device']}, torch {m['torch']}, Triton {m['triton']}, {m['dtype']}.",
             f"Command: `{m['command']}`. Batch = largest whose {c['layers']}-layer cache fits in "
             f"{c['budget_gb']} GB beside {c['weights_gb']} GB of weights (capped at {c['max_batch']}).", "",
             "| method | context | KV bytes/token/layer | batch that fits | batch run | step ms | tokens/s "
             "| KV read GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        timing = (f"{r['step_ms']:.3f} | {r['tokens_per_s']:.0f} | {r['kv_read_GBps']:.1f}" if "step_ms" in r
                  else f"{r.get('note')} | - | -")
        lines.append(f"| {r['method']} | {r['context']} | {r['kv_bytes_per_token_layer']} | {r['batch_fits_model']} | "
                     f"{r['batch']} | {timing} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script works")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8, help="GQA's K/V heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contexts", type=lambda s: [int(v) for v in s.split(",")],
                   default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--layers", type=int, default=32, help="layers of the model whose cache must fit")
    p.add_argument("--budget-gb", type=float, default=80.0)
    p.add_argument("--weights-gb", type=float, default=13.5, help="memory taken by the model's weights")
    p.add_argument("--layer-gb", type=float, default=20.0, help="memory allowed for the one timed layer's step")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--check-max-context", type=int, default=16384, help="check vs reference up to this context")
    p.add_argument("--core", default="standard", help="registered exact softmax method run by MHA/GQA/MQA/MLA")
    p.add_argument("--decode-kernel", choices=["auto", "on", "off"], default="auto",
                   help="also time MHA/GQA/MQA/MFA with the split-KV Triton decode kernel (auto: on CUDA)")
    p.add_argument("--out", default=None, help="folder for compact_decode.json / .md")
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.dtype, args.d_model, args.heads, args.kv_heads, args.head_dim = "cpu", "fp32", 64, 4, 2, 16
        args.contexts = [64, 256] if "--contexts" not in (argv or sys.argv) else args.contexts
        args.layers, args.budget_gb, args.weights_gb = 2, 0.01, 0.0
        args.layer_gb, args.max_batch, args.check_max_context = 0.01, 4, 256
        args.decode_kernel = "on" if "--decode-kernel" in (argv or sys.argv) else "off"
    result = run(args)
    bad = [r for r in result["rows"] if r.get("rel_err_vs_reference", 0.0) > (2e-2 if args.dtype != "fp32" else 1e-4)]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compact_decode.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "compact_decode.md"), "w") as f:
            f.write(markdown(result))
    print(markdown(result))
    if bad:
        print(f"FAILED: decode differs from the reference path: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
