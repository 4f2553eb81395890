"""The survey's complexity table, measured: slopes of log(time) and log(memory) against log(N).

Time and memory are divided by the batch size first, so a schedule that shrinks B as N grows (ANCHORS.md)
still measures the cost of one sequence. A slope is compared with the registry's claimed exponent; it
contradicts the claim when it is off by more than `tolerance`. A measured slope *below* the claim is
typical at small N, where fixed costs (launches, Python, the Triton interpreter) hide the growth; one
*above* the claim is the interesting case. Decode steps claim 1 for a growing KV cache, 0 for a state.
"""
from __future__ import annotations

import math
from typing import Iterable

TOLERANCE = 0.5
MIN_POINTS = 3
MIN_SPAN = 4.0  # largest N / smallest N


def slope(ns: Iterable[float], values: Iterable[float]) -> float | None:
    """Least-squares slope of log(value) on log(n), or None with fewer than two usable points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if n > 0 and v is not None and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def verdict(measured: float | None, claimed: float | None, n_points: int, span: float,
            tolerance: float = TOLERANCE) -> str:
    """'ok', 'above claim', 'below claim', or why no verdict can be given."""
    if measured is None or claimed is None:
        return "n/a"
    if n_points < MIN_POINTS or span < MIN_SPAN:
        return f"too few sizes ({n_points} over {span:g}x)"
    if measured > claimed + tolerance:
        return "CONTRADICTS claim (above)"
    if measured < claimed - tolerance:
        return "below claim (fixed costs?)"
    return "ok"


def fit_records(records: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
    """One fit per (subject, form, mode) over its successful cells."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            groups.setdefault((r["kind"], r["name"], r["form"], r["mode"]), []).append(r)
    fits = []
    for (kind, name, form, mode), rs in groups.items():
        rs = sorted(rs, key=lambda r: (length(r), r["n"]))
        ns = [length(r) for r in rs]
        span = ns[-1] / ns[0] if ns else 0.0
        distinct = len(set(ns))
        t = slope(ns, [r["time_s"] / r["batch"] for r in rs])
        m = slope(ns, [(r.get("peak_bytes") or 0) / r["batch"] for r in rs])
        ct, cm = r_claims(rs[0])
        fits.append({
            "kind": kind, "name": name, "form": form, "mode": mode, "label": rs[0]["label"], "points": len(rs),
            "n_min": ns[0], "n_max": ns[-1],
            "time_slope": t, "memory_slope": m, "claimed_time": ct, "claimed_memory": cm,
            "time_verdict": verdict(t, ct, distinct, span, tolerance),
            "memory_verdict": verdict(m, cm, distinct, span, tolerance),
        })
    return fits


def length(record: dict) -> int:
    """The N a cell actually ran at: its query length, or its cache length when decoding (a method whose
    inputs fix their own length runs at that length whatever the cell's N)."""
    actual = record.get("seq_k" if record["mode"] == "decode" else "seq_q")
    return actual if isinstance(actual, int) and actual > 0 else record["n"]


def r_claims(record: dict) -> tuple[float | None, float | None]:
    """Claimed (time, memory) exponents in N for the record's mode."""
    if record["mode"] == "decode":
        per_token = record.get("cache_per_token")
        if per_token is None:
            return None, None
        return (1.0, 1.0) if per_token else (0.0, 0.0)
    return record.get("claimed_time_exponent"), record.get("claimed_memory_exponent")
