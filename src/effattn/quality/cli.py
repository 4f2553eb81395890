"""`effattn quality`: the argument parser and the command (cli.py only registers it)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

from .harness import PRESETS, TASKS

# Exact softmax attention first, then the state-carrying layers. On CPU the exact method is "standard"
# (plain PyTorch, the same function as flash): Triton kernels run there only through the interpreter,
# far too slowly to train, and so do registered methods built on them (linear_transformer's feature map).
LINEAR_LAYERS = ("retnet", "gla", "deltanet", "gated_deltanet", "mamba2")
# On a GPU the catalogue's own layers join (their fast paths need it to train in reasonable time).
GPU_EXTRA = ("linear_transformer", "mamba", "mlstm", "rwkv6", "rwkv7", "ttt_linear", "metala")


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="train small models per method on MQAR / copy / induction / bytes LM")
    p.add_argument("--methods", default=None,
                   help="comma-separated layer or method names (default: exact attention + linear layers, "
                        "see LINEAR_LAYERS; "
                        "'all': every name effattn.nn.make_mixer accepts that trains)")
    p.add_argument("--task", choices=TASKS, default="mqar")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="sizes (default: from the device)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-clock budget for the sweep, split evenly over runs (default: 8 on cpu, none on gpu)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--run-minutes", type=float, default=None,
                   help="cap on each run's training time; a run that reaches it stops early and says so")
    p.add_argument("--widths", default=None, help="comma-separated model widths (override the preset)")
    p.add_argument("--lr", default=None,
                   help="override the preset's peak learning rate; several, comma-separated (e.g. 1e-3,3e-3,1e-2), "
                        "train every (method, width) at each and report each at its best, as Zoology does")
    p.add_argument("--eval-examples", type=int, default=None, help="override the evaluation set size")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: tiny models gain nothing from more, and on a shared "
                        "CPU extra threads stall each other; measured 5x slower with 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="train each method in a fresh process, so that a CUDA fault costs only that method "
                        "(default: on for CUDA, off for CPU)")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --isolate: train this many runs (method, width) at once, each in its own process "
                        "(tiny models are launch-bound, so on a GPU several share it well; results do not change)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=False,
                   help="autotune the kernels (off by default: a run's speed does not change what it learns, and "
                        "every candidate configuration costs a compile, minutes per method on a GPU)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="train nothing: combine the quality_<task>.json of these folders (sweeps of the same task "
                        "and recipe, e.g. methods split over several sessions) into one report in --out")
    p.add_argument("--out", default="quality_results", help="folder for quality_<task>.json and .png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def resolve_methods(spec: str | None, device: torch.device) -> list[str]:
    from ..nn import default_method, make_mixer, mixer_names

    if spec is None:
        if device.type == "cuda":
            return [default_method(), *LINEAR_LAYERS, *GPU_EXTRA]
        return ["standard", *LINEAR_LAYERS]
    if spec == "all":
        names = []
        for name in mixer_names():
            try:
                layer = make_mixer(name, 32, 2)
            except (ValueError, TypeError):  # needs inputs / options a generic layer cannot give it
                continue
            if getattr(layer, "record", None) is None or layer.record.trains:  # decode-only kernels cannot train
                names.append(name)
        return names
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--methods must name at least one method, got {spec!r}")
    for name in names:
        make_mixer(name, 32, 2)  # unknown names fail here, before any training, with a did-you-mean
    return names


def run(args) -> int:
    if args.merge:
        return _merge(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads_before, tune_before = torch.get_num_threads(), os.environ.get("EFFATTN_FLASH_TUNE")
    torch.set_num_threads(args.threads)
    if not args.tune:  # the first configuration that fits; spawned processes inherit the variable
        os.environ["EFFATTN_FLASH_TUNE"] = "0"
    try:
        return _sweep(args, device)
    finally:
        torch.set_num_threads(threads_before)
        if tune_before is None:
            os.environ.pop("EFFATTN_FLASH_TUNE", None)
        else:
            os.environ["EFFATTN_FLASH_TUNE"] = tune_before


def _merge(args) -> int:
    import json
    from pathlib import Path

    from .harness import merge, write

    paths = [Path(d) / f"quality_{args.task}.json" for d in args.merge]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"--merge found no {args.task} results at {missing} (see --task)")
    json_path, png_path = write(merge([json.loads(p.read_text()) for p in paths]), args.out)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path.exists() else " (no run finished: no plot)"))
    return 0


def _learning_rates(spec: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in spec.split(","))
    except ValueError:
        lrs = ()
    if not lrs or any(not lr > 0 for lr in lrs) or len(set(lrs)) < len(lrs):
        raise ValueError(f"--lr must be one or more distinct positive numbers, comma-separated, got {spec!r}")
    return lrs


def _sweep(args, device) -> int:
    from .harness import sweep, write

    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = replace(PRESETS[preset][args.task], seed=args.seed)
    if args.steps is not None:
        cfg = replace(cfg, recipe=replace(cfg.recipe, steps=args.steps, warmup=min(cfg.recipe.warmup, args.steps)))
    if args.run_minutes is not None:
        if args.run_minutes <= 0:
            raise ValueError(f"--run-minutes must be > 0, got {args.run_minutes}")
        cfg = replace(cfg, recipe=replace(cfg.recipe, time_limit_s=60 * args.run_minutes))
    if args.lr is not None:
        lrs = _learning_rates(args.lr)
        cfg = replace(cfg, recipe=replace(cfg.recipe, lr=lrs[0]), lrs=lrs if len(lrs) > 1 else ())
    if args.eval_examples is not None:
        cfg = replace(cfg, eval_examples=args.eval_examples)
    if args.widths is not None:
        cfg = replace(cfg, widths=tuple(int(w) for w in args.widths.split(",")))
    budget = args.budget_minutes if args.budget_minutes is not None else (8.0 if device.type == "cpu" else None)
    methods = resolve_methods(args.methods, device)
    command = "effattn " + " ".join(sys.argv[1:])
    isolate = device.type == "cuda" if args.isolate is None else args.isolate
    result = sweep(cfg, methods, device, budget_minutes=budget, out_dir=args.out, progress=not args.quiet,
                   command=command, isolate=isolate, jobs=args.jobs)
    json_path, png_path = write(result, args.out)
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path.exists() else " (no run finished: no plot)"))
    return 0
