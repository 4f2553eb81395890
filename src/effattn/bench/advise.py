"""`effattn advise`: the survey's quick decision guide, but from measured results.

For a sequence length and a task (train = fwd+bwd, prefill = fwd, decode = one token against a cache of N)
it ranks the measured methods: exact softmax attention first when it fits the memory budget, then
approximations of softmax attention (with their measured error), then recurrences (a different model,
to be trained as such), then what does not fit; fastest first inside each group. Sizes that were not
measured are extrapolated from the nearest measured one with the fitted slope.
"""
from __future__ import annotations

import math

from .fit import length, r_claims

TASK_MODE = {"train": "fwdbwd", "prefill": "fwd", "decode": "decode"}
TIERS = ("exact", "approximation", "recurrence", "does not fit", "not measured")


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB"


def _estimate(rs: list[dict], fit: dict | None, n: int) -> tuple[float, float, str]:
    """(seconds per sequence, bytes per sequence, how) at length n from the nearest measured cell."""
    near = min(rs, key=lambda r: abs(math.log(length(r) / n)))
    at = length(near)
    t, mem = near["time_s"] / near["batch"], (near["peak_bytes"] or 0) / near["batch"]
    if at == n:
        return t, mem, "measured"
    claimed_t, claimed_m = r_claims(near)  # without a fit (one size measured), trust the registry's claim
    ts = fit["time_slope"] if fit and fit["time_slope"] is not None else (claimed_t if claimed_t is not None else 1.0)
    ms = fit["memory_slope"] if fit and fit["memory_slope"] is not None else (claimed_m if claimed_m is not None else 1.0)
    ratio = n / at
    return t * ratio ** ts, mem * ratio ** ms, f"extrapolated from N={at} (slopes {ts:.2f}, {ms:.2f})"


def advise(data: dict, seq_len: int, task: str, memory_gib: float | None = None) -> list[dict]:
    """Ranked advice: dicts with rank, label, tier, seconds, bytes and a one-line explanation."""
    if task not in TASK_MODE:
        raise ValueError(f"task must be one of {tuple(TASK_MODE)}, got {task!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if memory_gib is not None and not memory_gib > 0:
        raise ValueError(f"memory must be a positive number of GiB, got {memory_gib!r}")
    mode = TASK_MODE[task]
    fits = {(f["label"], f["mode"]): f for f in data.get("fits", [])}
    errors: dict[str, list[float]] = {}  # accuracy is measured in fwd (and decode) cells: any mode's counts
    for r in data["records"]:
        if r["kind"] == "method" and r.get("rel_l2") is not None:
            errors.setdefault(r["label"], []).append(r["rel_l2"])
    by_label: dict[str, list[dict]] = {}
    for r in data["records"]:
        if r["kind"] == "method" and r["mode"] == mode:
            by_label.setdefault(r["label"], []).append(r)
    if not by_label:
        raise ValueError(f"no {mode} measurements in these results (task {task!r} needs `effattn bench --mode {mode}`)")
    entries = []
    for label, rs in by_label.items():
        ok = [r for r in rs if r["status"] == "ok"]
        failed = sorted((r for r in rs if r["status"] in ("oom", "timeout") and r["n"] <= seq_len), key=lambda r: r["n"])
        meta = data["methods"].get(rs[0]["name"], {})
        if not ok:
            why = sorted({r.get("reason", r["status"]) for r in rs})[0]
            entries.append(dict(label=label, tier="not measured", seconds=math.inf, bytes=None,
                                line=f"{label}: no successful {mode} measurement ({why})"))
            continue
        t, mem, how = _estimate(ok, fits.get((label, mode)), seq_len)
        if mode == "decode":
            r0 = ok[0]
            cache = r0["cache_bytes"] / r0["batch"] * (seq_len / r0["n"] if r0.get("cache_per_token") else 1.0)
            mem += cache
        too_big = memory_gib is not None and mem > memory_gib * 2**30
        if failed:
            tier, why = "does not fit", f"{failed[0]['status']} at N={failed[0]['n']} in this run"
        elif too_big:
            tier, why = "does not fit", f"needs ~{_fmt_bytes(mem)} > {memory_gib:g} GiB"
        elif ok[0]["exact"]:
            tier, why = "exact", "exact softmax attention"
        elif ok[0]["family"] == "linear":
            tier, why = "recurrence", f"a recurrence with state {meta.get('state_or_cache', '?')}: a different model, train it as such"
        else:
            errs = errors.get(label, [])
            err = f" (rel L2 error up to {max(errs):.2e} vs exact)" if errs else ""
            tier, why = "approximation", f"approximates softmax attention{err}"
        line = (f"{label}: {why}; {t * 1e3:.3g} ms and {_fmt_bytes(mem)} per sequence at N={seq_len} "
                f"({how})")
        entries.append(dict(label=label, tier=tier, seconds=t, bytes=mem, line=line))
    entries.sort(key=lambda e: (TIERS.index(e["tier"]), e["seconds"]))
    for i, e in enumerate(entries, 1):
        e["rank"] = i
    return entries


def format_advice(entries: list[dict], seq_len: int, task: str, data: dict) -> str:
    dev = data["device"]
    head = (f"advice for {task} at N={seq_len}, from {dev['type']} {dev.get('name', '')} results "
            f"({data['config']['dtype']}, H={data['config']['heads']}, D={data['config']['head_dim']}):")
    return "\n".join([head] + [f"{e['rank']:>3}. [{e['tier']}] {e['line']}" for e in entries])
