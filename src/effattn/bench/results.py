"""results.json: the versioned record of a run (device, versions, command, settings, one record per cell).

Schema `effattn.bench/1`:
    {schema, schema_version, created, updated, command, complete, device{...}, versions{...}, config{...},
     anchors{name: "available" | "unavailable: why"}, methods{name: {family, forms, complexity, ...}},
     records[{kind, name, form, label, mode, n, status, ...measurements}]}
`validate` checks a loaded file against it; reports, `--resume` and `effattn advise` read it back.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

SCHEMA = "effattn.bench/1"
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
STATUSES = ("ok", "skipped", "timeout", "oom", "error")
RECORD_FIELDS = {"kind": str, "name": str, "form": str, "label": str, "mode": str, "n": int, "status": str,
                 "family": str, "exact": bool}
OK_FIELDS = {"time_s": float, "tokens_per_s": float, "peak_bytes": int, "batch": int, "timed_calls": int}
TOP_FIELDS = {"schema": str, "schema_version": int, "created": str, "command": str, "complete": bool,
              "device": dict, "versions": dict, "config": dict, "anchors": dict, "methods": dict, "records": list}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_info(device: str) -> dict:
    info = {"type": device, "threads": torch.get_num_threads(), "platform": platform.platform()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, count=torch.cuda.device_count(), memory_bytes=int(p.total_memory),
                    capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        info.update(name=name, count=os.cpu_count())
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("effattn", "triton", "numpy", "matplotlib", "flash-attn", "fla-core", "sageattention"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def new_results(cfg, command: str, anchors: dict, methods) -> dict:
    data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": _now(), "updated": _now(),
            "command": command, "complete": False, "device": device_info(cfg.device), "versions": versions(),
            "config": cfg.to_json(), "anchors": dict(anchors), "methods": {}, "records": []}
    describe_methods(data, methods)
    return data


def is_exact(method) -> bool:
    """Computes softmax attention exactly (up to rounding): not an approximation, not a recurrence."""
    return not method.approximates_softmax and method.family != "linear"


def describe_methods(data: dict, methods) -> None:
    for m in methods:
        data["methods"][m.name] = {
            "family": m.family, "forms": list(m.forms), "supports": sorted(m.supports), "exact": is_exact(m),
            "approximates_softmax": m.approximates_softmax, "cite": m.cite, "description": m.description,
            "complexity": {"time": m.complexity.time, "memory": m.complexity.memory,
                           "time_exponent": m.complexity.time_exponent,
                           "memory_exponent": m.complexity.memory_exponent},
            "state_or_cache": m.state_or_cache.describe(), "cache_per_token": m.state_or_cache.per_token}


def base_record(cell, subject, cfg) -> dict:
    """The fields every record has, before measuring."""
    from .cells import cell_shape

    r = {"kind": cell.kind, "name": cell.name, "form": cell.form, "label": cell.label, "mode": cell.mode,
         "n": cell.n, "status": "error", "reason": "", "batch": cfg.batch_for(cell.n), "heads": cfg.heads,
         "head_dim": cfg.head_dim, "dtype": cfg.dtype}
    if cell.kind == "anchor":
        r.update(family=f"anchor:{subject.group}", exact=not subject.approximates_softmax and subject.group == "softmax",
                 approximates_softmax=subject.approximates_softmax)
        return r
    shape = cell_shape(cfg, cell.mode, cell.n)
    r.update(family=subject.family, exact=is_exact(subject), approximates_softmax=subject.approximates_softmax,
             trains=subject.trains, claimed_time_exponent=subject.complexity.time_exponent,
             claimed_memory_exponent=subject.complexity.memory_exponent,
             cache_per_token=subject.state_or_cache.per_token,
             cache_bytes=subject.state_or_cache.bytes(shape, cfg.torch_dtype.itemsize)
             * (cell.n if subject.state_or_cache.per_token else 1) * shape.batch)
    return r


def record_key(r: dict) -> str:
    return f"{r['kind']}:{r['name']}:{r['form']}:{r['mode']}:{r['n']}"


def _clean(x):
    """JSON has no NaN/inf: store them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def save(data: dict, path: Path) -> None:
    """Write atomically (a Ctrl-C during the write leaves the previous file intact)."""
    from .fit import fit_records

    data["updated"] = _now()
    data["fits"] = fit_records(data["records"])
    vs = ratios(data)
    for r in data["records"]:
        r["vs_anchors"] = vs.get(record_key(r), {})
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1, sort_keys=False))
    os.replace(tmp, path)


def load(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"results file {str(path)!r} does not exist (run `effattn bench --out DIR` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"results file {str(path)!r} is not valid JSON: {exc}") from None
    problems = validate(data)
    if problems:
        raise ValueError(f"results file {str(path)!r} does not follow schema {SCHEMA}: {'; '.join(problems[:5])}")
    return data


def _typed(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def validate(data) -> list[str]:
    """Every way `data` departs from the schema (empty when it follows it)."""
    if not isinstance(data, dict):
        return [f"top level must be an object, got {type(data).__name__}"]
    problems = [f"missing or mistyped {k!r} (expected {t.__name__})" for k, t in TOP_FIELDS.items()
                if not _typed(data.get(k), t)]
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema is {data.get('schema')!r} v{data.get('schema_version')}, expected {SCHEMA!r} "
                        f"v{SCHEMA_VERSION}")
    for i, r in enumerate(data.get("records") or []):
        if not isinstance(r, dict):
            problems.append(f"records[{i}] is not an object")
            continue
        fields = dict(RECORD_FIELDS, **(OK_FIELDS if r.get("status") == "ok" else {}))
        problems += [f"records[{i}] ({r.get('label')}): missing or mistyped {k!r}" for k, t in fields.items()
                     if not _typed(r.get(k), t)]
        if r.get("status") not in STATUSES:
            problems.append(f"records[{i}]: status {r.get('status')!r} not in {STATUSES}")
        elif r["status"] != "ok" and not r.get("reason"):
            problems.append(f"records[{i}] ({r.get('label')}): status {r['status']} without a reason")
    return problems


def ratios(data: dict) -> dict[str, dict[str, float]]:
    """record key -> {anchor name: anchor time / record time} for anchors of the same mode and N
    (above 1: the record is faster than the anchor)."""
    anchor_t = {}
    for r in data["records"]:
        if r["kind"] == "anchor" and r["status"] == "ok":
            anchor_t.setdefault((r["mode"], r["n"]), {})[r["name"]] = r["time_s"]
    out = {}
    for r in data["records"]:
        if r["status"] == "ok":
            out[record_key(r)] = {a: t / r["time_s"] for a, t in anchor_t.get((r["mode"], r["n"]), {}).items()
                                  if not (r["kind"] == "anchor" and a == r["name"])}
    return out
