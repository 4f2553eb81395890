"""Sparse attention benchmark: block-sparse flash time vs density, pattern methods vs FlexAttention, and
the quality of the dynamic methods vs full attention. Public API only.

    python benchmarks/sparse.py --out results_dir            # GPU: N = 32k density sweep, 16k patterns
    python benchmarks/sparse.py --quick --out /tmp/sp        # CPU smoke run (Triton interpreter), tiny

Writes sparse.json and sparse.md into --out (sparse_<part>.* with --only density|patterns|quality, to
split a run that would not fit one device call: the pattern part compiles FlexAttention for each of the
7 patterns, fwd and bwd). Timings are triton.testing.do_bench medians on CUDA
(perf_counter medians on CPU, meaningless except as a smoke test); every sparse time is next to the dense
flash time and FlexAttention's time from the same run, as ratios. `--isolate` times each pattern row in a
process of its own.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import effattn  # noqa: E402
import effattn.sparse as sp  # noqa: E402
from effattn.sparse import dynamic as dyn  # noqa: E402
from effattn.sparse.block_mask import block_mask_from_blocks  # noqa: E402
from effattn.sparse.pattern_methods import SPECS  # noqa: E402


@dataclass
class Config:
    device: str
    dtype: torch.dtype
    H: int
    D: int
    n_density: int
    n_pattern: int
    n_quality: int
    block: tuple
    pattern_options: dict
    pattern_sizes: tuple = ()  # (N, D) pairs of the pattern sweep, most wanted first
    pattern_blocks: tuple = ()  # BlockMask tiles tried for each pattern (the kernel runs the mask's tiles)


def full_config(device):
    return Config(device, torch.bfloat16, 16, 128, 32768, 16384, 8192, (128, 64), {
        "sliding_window": {"window": 1024}, "longformer": {"window": 512, "global_tokens": tuple(range(16))},
        "bigbird": {"block_size": 128, "window_blocks": 1, "global_blocks": 1, "random_blocks": 3},
        "sparse_transformer": {"stride": 128, "variant": "fixed", "summary": 16},
        "streaming_llm": {"sinks": 64, "window": 1024},
        "neighborhood_2d": {"grid": (128, 128), "kernel": (13, 13)},
        "neighborhood_3d": {"grid": (16, 32, 32), "kernel": (5, 9, 9)}},
        ((16384, 128), (32768, 128), (8192, 128), (32768, 64), (16384, 64), (8192, 64)), ((128, 64), (128, 128)))


def quick_config(device):
    return Config(device, torch.float32, 1, 16, 128, 128, 128, (16, 16), {
        "sliding_window": {"window": 32}, "longformer": {"window": 16, "global_tokens": (0, 1)},
        "bigbird": {"block_size": 16, "random_blocks": 1}, "sparse_transformer": {"stride": 16},
        "streaming_llm": {"sinks": 4, "window": 32}, "neighborhood_2d": {"grid": (8, 16), "kernel": (3, 5)},
        "neighborhood_3d": {"grid": (2, 8, 8), "kernel": (1, 3, 3)}}, ((128, 16),), ((16, 16), (16, 32)))


def bench(fn, device) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()  # CPU (interpreter): a smoke test, one timed call
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rand(cfg, N, H=None, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    H = cfg.H if H is None else H
    out = [torch.randn(1, N, H, cfg.D, generator=g).to(cfg.device, cfg.dtype) for _ in range(3)]
    return [t.requires_grad_(grad) for t in out]


def fwd_bwd(call, q, k, v):
    def run():
        o = call()
        o.backward(torch.ones_like(o))
        q.grad = k.grad = v.grad = None
    return run


# ---------------------------------------------------------------- 1. time vs density

def density_sweep(cfg):
    N, (BQ, BK) = cfg.n_density, cfg.block
    q, k, v = rand(cfg, N)
    nq, nk = math.ceil(N / BQ), math.ceil(N / BK)
    dense_fwd = bench(lambda: effattn.flash_attention(q, k, v), cfg.device)
    dense_fb = bench(fwd_bwd(lambda: effattn.flash_attention(q, k, v), q, k, v), cfg.device)
    rows = []
    for rho in (0.05, 0.10, 0.25, 0.50):
        g = torch.Generator().manual_seed(int(rho * 100))
        n_sel = max(1, round(rho * nk))  # the same number of random KV blocks for every query block
        idx = torch.rand(1, cfg.H, nq, nk, generator=g).topk(n_sel, dim=-1).indices
        sel = torch.zeros(1, cfg.H, nq, nk, dtype=torch.bool).scatter_(-1, idx, True).to(cfg.device)
        bm = block_mask_from_blocks(sel, N, N, block=cfg.block)
        fwd = bench(lambda: effattn.flash_attention(q, k, v, block_mask=bm), cfg.device)
        fb = bench(fwd_bwd(lambda: effattn.flash_attention(q, k, v, block_mask=bm), q, k, v), cfg.device)
        rows.append({"density": rho, "measured_density": bm.density(), "fwd_ms": fwd, "fwd_bwd_ms": fb,
                     "dense_fwd_ms": dense_fwd, "dense_fwd_bwd_ms": dense_fb,
                     "speedup_fwd": dense_fwd / fwd, "speedup_fwd_bwd": dense_fb / fb})
        print(f"density {rho:.2f}: fwd {fwd:.3f} ms ({dense_fwd / fwd:.2f}x dense), "
              f"fwd+bwd {fb:.3f} ms ({dense_fb / fb:.2f}x)", flush=True)
    return rows


# ---------------------------------------------------------------- 2. pattern methods vs FlexAttention

def flex_fn(cfg):
    from torch.nn.attention.flex_attention import flex_attention
    if cfg.device != "cuda":
        return flex_attention  # eager (CPU smoke run)
    # Each pattern's mask_mod is a new closure, so Dynamo recompiles per pattern: keep all of them compiled
    # instead of falling back to eager after the default 8 recompilations.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    # dynamic=False: one static kernel per shape. By default Dynamo recompiles with symbolic shapes once it sees a
    # second N, and that kernel was up to 2x slower (neighborhood_2d, 8k: 0.96 ms against 0.45 expected from 16k).
    return torch.compile(flex_attention, dynamic=False)


def _sized_options(name, opts, N):
    """The pattern's options at length N (token grids reshaped to hold N tokens)."""
    if "grid" in opts and math.prod(opts["grid"]) == N:
        return opts
    if name == "neighborhood_2d":
        return {**opts, "grid": (N // 128, 128)}
    if name == "neighborhood_3d":
        return {**opts, "grid": (N // 1024, 32, 32)}
    return opts


def pattern_vs_flex(cfg, names=None, deadline=math.inf, on_row=lambda rows: None, isolate_args=None):
    """Each pattern at each (N, D) of cfg.pattern_sizes vs compiled FlexAttention with the same mask;
    stops starting new sizes once `deadline` (time.time()) has passed. With `isolate_args` (this script's options
    that choose the config, e.g. ["--quick"]) each row runs in a process of its own (`--row`): no tuned
    configuration, compiled kernel or allocator state of an earlier row carries over (2026-12-06: Longformer's
    8k tiles took 1.63 ms fwd+bwd after other patterns, 1.05 ms alone)."""
    flex = flex_fn(cfg) if isolate_args is None else None  # (an isolated row compiles its own)
    rows = []
    for N, D in cfg.pattern_sizes:
        for spec in SPECS:
            if names and spec.name not in names:
                continue
            if time.time() > deadline:
                print(f"time budget spent: skipping {spec.name} at N={N}, D={D}", flush=True)
                continue
            try:
                rows.append(_pattern_row(cfg, flex, spec, N, D) if isolate_args is None
                            else _isolated_row(isolate_args, spec.name, N, D))
            except Exception as exc:  # e.g. a mask FlexAttention cannot compile: keep timing the others
                print(f"{spec.name} N={N} D={D} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
                continue
            on_row(rows)  # saved as it goes: a run cut off by the device's time limit keeps its rows
    return rows


def _isolated_row(isolate_args, name, N, D):
    """`_pattern_row` in a fresh process: this script with `--row NAME,N,D`, which prints the row as its last line."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *isolate_args, "--row", f"{name},{N},{D}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    print(*out.stdout.strip().splitlines()[:-1], sep="\n", flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


FLEX_MASK_BYTES = 4 << 30  # create_block_mask's working set per call: it evaluates the mask_mod on [B, H, T, S]


def flex_block_mask(pattern, H, N, device, max_bytes=FLEX_MASK_BYTES):
    """FlexAttention's BlockMask of `pattern` at length N. Eager `create_block_mask` evaluates the mask_mod on every
    (h, q, kv) at once, with int64 index temporaries: BigBird's per-head random blocks at N = 16k, H = 16 asked for
    32 GiB and ran out of memory (2026-12-07). A per-head pattern is therefore built a few heads per call (the
    mask_mod sees heads h0 .., each call's h from 0) and the calls' block tables are joined along the heads."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    if not pattern.per_head:
        return create_block_mask(pattern, None, None, N, N, device=device)
    step = max(1, min(H, max_bytes // (8 * N * N)))
    parts = [create_block_mask(lambda b, h, q, kv, h0=h0: pattern(b, h + h0, q, kv), None, min(step, H - h0), N, N,
                               device=device) for h0 in range(0, H, step)]
    if len(parts) == 1:
        return parts[0]
    join = lambda name: torch.cat([getattr(m, name) for m in parts], dim=1)  # noqa: E731  [1, H, ...]
    lengths = ({"seq_lengths": (N, N)} if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters
               else {})  # (older torch infers them from the blocks)
    return BlockMask.from_kv_blocks(join("kv_num_blocks"), join("kv_indices"), join("full_kv_num_blocks"),
                                    join("full_kv_indices"), BLOCK_SIZE=parts[0].BLOCK_SIZE, mask_mod=pattern,
                                    **lengths)


def _pattern_row(cfg, flex, spec, N, D):
    opts = _sized_options(spec.name, cfg.pattern_options[spec.name], N)
    pattern = spec.build(N, N, cfg.H, **opts)
    sub = Config(**{**cfg.__dict__, "D": D})
    q, k, v = rand(sub, N)
    flex_grad = cfg.device == "cuda"  # FlexAttention has no CPU backward
    qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_(flex_grad) for t in (q, k, v))
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fbm = flex_block_mask(pattern, cfg.H, N, cfg.device)
    sync()
    flex_build_s = time.perf_counter() - t0

    def theirs():
        return flex(qf, kf, vf, block_mask=fbm)
    r = {"method": spec.name, "options": {k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in opts.items()},
         "N": N, "D": D, "pid": os.getpid(), "flex_build_s": flex_build_s, "flex_fwd_ms": bench(theirs, cfg.device),
         "flex_fwd_bwd_ms": bench(fwd_bwd(theirs, qf, kf, vf), cfg.device) if flex_grad else math.nan, "by_block": {}}
    for block in cfg.pattern_blocks:
        t0 = time.perf_counter()
        bm = pattern.block_mask(1, cfg.H, N, N, block=block, device=cfg.device)
        sync()
        build_s = time.perf_counter() - t0

        def ours():
            return effattn.flash_attention(q, k, v, block_mask=bm)
        err = float((ours().detach().float() - theirs().detach().transpose(1, 2).float()).abs().max())
        row = r["by_block"][f"{block[0]}x{block[1]}"] = {
            "density": bm.density(), "build_s": build_s, "max_abs_diff_vs_flex": err,
            "fwd_ms": bench(ours, cfg.device), "fwd_bwd_ms": math.inf}
        try:
            row["fwd_bwd_ms"] = bench(fwd_bwd(ours, q, k, v), cfg.device)
        except RuntimeError as exc:  # e.g. a backward tile that does not fit shared memory at this D
            row["fwd_bwd_error"] = str(exc)
            print(f"{spec.name} N={N} D={D} tile {block}: backward failed: {exc}", flush=True)
    if pattern.window is not None or pattern.grid is not None:
        # what the registered method runs: a band (+ sinks, + Longformer's global rows) on the kernel's window
        # path; a grid pattern in its plan's token order (built and cached here, so the timed calls reuse it)
        from effattn.sparse.pattern_methods import grid_plan, pattern_attention
        entry, density, build_s = "native window", r["by_block"][next(iter(r["by_block"]))]["density"], 0.0
        if pattern.grid is not None:
            t0 = time.perf_counter()
            tile, bm = grid_plan(pattern, 1, cfg.H, N, None, cfg.device)
            sync()
            build_s = time.perf_counter() - t0
            entry, density = f"tile order {tile}" if tile else "raster order", bm.density()

        def native():
            return pattern_attention(q, k, v, pattern)
        r["by_block"][entry] = {
            "density": density, "build_s": build_s,
            "max_abs_diff_vs_flex": float((native().detach().float() - theirs().detach().transpose(1, 2).float()).abs().max()),
            "fwd_ms": bench(native, cfg.device), "fwd_bwd_ms": bench(fwd_bwd(native, q, k, v), cfg.device)}
    # Flex again, last: ours is the best of several tiles, each timed after the one before it, so Flex gets a
    # second median too, timed late in the row as well (the clocks follow the load that ran before)
    again = [("flex_fwd_ms", theirs)] + ([("flex_fwd_bwd_ms", fwd_bwd(theirs, qf, kf, vf))] if flex_grad else [])
    for metric, fn in again:
        r[metric.replace("_ms", "_rounds_ms")] = [r[metric], bench(fn, cfg.device)]
        r[metric] = min(r[metric.replace("_ms", "_rounds_ms")])
    # Reported: each metric at the tile that is best for it (the caller picks the tile when building the mask).
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        tile, best = min(r["by_block"].items(), key=lambda kv: kv[1][metric])
        r[metric], r[metric.replace("_ms", "_block")] = best[metric], tile
    first = next(iter(r["by_block"].values()))
    r.update(density=first["density"], build_s=first["build_s"],
             max_abs_diff_vs_flex=max(b["max_abs_diff_vs_flex"] for b in r["by_block"].values()))
    err = r["max_abs_diff_vs_flex"]
    r["ratio_fwd"] = r["flex_fwd_ms"] / r["fwd_ms"]
    r["ratio_fwd_bwd"] = r["flex_fwd_bwd_ms"] / r["fwd_bwd_ms"]
    print(f"{spec.name} N={N} D={D}: density {r['density']:.3f}, fwd {r['fwd_ms']:.3f} ms ({r['fwd_block']}) vs flex "
          f"{r['flex_fwd_ms']:.3f} ({r['ratio_fwd']:.2f}x), fwd+bwd {r['fwd_bwd_ms']:.3f} vs "
          f"{r['flex_fwd_bwd_ms']:.3f} ({r['ratio_fwd_bwd']:.2f}x), |diff| {err:.2e}", flush=True)
    return r


# ---------------------------------------------------------------- 3. quality of dynamic methods

def local_inputs(cfg, N, seed=0):
    """Queries and keys that share a slowly drifting direction (a moving average of noise over w tokens,
    so it decorrelates over ~w tokens) plus noise: attention is mostly local, logit contrast ~3, with
    chance long-range matches. The structure dynamic selection is meant to find."""
    g = torch.Generator().manual_seed(seed)
    H, D, w = cfg.H, cfg.D, max(16, N // 64)
    cs = torch.randn(1, N + w, H, D, generator=g).cumsum(1)
    direction = torch.nn.functional.normalize(cs[:, w:] - cs[:, :-w], dim=-1)
    alpha = math.sqrt(3 * math.sqrt(D))  # q.k * D^-0.5 between aligned tokens ~ 3
    q = alpha * direction + torch.randn(1, N, H, D, generator=g)
    k = alpha * direction + torch.randn(1, N, H, D, generator=g)
    v = torch.randn(1, N, H, D, generator=g)
    return [t.to(cfg.device, cfg.dtype) for t in (q, k, v)]


def rel_err(o, ref):
    return float((o.float() - ref.float()).norm() / ref.float().norm())


def quality(cfg):
    N = cfg.n_quality
    q, k, v = local_inputs(cfg, N)
    full = effattn.flash_attention(q, k, v, causal=True)
    b = cfg.block[0]
    causal_tiles = (math.ceil(N / b) + 1) / (2 * math.ceil(N / b))  # density of dense causal attention
    rows = [{"method": "full causal", "budget": "-", "density": causal_tiles, "rel_err": 0.0}]

    def add(method, budget, o, density):
        rows.append({"method": method, "budget": budget, "density": density, "rel_err": rel_err(o, full)})
        print(f"{method} {budget}: density {density:.3f}, rel err {rows[-1]['rel_err']:.4f}", flush=True)

    nb = math.ceil(N / b)
    for top_k in (1, 2, 4, 8):
        if top_k < nb:
            add("moba", f"top_k={top_k}", sp.moba(q, k, v, block_size=b, top_k=top_k),
                dyn.moba_select(q, k, b, top_k).float().mean().item())
    page = max(16, b // 2)
    for top_k in (4, 8, 16, 32):
        if top_k < N // page:
            add("quest", f"top_k={top_k} pages of {page}", sp.quest(q, k, v, page_size=page, top_k=top_k),
                dyn.quest_select(q, k, page, top_k).float().mean().item())
    stride = 8 if b >= 64 else 4
    for kw in ({"threshold": 0.5}, {"threshold": 0.8}, {"threshold": 0.9}, {"threshold": 0.95},
               {"budget": 0.1}, {"budget": 0.25}):
        add("xattention", ",".join(f"{k_}={v_}" for k_, v_ in kw.items()),
            sp.xattention(q, k, v, block_size=b, stride=stride, **kw),
            dyn.xattention_select(q, k, b, stride, **kw).float().mean().item())
    gates = torch.zeros(1, N, cfg.H, 3, device=cfg.device, dtype=cfg.dtype)
    gates[..., 1] = 1.0  # the selection branch alone: the part of NSA that approximates attention
    w = torch.full((b,), 1.0 / b, device=cfg.device, dtype=cfg.dtype)
    for selection in ("token", "block"):
        for top_n in (2, 4, 8):
            if top_n < nb:
                add(f"nsa (selected branch, {selection} selection)", f"top_n={top_n}",
                    sp.nsa(q, k, v, gates, w, w, block_size=b, top_n=top_n, selection=selection), float("nan"))
    return rows


# ---------------------------------------------------------------- report

def markdown(meta, dens, pats, qual):
    lines = [f"# Sparse attention benchmark ({meta['date']})", "",
             f"Device: {meta['device_name']}; torch {meta['torch']}, triton {meta['triton']}; dtype {meta['dtype']}, "
             f"H={meta['H']}, D={meta['D']}, block {meta['block']}. Command: `{meta['command']}`", "",
             f"## Time vs density (N={meta['n_density']}, random KV blocks per query block, non-causal)", "",
             "| density | measured | fwd ms | dense fwd ms | speedup | fwd+bwd ms | dense fwd+bwd ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['density']:.2f} | {r['measured_density']:.3f} | {r['fwd_ms']:.3f} | {r['dense_fwd_ms']:.3f} | "
              f"{r['speedup_fwd']:.2f}x | {r['fwd_bwd_ms']:.3f} | {r['dense_fwd_bwd_ms']:.3f} | {r['speedup_fwd_bwd']:.2f}x |"
              for r in dens]
    lines += ["", "## Pattern methods vs compiled FlexAttention (same mask; ratio = Flex time / ours, > 1: we are faster)",
              "", "| method | N | D | density | fwd ms (tile) | Flex fwd ms | ratio | fwd+bwd ms (tile) | Flex fwd+bwd ms | ratio | "
              "mask build s (ours / Flex) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['N']} | {r['D']} | {r['density']:.3f} | {r['fwd_ms']:.3f} ({r['fwd_block']}) | "
              f"{r['flex_fwd_ms']:.3f} | {r['ratio_fwd']:.2f}x | {r['fwd_bwd_ms']:.3f} ({r['fwd_bwd_block']}) | "
              f"{r['flex_fwd_bwd_ms']:.3f} | {r['ratio_fwd_bwd']:.2f}x | "
              f"{r['build_s']:.2f} / {r['flex_build_s']:.2f} |" for r in pats]
    lines += ["", f"## Dynamic methods: relative L2 error vs full causal attention (N={meta['n_quality']}, "
              "locality-structured q/k)", "", "| method | budget | density (tiles) | rel. error |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['budget']} | {'-' if math.isnan(r['density']) else format(r['density'], '.3f')} | "
              f"{r['rel_err']:.4f} |" for r in qual]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", choices=("density", "patterns", "quality"), action="append")
    ap.add_argument("--patterns", nargs="*", help="pattern methods to time (default: all)")
    ap.add_argument("--isolate", action="store_true",
                    help="time each pattern row in a process of its own (no state carried over from earlier rows)")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # NAME,N,D: one pattern row, printed as json (--isolate's child)
    ap.add_argument("--budget-s", type=float, default=math.inf,
                    help="start no new pattern size after this many seconds (the device call's limit)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = quick_config(device) if args.quick else full_config(device)
    if args.row:
        name, N, D = args.row.split(",")
        spec = next(s for s in SPECS if s.name == name)
        print(json.dumps(_pattern_row(cfg, flex_fn(cfg), spec, int(N), int(D))), flush=True)
        return
    parts = args.only or ["density", "patterns", "quality"]
    import triton
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "dtype": str(cfg.dtype).replace("torch.", ""),
            "H": cfg.H, "D": cfg.D, "block": list(cfg.block), "n_density": cfg.n_density,
            "n_pattern": cfg.n_pattern, "n_quality": cfg.n_quality, "pattern_sizes": [list(x) for x in cfg.pattern_sizes]}
    deadline = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    stem = "sparse" + ("_" + "_".join(args.only) if args.only else "")  # --only runs do not overwrite others

    def save(dens, pats, qual):
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump({"meta": meta, "density": dens, "patterns": pats, "quality": qual}, f, indent=1)
        with open(os.path.join(args.out, stem + ".md"), "w") as f:
            f.write(markdown(meta, dens, pats, qual))

    dens = density_sweep(cfg) if "density" in parts else []
    with torch.no_grad():  # before the patterns: cheap, and the time budget cuts the pattern sweep
        qual = quality(cfg) if "quality" in parts else []
    save(dens, [], qual)
    isolate_args = (["--quick"] if args.quick else []) if args.isolate else None
    pats = (pattern_vs_flex(cfg, args.patterns, deadline, lambda rows: save(dens, rows, qual), isolate_args)
            if "patterns" in parts else [])
    save(dens, pats, qual)
    print(markdown(meta, dens, pats, qual))


if __name__ == "__main__":
    main()
