"""The `effattn` command: `list`, `check` (and the subcommands later issues add)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def method_table_rows(registry=None) -> tuple[list[str], list[list[str]]]:
    from .registry import REGISTRY

    registry = REGISTRY if registry is None else registry
    headers = ["name", "class", "forms", "time", "memory", "KV cache / state", "supports"]
    rows = [[m.name, m.family, ",".join(m.forms), m.complexity.time, m.complexity.memory,
             m.state_or_cache.describe(), ",".join(sorted(m.supports))] for m in registry]
    return headers, rows


def cmd_list(args) -> int:
    headers, rows = method_table_rows()
    if args.markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        print(format_table(headers, rows))
    if args.descriptions:
        from .registry import REGISTRY

        print("\n".join(f"{m.name}: {m.description}" for m in REGISTRY))
    return 0


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}[name]


def run_checks(registry, names, device, dtype, seed, out=None) -> bool:
    """Check every (method, form) of `names` in `registry`; print one row each; True when all pass."""
    from .testing import check_method, odd_shapes

    out = sys.stdout if out is None else out
    jobs = [(registry.get(n), f) for n in names for f in registry.get(n).forms]
    shape = odd_shapes()[0]
    all_ok, start = True, time.perf_counter()
    row_fmt = "{:<16} {:<22} {:<10} {:<9} {:<13} {:>9} {:>9}  {}"
    print(row_fmt.format("progress", "method", "form", "dtype", "worst", "error", "allowed", "result"), file=out)
    for i, (m, form) in enumerate(jobs, 1):
        try:
            results = check_method(m, form=form, shape=shape, dtype=dtype, device=device, seed=seed)
            worst = max(results, key=lambda r: r.error / r.allowed if r.allowed else float("inf"))
            ok = all(r.ok for r in results)
            row = [worst.name, f"{worst.error:.2e}", f"{worst.allowed:.2e}", "pass" if ok else "FAIL"]
        except Exception as exc:  # a crash is a failure of that method, not of the whole check
            ok, row = False, ["-", "-", "-", f"ERROR {type(exc).__name__}: {exc}"[:120]]
        all_ok &= ok
        elapsed = time.perf_counter() - start
        cells = [f"[{i}/{len(jobs)} {elapsed:.1f}s]", m.name, form, str(dtype).replace("torch.", "")] + row
        print(row_fmt.format(*cells), file=out, flush=True)
    print(f"{'all passed' if all_ok else 'FAILURES'}: {len(jobs)} method/form pairs on {device}", file=out)
    return all_ok


def cmd_check(args) -> int:
    from .registry import REGISTRY

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = args.method or REGISTRY.names()
    for n in names:
        REGISTRY.get(n)  # unknown names fail before any work, with a did-you-mean
    return 0 if run_checks(REGISTRY, names, device, _dtype(args.dtype), args.seed) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effattn", description="Efficient attention methods: list, check, bench.")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="print the method registry as a table")
    pl.add_argument("--markdown", action="store_true", help="print a Markdown table")
    pl.add_argument("--descriptions", action="store_true", help="also print each method's description")
    pl.set_defaults(func=cmd_list)
    pc = sub.add_parser("check", help="compare every method's fast path with its float64 reference")
    pc.add_argument("--device", choices=["cpu", "cuda"], default=None)
    pc.add_argument("--method", action="append", help="method name (repeatable); default: all")
    pc.add_argument("--dtype", default="float32", choices=["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"])
    pc.add_argument("--seed", type=int, default=0)
    pc.set_defaults(func=cmd_check)
    from .bench.command import add_parsers as add_bench_parsers  # `bench` and `advise`
    from .quality.cli import add_parser as add_quality_parser

    add_bench_parsers(sub)
    add_quality_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import effattn  # noqa: F401  (registers the methods; sets up Triton's mode first)

    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"effattn: error: {exc}", file=sys.stderr)
        return 2
