"""Compile ahead: the first call of every planned (subject, form, mode), run in parallel worker processes before
the timed run, so that Triton's and inductor's on-disk caches hold every kernel and tuning candidate when the
run starts.

On a machine with an empty cache most of a CUDA run's first calls are compilation, one kernel at a time per
process: 280 of 364 s on the H100 (benchmarks/results/session_2026-12-07e_h100.md, FLA's `chunk_gla` alone 82 s).
Workers compile side by side on the host's cores. Each worker runs whole subjects (all forms and modes, at the
smallest N of the plan, where the same kernels compile as at larger N), taken from a shared queue. Our tuner
launches each candidate once there, untimed (EFFATTN_FLASH_TUNE=compile); the run times them from cached
binaries. A failure here is only reported: the run measures and records every cell as usual.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import torch

from .config import BenchConfig, Cell


def default_jobs(device: str) -> int:
    """Worker processes for a run on `device`: none on the CPU (the interpreter compiles nothing); on CUDA two
    cores fewer than the host has, at most 12 (each worker holds its own CUDA context and copy of torch)."""
    if device != "cuda":
        return 0
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def units(cells: list[Cell]) -> list[list[Cell]]:
    """One unit a subject: its cells at the smallest N each (form, mode) has in `cells`, in plan order."""
    smallest: dict[tuple, Cell] = {}
    for c in cells:
        group = (c.kind, c.name, c.form, c.mode)
        if group not in smallest or c.n < smallest[group].n:
            smallest[group] = c
    by_subject: dict[tuple, list[Cell]] = {}
    for (kind, name, _, _), c in smallest.items():
        by_subject.setdefault((kind, name), []).append(c)
    return list(by_subject.values())


def _subject(kind: str, name: str):
    if kind == "anchor":
        from .anchors import ANCHORS
        return next(a for a in ANCHORS if a.name == name)
    from ..registry import REGISTRY
    return REGISTRY.get(name)


def _worker_init(jobs: int) -> None:
    if os.environ.get("EFFATTN_FLASH_TUNE", "1") != "0":  # the run tunes: compile every candidate
        os.environ["EFFATTN_FLASH_TUNE"] = "compile"
    if torch.cuda.is_available():  # a share of the GPU each: one worker's 64 GiB cell (a masked-quadratic
        # reference form, H100 2026-12-07) fails alone instead of starving the others' compiles
        torch.cuda.set_per_process_memory_fraction(0.9 / jobs)


def _run_unit(task: tuple[dict, list[tuple]]) -> dict[str, str]:
    """Worker: the first call of each cell of one unit; cell key -> 'ok' or its failure status and reason."""
    from .cells import Skip, prepare_method
    from .anchors import prepare_anchor
    from .measure import CellTimeout, failure_status, release, synchronize, time_limit

    cfg_json, cell_tuples = task
    cfg = BenchConfig.from_json(cfg_json)
    out = {}
    for fields in cell_tuples:
        cell = Cell(*fields)
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + cell.n * 7 + cfg.modes.index(cell.mode))
        try:
            with time_limit(cfg.time_limit):
                subject = _subject(cell.kind, cell.name)
                prep = (prepare_anchor if cell.kind == "anchor" else prepare_method)(subject, cell, cfg, gen)
                prep.call()
                synchronize(cfg.device)
            out[cell.key] = "ok"
        except Skip as exc:  # the cell does not apply: nothing to compile
            out[cell.key] = f"skipped: {exc}"[:200]
        except (Exception, CellTimeout) as exc:  # noqa: BLE001  (reported; the run records the cell itself)
            out[cell.key] = f"{failure_status(exc)}: {type(exc).__name__}: {exc}"[:200]
        finally:
            prep = None
            release(cfg.device)
    return out


def compile_ahead(cfg: BenchConfig, cells: list[Cell], jobs: int, deadline_s: float | None, stream) -> dict:
    """Run every unit of `cells` in `jobs` worker processes, stopping them at `deadline_s` seconds; returns
    {"jobs", "seconds", "units", "done", "unfinished": [subject names], "cells": {key: status}} (cells of units
    not finished are absent)."""
    todo = units(cells)
    start = time.perf_counter()
    statuses: dict[str, str] = {}
    done = 0
    if not todo or jobs < 1:
        return {"jobs": jobs, "seconds": 0.0, "units": len(todo), "done": 0, "unfinished": [], "cells": statuses}
    print(f"compiling ahead: {len(todo)} subjects in {jobs} worker processes", file=stream, flush=True)
    tasks = [(cfg.to_json(), [(c.kind, c.name, c.form, c.mode, c.n) for c in unit]) for unit in todo]
    # spawn: a forked child would inherit this process's CUDA state, which CUDA does not allow
    workers = min(jobs, len(todo))
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(workers,))
    try:
        pending = pool.imap_unordered(_run_unit, tasks)
        while done < len(todo):
            left = None if deadline_s is None else deadline_s - (time.perf_counter() - start)
            if left is not None and left <= 0:
                break
            try:
                statuses.update(pending.next(timeout=left))
            except multiprocessing.TimeoutError:
                break
            done += 1
    finally:
        pool.terminate()  # past the deadline: the units still compiling are dropped
        pool.join()
    seconds = time.perf_counter() - start
    unfinished = [unit[0].name for unit in todo if unit[0].key not in statuses]
    print(f"compiled ahead: {done} of {len(todo)} subjects in {seconds:.0f} s"
          + (f" (stopped at the deadline: {', '.join(unfinished)} not done)" if unfinished else ""),
          file=stream, flush=True)
    return {"jobs": jobs, "seconds": seconds, "units": len(todo), "done": done, "unfinished": unfinished,
            "cells": statuses}
