"""The harness on the CPU: failures per cell, Ctrl-C and resume, budgets, timing and memory measurement."""
import io
import json
import math
import time
from dataclasses import replace

import pytest
import torch

from effattn.bench import harness, run_bench
from effattn.bench.measure import CellTimeout, failure_status, median_seconds, peak_memory, time_limit
from effattn.bench.results import RESULTS_FILE, load, validate
from effattn.registry import REGISTRY, Registry


def _raises(**kwargs):
    raise RuntimeError("kernel exploded")


def _sleeps(**kwargs):
    while True:
        pass


def _ooms(**kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, tiny):
    reg = Registry()
    std = REGISTRY.get("standard")
    for m in (std, replace(std, name="raises", fn=_raises), replace(std, name="sleeps", fn=_sleeps),
              replace(std, name="ooms", fn=_ooms)):
        reg.add(m)
    cfg = tiny(seq_lens=(8, 16), modes=("fwd",), anchors="none", time_limit=2.0)
    data = run_bench(cfg, tmp_path, stream=io.StringIO(), write_reports=False, registry=reg)
    status = {(r["name"], r["n"]): (r["status"], r["reason"]) for r in data["records"]}
    assert status[("standard", 8)][0] == status[("standard", 16)][0] == "ok"
    assert status[("raises", 8)] == ("error", "RuntimeError: kernel exploded")
    assert status[("raises", 16)][0] == "error"  # an error does not stop larger sizes
    assert status[("sleeps", 8)][0] == "timeout" and "time limit" in status[("sleeps", 8)][1]
    assert status[("sleeps", 16)] == ("timeout", "not run: timeout at N=8")
    assert status[("ooms", 8)][0] == "oom" and status[("ooms", 16)] == ("oom", "not run: oom at N=8")
    assert validate(data) == [] and data["complete"]


def test_interrupt_keeps_results_and_resume_finishes(tmp_path, monkeypatch, tiny):
    cfg = tiny(seq_lens=(8, 16), modes=("fwd", "decode"), methods=("standard", "mqa"), anchors="sdpa_math")
    real, calls = harness.run_cell, []

    def interrupted(cell, subject, c):
        calls.append(cell.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cell, subject, c)

    monkeypatch.setattr(harness, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, tmp_path, stream=io.StringIO())
    kept = load(tmp_path / RESULTS_FILE)
    assert len(kept["records"]) == 2 and not kept["complete"]
    assert (tmp_path / "report.html").exists() and "INCOMPLETE" in (tmp_path / "report.md").read_text()
    monkeypatch.setattr(harness, "run_cell", real)
    log = io.StringIO()
    done = run_bench(replace(cfg, seq_lens=(999,)), tmp_path, resume=True, stream=log)  # saved settings win
    assert "resuming" in log.getvalue() and done["complete"]
    keys = [f"{r['name']}:{r['mode']}:{r['n']}" for r in done["records"]]
    assert len(keys) == len(set(keys)) == 2 * 2 * 3  # (sdpa_math, standard, mqa) x 2 modes x 2 sizes
    assert [r["time_s"] for r in done["records"][:2]] == [r["time_s"] for r in kept["records"][:2]]


def test_larger_sizes_predicted_past_the_limit_are_not_run(tiny):
    rec = {"kind": "method", "mode": "fwd", "status": "ok", "n": 100, "time_s": 1.0, "claimed_time_exponent": 2.0}
    cfg = tiny(time_limit=10.0)
    assert "predicted 12 s" in harness.give_up_reason(rec, 200, cfg)
    assert harness.give_up_reason(rec, 150, cfg) is None  # 3 * 2.25 s fits


def test_unknown_method_and_anchor_are_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown method 'flashh'"):
        run_bench(tiny(methods=("flashh",)), tmp_path, stream=io.StringIO())
    with pytest.raises(ValueError, match="unknown anchor"):
        run_bench(tiny(anchors="sdpa_math,cudnn9"), tmp_path, stream=io.StringIO())


def test_cpu_peak_memory_counts_live_allocations():
    def fn():
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # 8000
        del a
        c = torch.empty(500)  # 2000: live 10000 < peak 12000
        return b, c

    peak, out = peak_memory(fn, "cpu")
    assert peak == 12000 and out[0].numel() == 2000


def test_time_limit_and_failure_classes():
    with pytest.raises(CellTimeout):
        with time_limit(0.1):
            while True:
                pass
    with time_limit(5):
        pass  # no alarm left behind
    assert failure_status(CellTimeout("x")) == "timeout"
    wrapped = RuntimeError("InterpreterError(\"CellTimeout('ran past the per-cell time limit of 10 s')\")")
    assert failure_status(wrapped) == "timeout"
    try:
        try:
            raise MemoryError
        except MemoryError as inner:
            raise RuntimeError("kernel failed") from inner
    except RuntimeError as outer:
        assert failure_status(outer) == "oom"
    assert failure_status(MemoryError()) == "oom"
    assert failure_status(RuntimeError("DefaultCPUAllocator: can't allocate memory")) == "oom"
    assert failure_status(ValueError("bad")) == "error"


def test_median_seconds_takes_several_samples():
    t, calls = median_seconds(lambda: sum(range(1000)), "cpu", min_run_time=0.0, min_samples=5)
    assert calls == 5 and 0 < t < 1 and math.isfinite(t)


def test_slow_cuda_calls_are_timed_one_at_a_time(monkeypatch):
    """A call slower than do_bench's window (a Python step loop) is timed by single synchronized calls, as many
    as min_samples allows within max_seconds, not by do_bench's 7 or more (no GPU needed: no do_bench here)."""
    from effattn.bench import measure

    synced = []
    monkeypatch.setattr(measure, "synchronize", synced.append)
    t, calls = median_seconds(lambda: time.sleep(0.01), "cuda", rep_ms=5.0, min_samples=3, max_seconds=10.0,
                              first_call_s=0.01)
    assert calls == 3 and synced == ["cuda"] * 3 and 0.01 <= t < 1
    t, calls = median_seconds(lambda: time.sleep(0.01), "cuda", rep_ms=5.0, min_samples=3, max_seconds=0.015,
                              first_call_s=0.01)
    assert calls == 1


def test_budget_leaves_cells_for_resume(tmp_path, tiny):
    cfg = tiny(seq_lens=(8, 16), modes=("fwd",), methods=("standard", "mqa"), anchors="none", budget=1e-9)
    data = run_bench(cfg, tmp_path, stream=io.StringIO(), write_reports=False)
    assert [r["status"] for r in data["records"]] == ["skipped"] * 4
    assert all("run budget" in r["reason"] for r in data["records"]) and not data["complete"]
    done = run_bench(replace(cfg, budget=None), tmp_path, resume=True, stream=io.StringIO(), write_reports=False)
    assert done["complete"] and [r["status"] for r in done["records"]] == ["ok"] * 4


def test_resuming_a_cuda_run_without_cuda_is_an_error(tmp_path, tiny):
    cfg = tiny(seq_lens=(8,), modes=("fwd",), methods=("standard",), anchors="none")
    run_bench(cfg, tmp_path, stream=io.StringIO(), write_reports=False)
    path = tmp_path / RESULTS_FILE
    data = load(path)
    data["config"]["device"] = "cuda"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        run_bench(cfg, tmp_path, resume=True, stream=io.StringIO())


def test_quick_runs_time_step_loops_only_in_decode():
    """--quick leaves out the fwd / fwdbwd cells of a method's token-by-token 'recurrent' form when it has
    another (they measure a PyTorch step loop); decode keeps them, and a method with one form keeps it."""
    from effattn.bench.config import default_config

    methods = [REGISTRY.get(n) for n in ("gla", "slstm", "standard")]
    quick = harness.plan(default_config("cpu", quick=True, modes=("fwd", "decode")), methods, [])
    forms = {(c.mode, c.name): {x.form for x in quick if (x.mode, x.name) == (c.mode, c.name)} for c in quick}
    assert forms[("fwd", "gla")] == {"chunk", "parallel"} and forms[("fwd", "slstm")] == {"fused"}
    assert forms[("decode", "gla")] == {"chunk", "parallel", "recurrent"}
    assert forms[("fwd", "standard")] == forms[("decode", "standard")] == {"default"}
    full = harness.plan(default_config("cpu", modes=("fwd", "decode")), methods, [])
    assert {c.form for c in full if c.mode == "fwd" and c.name == "gla"} == {"chunk", "parallel", "recurrent"}
