"""Timing, peak memory and per-cell time limits, the same way for methods and anchors.

- Time: `triton.testing.do_bench` median on CUDA (after its warm-up); `torch.utils.benchmark`'s
  `blocked_autorange` median on the CPU, with the process's thread count.
- Peak memory: on CUDA `torch.cuda.max_memory_allocated` around one call, minus what was allocated
  before it (the inputs); on the CPU, which has no allocator statistics, a dispatch mode that adds up the
  storages each torch op allocates and drops them when they are freed. Either way the number is the
  working memory of the call: outputs, saved activations and temporaries, not the inputs.
- Time limit: SIGALRM interrupts a cell that runs too long (Python-level code such as Triton's
  interpreter stops at once; a long native op stops when it returns).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class CellTimeout(Exception):
    """A cell ran past its time limit."""


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
    """
    if device == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return float(torch.tensor(times).median()) * 1e-3, len(times)
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if min_run_time > 0 and (first_call_s is None or first_call_s < min_run_time):
        m = timer.blocked_autorange(min_run_time=min_run_time)
        per_call, calls = [t / m.number_per_run for t in m.raw_times], m.number_per_run * len(m.raw_times)
    else:
        per_call, calls = [timer.timeit(1).raw_times[0]], 1
    spent = sum(per_call)
    while len(per_call) < min_samples and spent + per_call[-1] < max_seconds:
        per_call.append(timer.timeit(1).raw_times[0])
        spent, calls = spent + per_call[-1], calls + 1
    return float(torch.tensor(per_call).median()), int(calls)


class _CpuPeak(TorchDispatchMode):
    """Live bytes of the storages torch ops create while active, and their maximum."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        self._sweep()  # a storage freed inside func may have its address reused by an output
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ref = self._ref(storage)
                if ref.cdata not in self._live:
                    self._live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], object], device: str) -> tuple[int, object]:
    """(peak bytes allocated by one call of `fn` beyond what was live before it, what fn returned)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before), out
    tracker = _CpuPeak()
    with tracker:
        out = fn()
    return int(tracker.peak), out


def release(device: str) -> None:
    """Give cached memory back between cells, so one cell's OOM does not starve the next."""
    if device == "cuda":
        torch.cuda.empty_cache()
