"""Timing, peak memory and per-cell time limits, the same way for methods and anchors.

- Time: `triton.testing.do_bench` median on CUDA (after its warm-up); `torch.utils.benchmark`'s
  `blocked_autorange` median on the CPU, with the process's thread count.
- Peak memory: on CUDA `torch.cuda.max_memory_allocated` around one call, minus what was allocated
  before it (the inputs); on the CPU, which keeps no peak statistic, the running sum of the allocation
  and free events the profiler records with `profile_memory=True`. Either way the number is the working
  memory of the call: outputs, saved activations and temporaries, not the inputs.
- Time limit: SIGALRM interrupts a cell that runs too long (Python-level code such as Triton's
  interpreter stops at once; a long native op stops when it returns).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator

import torch


class CellTimeout(BaseException):
    """A cell ran past its time limit. A BaseException, like KeyboardInterrupt, so that library code
    catching Exception (Triton's interpreter wraps those in InterpreterError) lets it through."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CellTimeout in the main thread after `seconds` (no limit outside the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _expired(signum, frame):
        raise CellTimeout(f"{TIMEOUT_TEXT} of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


TIMEOUT_TEXT = "ran past the per-cell time limit"


def failure_status(exc: BaseException) -> str:
    """'oom', 'timeout' or 'error' for an exception raised by a cell. Wrappers count as what they wrap
    (Triton's interpreter re-raises anything from inside a kernel as InterpreterError, keeping the text)."""
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(e, CellTimeout) or TIMEOUT_TEXT in str(e) for e in chain):
        return "timeout"
    if any(isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) for e in chain):
        return "oom"
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                          or "not enough memory" in text):
        return "oom"
    return "error"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, *, min_run_time: float = 0.05,
                   warmup_ms: float = 25.0, rep_ms: float = 100.0, min_samples: int = 5,
                   max_seconds: float = 1.0, first_call_s: float | None = None) -> tuple[float, int]:
    """(median seconds per call, number of timed calls). `fn` has been called once already (warm-up),
    taking `first_call_s` if known.

    On the CPU, fast calls go through blocked_autorange (one sample per block of calls). Slow ones (the
    warm-up took longer than `min_run_time`, e.g. Triton's interpreter) are timed one call at a time.
    Either way single-call samples are added up to `min_samples` while they fit in `max_seconds`.
    On CUDA, do_bench; calls slower than its `rep_ms` window (a Python step loop: do_bench would make 7 or
    more of them) are timed one at a time like the CPU's slow ones.
    """
    if device == "cuda" and (first_call_s is None or first_call_s * 1e3 < rep_ms):
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return float(torch.tensor(times).median()) * 1e-3, len(times)
    from torch.utils.benchmark import Timer

    def one_call() -> float:  # Timer.timeit(1) would run 2 more warm-up calls first
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    if device == "cpu" and min_run_time > 0 and (first_call_s is None or first_call_s < min_run_time):
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_run_time)
        per_call, calls = [t / m.number_per_run for t in m.raw_times], m.number_per_run * len(m.raw_times)
    else:
        per_call, calls = [one_call()], 1
    spent = sum(per_call)
    while len(per_call) < min_samples and spent + per_call[-1] < max_seconds:
        per_call.append(one_call())
        spent, calls = spent + per_call[-1], calls + 1
    return float(torch.tensor(per_call).median()), int(calls)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Kineto prints a line to the process's stderr when a profiler starts and stops; keep the bar clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """The CPU allocator's peak during fn, from the profiler's memory events (every allocation and free,
    temporaries inside ops and autograd's saved tensors included), minus what was live before."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_to_devnull():
        prof.__enter__()
    try:
        out = fn()
    finally:
        with _stderr_to_devnull():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak), out


def peak_memory(fn: Callable[[], object], device: str) -> tuple[int, object]:
    """(peak bytes allocated by one call of `fn` beyond what was live before it, what fn returned)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before), out
    return _cpu_peak(fn)


def release(device: str) -> None:
    """Give cached memory back between cells, so one cell's OOM does not starve the next."""
    if device == "cuda":
        torch.cuda.empty_cache()
