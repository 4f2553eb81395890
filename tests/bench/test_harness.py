"""The harness on the CPU: a smoke run through every registered method, failures per cell, resume, Ctrl-C."""
import io
import json
import math
from dataclasses import replace

import pytest
import torch

import effattn
from effattn.bench import harness, run_bench
from effattn.bench.measure import CellTimeout, failure_status, median_seconds, peak_memory, time_limit
from effattn.bench.results import RESULTS_FILE, load, validate
from effattn.registry import REGISTRY, Registry

LEGIT_SKIPS = ("no backward", "no decode support", "one-token decode step", "a cache of")


def test_smoke_every_method_every_mode(smoke):
    data, out, log = smoke
    assert data["complete"] and validate(data) == []
    seen = {(r["name"], r["form"], r["mode"]) for r in data["records"] if r["kind"] == "method"}
    for m in effattn.methods():
        for form in m.forms:
            for mode in ("fwd", "fwdbwd", "decode"):
                assert (m.name, form, mode) in seen, (m.name, form, mode)
    for r in data["records"]:
        assert r["status"] in ("ok", "skipped"), (r["label"], r["mode"], r["status"], r["reason"])
        if r["status"] == "skipped":
            assert any(s in r["reason"] for s in LEGIT_SKIPS), r
        else:
            assert r["time_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
    fwd = [r for r in data["records"] if r["mode"] == "fwd" and r["kind"] == "method"]
    assert all(r["status"] == "ok" for r in fwd), [r["reason"] for r in fwd if r["status"] != "ok"]
    for r in fwd:  # derived from the registry alone: FLOPs where the family defines them, error where approximating
        meta = data["methods"][r["name"]]
        assert ("rel_l2" in r) == meta["approximates_softmax"]
        if meta["family"] in ("baseline", "compact") and meta["complexity"]["time_exponent"] >= 2:
            assert r["flops"] == pytest.approx(2 * r["batch"] * r["heads"] * 16 * 16 / 2 * 2 * r["head_dim"])
    std = next(r for r in fwd if r["name"] == "standard")
    assert std["causal"] is True and set(std["vs_anchors"]) == {"sdpa_math", "sdpa_flash"}
    assert data["anchors"]["sdpa_math"] == "available" and data["anchors"]["flex"].startswith("unavailable")
    assert "elapsed" in log and "eta" in log


def test_decode_is_one_token_against_the_cache(smoke):
    data, _, _ = smoke
    dec = [r for r in data["records"] if r["mode"] == "decode" and r["status"] == "ok" and r["kind"] == "method"]
    assert dec
    for r in dec:
        assert r["seq_q"] == 1 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["time_s"])
        assert r["bytes_per_s"] > 0
        if r["cache_per_token"]:
            assert r["seq_k"] == 16


def test_results_json_schema(smoke):
    data, out, _ = smoke
    loaded = load(out / RESULTS_FILE)
    assert loaded["schema"] == "effattn.bench/1" and loaded["schema_version"] == 1
    assert loaded["device"]["type"] == "cpu" and loaded["versions"]["torch"] == torch.__version__
    assert loaded["command"] == "pytest smoke" and loaded["config"]["seq_lens"] == [16]
    bad = json.loads(json.dumps(loaded))
    bad["records"][0].pop("time_s")
    bad["records"][1]["status"] = "exploded"
    bad["schema_version"] = 99
    problems = validate(bad)
    assert any("time_s" in p for p in problems) and any("exploded" in p for p in problems)
    assert any("schema" in p for p in problems)
    assert validate([]) == ["top level must be an object, got list"]
    (out / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(out / "broken.json")
    with pytest.raises(ValueError, match="does not exist"):
        load(out / "missing.json")


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
    cfg = tiny(seq_lens=(8, 16), modes=("fwd",), anchors="none", time_limit=0.5)
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
