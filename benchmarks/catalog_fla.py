"""GPU timing of the linear catalogue's methods that FLA 0.6.0 also has, beside its ops (issue #9's bar: >= 1.0x
FLA): rwkv6 / chunk_rwkv6, rwkv7 / chunk_rwkv7, gsa / chunk_gsa, and (timing only, `--methods ttt`) ttt_linear /
chunk_ttt_linear (bf16, [B, T, H, D], B = 1, H = 16).

    PYTHONPATH=src python3 benchmarks/catalog_fla.py --out DIR [--sizes 4096,16384] [--methods rwkv6,rwkv7,gsa,ttt]
        [--impls ours,fla] [--timing-only] [--profile T]

K = V = 64 (RWKV's head size); gsa: M = 64 slots (FLA's default). First each chunk form vs the float64
reference under the 2x rule (outputs, states, every gradient; bf16 and float32), then the max difference of our
output vs FLA's at the first size (same inputs) and of every input's gradient (relative to FLA's largest), then fwd
and fwd+bwd medians (triton.testing.do_bench, after warm-up; a backward FLA refuses on this Triton is recorded
as an error). Results go to DIR/catalog_fla.json after every measurement, so a run cut short still returns
what it measured. (Until 2026-12-06 this was
benchmarks/rwkv7_gsa.py, without rwkv6.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

import effattn  # noqa: F401
from effattn.hardware import _flash_common
from effattn.linear import gsa, rwkv6, rwkv7, ttt_linear

H = 16


def rwkv6_inputs(T, K=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = dict(r=r(1, T, H, K), k=r(1, T, H, K) * K ** -0.5, v=r(1, T, H, K), w=-torch.exp(r(1, T, H, K) - 2),
             u=r(H, K) * 0.5)
    return {n: t.bfloat16().requires_grad_() for n, t in x.items()}


def rwkv7_inputs(T, K=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    kappa = F.normalize(r(1, T, H, K), dim=-1)
    alpha = torch.sigmoid(r(1, T, H, K))
    x = dict(r=r(1, T, H, K), w=-0.6065 * torch.sigmoid(r(1, T, H, K)), k=r(1, T, H, K) * K ** -0.5, v=r(1, T, H, K),
             a=-kappa, b=kappa * alpha)
    return {n: t.bfloat16().requires_grad_() for n, t in x.items()}


def gsa_inputs(T, K=64, M=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    f = F.logsigmoid(r(1, T, H, M)) / 8
    x = dict(q=r(1, T, H, K), k=r(1, T, H, K), v=r(1, T, H, K), s=1 - f.exp(), g=f)
    return {n: t.bfloat16().requires_grad_() for n, t in x.items()}


def ttt_inputs(T, K=64):
    """TTT-Linear, mini-batch 16: our eta_s (per token) constant; FLA's eta_t carries the 1 / (i + 1) token
    weights (its W_t = W_{t'} - eta_t sum_s grad_s), so both run the same inner-loop step sizes. The outputs
    differ (FLA adds LN(f_res) to f_res, the paper and ours to the input): timing only."""
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    base = 0.1
    idx = torch.arange(T, device="cuda") % 16
    x = dict(q=r(1, T, H, K) * K ** -0.5, k=r(1, T, H, K) * K ** -0.5, v=r(1, T, H, K), eta=torch.full((1, T, H), base,
             device="cuda"), eta_fla=(base / (1 + idx)).view(1, T, 1, 1).expand(1, T, H, 1).contiguous(),
             w=torch.ones(H, K, device="cuda"), b=torch.zeros(H, K, device="cuda"))
    return {n: t.bfloat16().requires_grad_() for n, t in x.items()}  # (FLA's kernel needs eta in q's dtype)


def runners():
    from fla.ops.gsa import chunk_gsa
    from fla.ops.rwkv6 import chunk_rwkv6
    from fla.ops.rwkv7 import chunk_rwkv7
    from fla.ops.ttt import chunk_ttt_linear

    return {
        ("rwkv6", "ours"): lambda x: rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"], scale=1.0),
        ("rwkv6", "fla"): lambda x: chunk_rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"], scale=1.0)[0],
        ("rwkv7", "ours"): lambda x: rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0),
        ("rwkv7", "fla"): lambda x: chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0)[0],
        ("gsa", "ours"): lambda x: gsa(x["q"], x["k"], x["v"], x["s"], x["g"]),
        ("gsa", "fla"): lambda x: chunk_gsa(x["q"], x["k"], x["v"], x["s"], x["g"])[0],
        ("ttt", "ours"): lambda x: ttt_linear(x["q"], x["k"], x["v"], x["eta"], x["w"], x["b"], mini_batch_size=16),
        ("ttt", "fla"): lambda x: chunk_ttt_linear(x["q"], x["k"], x["v"], x["w"], x["b"], x["eta_fla"], scale=1.0,
                                                   chunk_size=16)[0],
    }


def reference_checks(methods) -> list:
    """Our chunk forms on the GPU vs the float64 reference under the 2x rule (outputs, final states, every
    gradient; effattn.testing.check_method), bf16 and float32, at a length off the chunk sizes."""
    from effattn.registry import REGISTRY, Shape
    from effattn.testing import check_method

    out = []
    for method in methods:
        name, form = ("ttt_linear", "fused") if method == "ttt" else (method, "chunk")
        for dtype in (torch.bfloat16, torch.float32):
            res = check_method(REGISTRY.get(name), form=form, dtype=dtype, device="cuda",
                               shape=Shape(batch=2, seq_q=333, heads=2, head_dim=64))
            out.append(dict(method=method, dtype=str(dtype), ok=all(r.ok for r in res), detail=[str(r) for r in res]))
            print(out[-1]["method"], out[-1]["dtype"], out[-1]["ok"], "; ".join(out[-1]["detail"]), flush=True)
    return out


def grad_diffs(ours, fla, x) -> dict:
    """max |d ours - d fla| / max |d fla| for every input, with the same upstream gradient."""
    g = torch.Generator(device="cuda").manual_seed(1)
    grads = []
    for fn in (ours, fla):
        ins = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        o = fn(ins)
        o.backward(torch.randn(o.shape, device="cuda", generator=g.manual_seed(1)).to(o.dtype))
        grads.append({n: t.grad.float() for n, t in ins.items()})
    return {n: ((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max().clamp_min(1e-30)).item()
            for n in x}


def profile_tables(fn, x, do) -> str:
    """torch.profiler's CUDA kernel tables of one forward and of one forward + backward (after three warm-up
    steps), longest first: where a method's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for name, step in (("fwd", lambda: fn(x)), ("fwd+bwd", lambda: fn(x).backward(do))):
        with torch.set_grad_enabled(name != "fwd"):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
        for t in x.values():
            t.grad = None
        out.append(f"== {name}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                                               max_name_column_width=70))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--methods", default="rwkv6,rwkv7,gsa")
    ap.add_argument("--timing-only", action="store_true", help="skip the reference checks and the comparisons")
    ap.add_argument("--impls", default="ours,fla", help="whose ops to time (ours alone: an A/B of two trees)")
    ap.add_argument("--profile", type=int, metavar="T",
                    help="also write each timed op's kernel tables at this size (one of --sizes) to DIR/profile_*.txt")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    impls = args.impls.split(",")
    start = time.time()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "H": H, "B": 1, "dtype": "bf16", "command": " ".join(sys.argv), "rows": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "catalog_fla.json")

    def save():  # with every candidate the tuners timed (our kernels' choices: the gsa forward's, the engine's)
        res["tuner"] = {repr(k): {repr(c): ms for c, ms in v.items()} for k, v in _flash_common.TIMINGS.items()}
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    res["reference_checks"] = [] if args.timing_only else reference_checks(methods)
    save()
    run = runners()
    make = {"rwkv6": rwkv6_inputs, "rwkv7": rwkv7_inputs, "gsa": gsa_inputs, "ttt": ttt_inputs}
    for method in methods:
        if method == "ttt" or args.timing_only or "fla" not in impls:  # ttt: different outputs, no comparison
            continue
        x = make[method](sizes[0])
        with torch.no_grad():
            a, b = run[(method, "ours")](x).float(), run[(method, "fla")](x).float()
        res[f"{method}_maxdiff_vs_fla"] = (a - b).abs().max().item()
        res[f"{method}_fla_absmax"] = b.abs().max().item()
        try:  # the backward: every input's gradient, same upstream, relative to FLA's largest entry
            res[f"{method}_grad_reldiff_vs_fla"] = grad_diffs(run[(method, "ours")], run[(method, "fla")], x)
        except Exception:
            res[f"{method}_grad_reldiff_vs_fla"] = traceback.format_exc(limit=2)[-400:]
        res[f"{method}_check_done_s"] = time.time() - start  # first calls: Triton compiles and autotunes
        print(method, "max |ours - fla|", res[f"{method}_maxdiff_vs_fla"], "of", res[f"{method}_fla_absmax"],
              "grads max |ours - fla| / max |fla|:", res[f"{method}_grad_reldiff_vs_fla"],
              f"({res[f'{method}_check_done_s']:.0f} s)", flush=True)
        save()
    for T in sizes:
        for method in methods:
            x = make[method](T)
            do = torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16)
            for impl in impls:
                fn = run[(method, impl)]
                row = {"method": method, "impl": impl, "T": T}
                try:
                    with torch.no_grad():
                        row["fwd_ms"] = triton.testing.do_bench(lambda: fn(x), warmup=5, rep=20)
                    row["fwdbwd_ms"] = triton.testing.do_bench(lambda: fn(x).backward(do), warmup=5, rep=20,
                                                               grad_to_none=list(x.values()))
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                except Exception:  # an OOM or a kernel failure is a result too
                    row["error"] = traceback.format_exc(limit=2)[-400:]
                torch.cuda.reset_peak_memory_stats()
                res["rows"].append(row)
                print(row, flush=True)
                save()
                if T == args.profile and "error" not in row:
                    with open(os.path.join(args.out, f"profile_{method}_{impl}_{T}.txt"), "w") as f:
                        f.write(profile_tables(fn, x, do))


if __name__ == "__main__":
    main()
