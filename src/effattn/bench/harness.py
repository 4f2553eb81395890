"""`effattn bench`: every selected method and anchor, every size and mode, one record per cell.

results.json is rewritten (atomically) after every cell, so Ctrl-C keeps everything measured so far and
`--resume` continues where the run stopped. A cell that fails (error, out of memory, past its time limit)
is recorded and the run goes on; after a timeout or OOM the larger sizes of that subject and mode are
recorded as skipped instead of being tried. On CUDA the kernels are first compiled in parallel worker processes
(`warm.py`), within the run's budget.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from ..registry import REGISTRY
from . import results as res
from .anchors import Anchor, prepare_anchor, select
from .cells import Prepared, Skip, accuracy, exact_attention, first_output, prepare_method
from .config import BenchConfig, Cell, validate_config
from .measure import CellTimeout, failure_status, median_seconds, peak_memory, release, synchronize, time_limit
from .progress import Progress
from .warm import compile_ahead


def selected_methods(cfg: BenchConfig, registry=None):
    registry = REGISTRY if registry is None else registry
    names = cfg.methods if cfg.methods else registry.names()
    return [registry.get(n) for n in names]  # unknown names raise with a did-you-mean


def plan(cfg: BenchConfig, methods, anchors: list[Anchor]) -> list[Cell]:
    """Sizes outermost, so a run cut short (budget, Ctrl-C) has measured every subject and mode at the
    small sizes rather than one mode at every size."""
    cells = []
    has_linear = any(m.family == "linear" for m in methods)
    for n in cfg.seq_lens:
        for mode in cfg.modes:
            cells += [Cell("anchor", a.name, "default", mode, n) for a in anchors
                      if a.group == "softmax" or has_linear]
            for m in methods:
                step_only = not cfg.step_forms_in_prefill and mode != "decode" and len(m.forms) > 1
                cells += [Cell("method", m.name, f, mode, n) for f in m.forms if not (step_only and f == "recurrent")]
    return cells


def _measure(prep: Prepared, cfg: BenchConfig, record: dict) -> None:
    """Warm-up, peak memory, median time and accuracy of one prepared cell, into `record`."""
    dev = cfg.device
    if dev == "cuda":  # compile / autotune before the memory call, so their buffers are not counted
        prep.call()
        synchronize(dev)
    start = time.perf_counter()
    peak, out = peak_memory(prep.call, dev)  # on the CPU this call is also the warm-up
    first = time.perf_counter() - start
    record["peak_bytes"] = peak
    if prep.exact_inputs is not None and record["mode"] != "fwdbwd":
        o = first_output(out if prep.forward is prep.call else prep.forward())
        e = prep.exact_inputs
        record.update(accuracy(o, exact_attention(e["q"], e["k"], e["v"], e["causal"], e["scale"])))
    del out
    t, calls = median_seconds(prep.call, dev, min_run_time=cfg.min_run_time, warmup_ms=cfg.warmup_ms,
                              rep_ms=cfg.rep_ms, min_samples=cfg.min_samples,
                              max_seconds=min(cfg.sample_seconds, cfg.time_limit / 4), first_call_s=first)
    record.update(time_s=t, timed_calls=calls, tokens_per_s=prep.tokens / t)
    if prep.flops is not None:
        record.update(flops=prep.flops, tflops=prep.flops / t / 1e12)
    if prep.bytes_read is not None:
        record.update(bytes_read=prep.bytes_read, bytes_per_s=prep.bytes_read / t)


BUDGET_REASON = "not run: run budget"


def growth_exponent(record: dict) -> float:
    """How fast a subject's time is expected to grow with N (at least linearly, to stay cautious)."""
    if record["kind"] == "anchor":
        return 2.0 if record["family"] == "anchor:softmax" and record["mode"] != "decode" else 1.0
    if record["mode"] == "decode":
        return 1.0
    return max(1.0, record.get("claimed_time_exponent") or 2.0)


def give_up_reason(record: dict, n_next: int, cfg: BenchConfig) -> str | None:
    """Why the next larger size of this subject and mode is not worth running, or None."""
    if record["status"] in ("timeout", "oom"):
        return f"not run: {record['status']} at N={record['n']}"
    if record["status"] == "ok":
        # three calls at least (memory/warm-up, block size estimate, one timed block)
        predicted = 3 * record["time_s"] * (n_next / record["n"]) ** growth_exponent(record)
        if predicted > cfg.time_limit:
            return (f"not run: predicted {predicted:.0f} s > {cfg.time_limit:g} s limit "
                    f"from {record['time_s']:.2g} s/call at N={record['n']}")
    return None


def run_cell(cell: Cell, subject, cfg: BenchConfig) -> dict:
    record = res.base_record(cell, subject, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1000003 + cell.n * 7 + cfg.modes.index(cell.mode))
    start = time.perf_counter()
    try:
        with time_limit(cfg.time_limit):
            if cell.kind == "anchor":
                prep = prepare_anchor(subject, cell, cfg, gen)
            else:
                prep = prepare_method(subject, cell, cfg, gen)
            record.update(batch=prep.batch, seq_q=prep.seq_q, seq_k=prep.seq_k, causal=prep.causal,
                          notes=prep.notes)
            _measure(prep, cfg, record)
            record["status"] = "ok"
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
    except (Exception, CellTimeout) as exc:  # noqa: BLE001  (every failure of a cell is recorded; the run goes on)
        record.update(status=failure_status(exc), reason=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        prep = None
        release(cfg.device)
    record["wall_s"] = time.perf_counter() - start
    return record


def run_bench(cfg: BenchConfig, out_dir: str | os.PathLike, *, resume: bool = False, command: str = "",
              stream=None, write_reports: bool = True, registry=None) -> dict:
    """Run (or continue) a benchmark into `out_dir`; returns the results dict. Ctrl-C stops it cleanly,
    re-raising KeyboardInterrupt after everything measured has been written."""
    stream = sys.stderr if stream is None else stream
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / res.RESULTS_FILE
    if resume and path.exists():
        data = res.load(path)
        # the interrupted run's sizes, modes and methods, so numbers compare; this invocation's limits
        saved = BenchConfig.from_json(data["config"])
        saved.budget, saved.time_limit, saved.compile_jobs = cfg.budget, cfg.time_limit, cfg.compile_jobs
        validate_config(saved)  # e.g. a CUDA run cannot be continued on a machine without CUDA
        cfg = saved
        print(f"resuming {path}: {len(data['records'])} cells already measured", file=stream)
    else:
        data = None
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, data, path, command, stream, write_reports, registry)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: BenchConfig, data: dict | None, path: Path, command: str, stream, write_reports: bool,
         registry) -> dict:
    out = path.parent
    methods = selected_methods(cfg, registry)
    anchors, anchor_status = select(cfg.anchors, cfg)
    data = res.new_results(cfg, command, anchor_status, methods) if data is None else data
    data["anchors"].update(anchor_status)
    res.describe_methods(data, methods)
    # first use of torch.utils.benchmark and of dispatch modes costs seconds: not the first cell's time
    peak_memory(lambda: median_seconds(lambda: torch.ones(2) + 1, "cpu", min_run_time=0.0, min_samples=1), "cpu")
    # cells the previous invocation's budget left are run now
    data["records"] = [r for r in data["records"] if not r.get("reason", "").startswith(BUDGET_REASON)]
    done = {res.record_key(r) for r in data["records"]}
    cells = plan(cfg, methods, anchors)
    todo = [c for c in cells if c.key not in done]
    subjects = {("anchor", a.name): a for a in anchors} | {("method", m.name): m for m in methods}
    started = time.perf_counter()
    if cfg.compile_jobs and todo:  # at most half the budget, so that the run measures something
        ahead = compile_ahead(cfg, todo, cfg.compile_jobs, None if cfg.budget is None else cfg.budget / 2, stream)
        failed = {k: v for k, v in ahead.pop("cells").items() if v != "ok" and not v.startswith("skipped")}
        data.setdefault("compile_ahead", []).append({**ahead, "failed": failed})
    left = None if cfg.budget is None else max(0.0, cfg.budget - (time.perf_counter() - started))
    progress = Progress([c.n for c in todo], max(cfg.seq_lens), stream, budget=left)
    last: dict[tuple, dict] = {}  # (kind, name, form, mode) -> its latest record, to decide on larger N
    for r in sorted(data["records"], key=lambda r: r["n"]):
        if not r.get("reason", "").startswith("not run:"):
            last[(r["kind"], r["name"], r["form"], r["mode"])] = r
    data["complete"] = False
    try:
        for cell in todo:
            group = (cell.kind, cell.name, cell.form, cell.mode)
            subject = subjects[(cell.kind, cell.name)]
            over_budget = cfg.budget is not None and time.perf_counter() - started > cfg.budget
            if over_budget:
                why = f"{BUDGET_REASON} of {cfg.budget:g} s used up (--budget to change; --resume continues)"
            else:
                why = give_up_reason(last[group], cell.n, cfg) if group in last else None
            if why is not None:
                record = res.base_record(cell, subject, cfg)
                record.update(status="skipped", reason=why, wall_s=0.0)
                if not over_budget and last[group]["status"] in ("timeout", "oom"):
                    record["status"] = last[group]["status"]  # what stopped it carries over to larger N
            else:
                progress.start(cell.label, cell.mode, cell.n)
                record = run_cell(cell, subject, cfg)
                last[group] = record
            data["records"].append(record)
            if why is None:  # records of cells not run are cheap to redo: no rewrite for them
                res.save(data, path)
            progress.done(record)
        data["complete"] = not any(r.get("reason", "").startswith(BUDGET_REASON) for r in data["records"])
    except KeyboardInterrupt:
        progress.finish()
        print(f"\ninterrupted: {len(data['records'])} cells kept in {path}; continue with --resume",
              file=stream)
        res.save(data, path)
        if write_reports:
            from .report import write_reports as _write
            _write(data, out)
        raise
    progress.finish()
    res.save(data, path)
    if write_reports:
        from .report import write_reports as _write
        _write(data, out)
    return data
