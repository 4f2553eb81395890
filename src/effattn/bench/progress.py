"""A one-line progress bar with an ETA over the whole run (plain lines when not on a terminal).

Cells are weighted by their size, (N / N_max)^2 plus a constant for the fixed cost of each cell, so the
ETA does not assume that the last, largest cells take as long as the first, tiny ones.
"""
from __future__ import annotations

import time


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, sizes: list[int], n_max: int, stream, width: int = 24, budget: float | None = None) -> None:
        self.budget = budget
        self.weights = [0.25 + (n / max(n_max, 1)) ** 2 for n in sizes]
        self.total = sum(self.weights) or 1.0
        self.done_w, self.i, self.stream, self.width = 0.0, 0, stream, width
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.current = ""

    def _line(self, text: str) -> str:
        frac = self.done_w / self.total
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
        if self.budget is not None and eta == eta:
            eta = min(eta, max(0.0, self.budget - elapsed))  # the run stops at its budget
        bar = "#" * int(frac * self.width)
        eta_s = _fmt(eta) if eta == eta else "?"
        return (f"[{bar:<{self.width}}] {self.i}/{len(self.weights)} {frac:4.0%} "
                f"elapsed {_fmt(elapsed)} eta {eta_s}  {text}")

    def start(self, label: str, mode: str, n: int) -> None:
        self.current = f"{label} {mode} N={n}"
        if self.tty:
            self.stream.write("\r\033[K" + self._line(self.current + " ..."))
            self.stream.flush()

    def done(self, record: dict) -> None:
        if self.i < len(self.weights):
            self.done_w += self.weights[self.i]
        self.i += 1
        status = record["status"]
        result = f"{record['time_s'] * 1e3:.3g} ms" if status == "ok" else f"{status}: {record.get('reason', '')[:60]}"
        text = f"{record['label']} {record['mode']} N={record['n']}: {result}"
        if self.tty:
            self.stream.write("\r\033[K" + self._line(text))
        else:
            self.stream.write(self._line(text) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
