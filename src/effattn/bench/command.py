"""Arguments and entry points of `effattn bench` and `effattn advise` (cli.py adds them)."""
from __future__ import annotations

import shlex

from .config import DTYPES, MODES


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"--seq-lens must be integers separated by commas, got {text!r}") from None


def _modes(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_parsers(sub) -> None:
    pb = sub.add_parser("bench", help="measure every method beside the anchors; write results.json and reports",
                        description="Measure time, peak memory, throughput and accuracy of every registered "
                                    "method beside the anchors, fit complexity slopes, write reports.")
    pb.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    pb.add_argument("--methods", nargs="+", default=None, help="method names (default: all registered)")
    pb.add_argument("--seq-lens", type=str, default=None, help="comma-separated N values")
    pb.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 16384 // N on CUDA")
    pb.add_argument("--heads", type=int, default=None)
    pb.add_argument("--head-dim", type=int, default=None)
    pb.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    pb.add_argument("--mode", type=str, default=None, help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    pb.add_argument("--anchors", default="auto", help="auto | none | comma-separated anchor names")
    pb.add_argument("--time-limit", type=float, default=None, help="seconds per cell before it is recorded as a timeout")
    pb.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run, 0 for none (default: 240 on CPU, 420 on CUDA); cells left "
                         "are recorded and --resume runs them")
    pb.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    pb.add_argument("--quick", action="store_true",
                    help="fewer, smaller sizes; a method's token-by-token 'recurrent' form, where it has another, "
                         "timed in decode only")
    pb.add_argument("--resume", action="store_true", help="continue the interrupted run in --out with its settings")
    pb.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the reports of --out from its results.json (e.g. on a machine "
                         "with matplotlib, for a GPU run's results)")
    pb.add_argument("--seed", type=int, default=None)
    pb.add_argument("--compile-jobs", type=int, default=None,
                    help="worker processes that compile every cell's kernels before the timed run, within its "
                         "budget (default: on CUDA the host's cores less two, at most 12; on CPU 0, none)")
    pb.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1, stable timings)")
    pb.set_defaults(func=cmd_bench)
    pa = sub.add_parser("advise", help="rank methods for a sequence length and task from measured results")
    pa.add_argument("--seq-len", type=int, required=True)
    pa.add_argument("--task", choices=["train", "prefill", "decode"], required=True)
    pa.add_argument("--memory", type=float, default=None, help="memory budget in GiB")
    pa.add_argument("--results", default="bench-out/results.json")
    pa.set_defaults(func=cmd_advise)


def cmd_bench(args) -> int:
    import torch

    from .config import default_config
    from .harness import run_bench
    from .report import terminal_report

    if args.report_only:
        from pathlib import Path

        from .report import write_reports
        from .results import RESULTS_FILE, load

        data = load(Path(args.out) / RESULTS_FILE)
        write_reports(data, args.out)
        print(terminal_report(data))
        print(f"\nrewrote the reports in {args.out}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = default_config(device, quick=args.quick, dtype=args.dtype, batch=args.batch, heads=args.heads,
                         head_dim=args.head_dim, seq_lens=_ints(args.seq_lens) if args.seq_lens else None,
                         modes=_modes(args.mode) if args.mode else None, anchors=args.anchors,
                         methods=tuple(args.methods) if args.methods else None, time_limit=args.time_limit,
                         budget=args.budget, seed=args.seed, threads=args.threads, compile_jobs=args.compile_jobs)
    given = {k: v for k, v in vars(args).items() if k != "func" and v not in (None, False)}
    command = "effattn bench " + " ".join(
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {shlex.quote(' '.join(v) if isinstance(v, list) else str(v))}"
        for k, v in given.items() if k != "command")
    try:
        data = run_bench(cfg, args.out, resume=args.resume, command=command)
    except KeyboardInterrupt:
        return 130
    print(terminal_report(data))
    print(f"\nwrote {args.out}/results.json, report.md, report.html and PNGs")
    return 0


def cmd_advise(args) -> int:
    from .advise import advise, format_advice
    from .results import load

    data = load(args.results)
    print(format_advice(advise(data, args.seq_len, args.task, args.memory), args.seq_len, args.task, data))
    return 0
