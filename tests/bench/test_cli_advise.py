"""`effattn bench` and `effattn advise` from the command line, their error paths, and the ranking rules."""
import json

import pytest

from effattn.bench.advise import advise, format_advice
from effattn.cli import main


def test_bench_command_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["bench", "--quick", "--methods", "standard", "mqa", "--seq-lens", "8,16", "--mode", "fwd",
               "--anchors", "none", "--out", str(out), "--time-limit", "60"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "standard" in printed and "N=16 ms" in printed and "Measured complexity" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("effattn bench") and "--seq-lens 8,16" in data["command"]
    assert {r["name"] for r in data["records"]} == {"standard", "mqa"} and data["anchors"] == {}
    for name in ("report.md", "report.html", "summary.txt", "time_vs_n_fwd.png", "error_vs_speed.png"):
        assert (out / name).stat().st_size > 0
        (out / name).unlink()
    assert main(["bench", "--report-only", "--out", str(out)]) == 0  # measures nothing, rewrites the reports
    assert (out / "report.html").exists() and "rewrote the reports" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["records"] == data["records"]


@pytest.mark.parametrize("argv,message", [
    (["bench", "--mode", "fwd,back"], "modes must be"),
    (["bench", "--seq-lens", "8,x"], "--seq-lens must be integers"),
    (["bench", "--seq-lens", "1"], "seq_lens must be integers >= 2"),
    (["bench", "--methods", "flashh", "--seq-lens", "8"], "unknown method 'flashh'"),
    (["bench", "--heads", "0"], "heads must be >= 1"),
    (["bench", "--device", "cuda"], "torch.cuda.is_available() is False"),
    (["advise", "--seq-len", "64", "--task", "train", "--results", "/nonexistent/results.json"], "does not exist"),
])
def test_cli_errors(argv, message, capsys, tmp_path):
    if argv[0] == "bench":
        argv = argv + ["--out", str(tmp_path), "--anchors", "none"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _rec(name, n, t, mem, family="compact", exact=True, rel=None, mode="fwd", status="ok"):
    r = {"kind": "method", "name": name, "form": "default", "label": name, "mode": mode, "n": n, "status": status,
         "reason": "" if status == "ok" else f"{status} here", "batch": 1, "time_s": t, "peak_bytes": mem,
         "family": family, "exact": exact, "claimed_time_exponent": 2.0, "claimed_memory_exponent": 2.0,
         "cache_per_token": family != "linear", "cache_bytes": 1024 * n}
    if rel is not None:
        r["rel_l2"] = rel
    return r


def _data(records):
    meta = {r["name"]: {"state_or_cache": "H d^2 (fixed)"} for r in records}
    return {"records": records, "fits": [], "methods": meta, "device": {"type": "cuda", "name": "H100"},
            "config": {"dtype": "bfloat16", "heads": 16, "head_dim": 128}}


def test_ranking_exact_first_when_it_fits():
    recs = [_rec("slow_exact", 1024, 4e-3, 2**30), _rec("fast_exact", 1024, 1e-3, 2**28),
            _rec("approx", 1024, 1e-4, 2**20, family="sparse", exact=False, rel=3e-2),
            _rec("rnn", 1024, 5e-5, 2**20, family="linear", exact=False),
            _rec("broken", 1024, 1.0, 1, status="error")]
    ranked = advise(_data(recs), 1024, "prefill")
    assert [e["label"] for e in ranked] == ["fast_exact", "slow_exact", "approx", "rnn", "broken"]
    assert "measured" in ranked[0]["line"] and "rel L2 error up to 3.00e-02" in ranked[2]["line"]
    assert "different model" in ranked[3]["line"] and "no successful" in ranked[4]["line"]
    tight = advise(_data(recs), 1024, "prefill", memory_gib=0.5)  # 1 GiB exact does not fit, 256 MiB does
    assert [e["label"] for e in tight][:2] == ["fast_exact", "approx"]
    assert tight[3]["label"] == "slow_exact" and "> 0.5 GiB" in tight[3]["line"]
    longer = advise(_data(recs), 4096, "prefill")  # extrapolated with the claimed exponent 2
    assert longer[0]["seconds"] == pytest.approx(16e-3) and "extrapolated" in longer[0]["line"]
    oom = advise(_data(recs + [_rec("fast_exact", 4096, 0, 0, status="oom")]), 4096, "prefill")
    assert next(e for e in oom if e["label"] == "fast_exact")["tier"] == "does not fit"
    assert format_advice(ranked, 1024, "prefill", _data(recs)).startswith("advice for prefill at N=1024")


def test_advise_errors():
    data = _data([_rec("a", 64, 1e-3, 10)])
    with pytest.raises(ValueError, match="task must be one of"):
        advise(data, 64, "serve")
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        advise(data, 0, "prefill")
    with pytest.raises(ValueError, match="memory must be a positive"):
        advise(data, 64, "prefill", memory_gib=-1)
    with pytest.raises(ValueError, match="no fwdbwd measurements"):
        advise(data, 64, "train")


def test_cuda_defaults_are_the_anchor_sizes(monkeypatch):
    import torch

    from effattn.bench.config import default_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = default_config("cuda")
    assert cfg.seq_lens == (1024, 4096, 16384, 65536) and (cfg.heads, cfg.head_dim, cfg.dtype) == (16, 128, "bfloat16")
    assert [cfg.batch_for(n) for n in cfg.seq_lens] == [16, 4, 1, 1] and cfg.threads is None
    assert default_config("cuda", budget=0).budget is None
    cpu = default_config("cpu")
    assert cpu.seq_lens == (64, 128, 256) and cpu.budget == 240 and cpu.threads == 1
