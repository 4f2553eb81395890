import json
import os

import pytest
import torch

from effattn.cli import main
from effattn.models import TinyLM
from effattn.quality import Recipe, evaluate, mqar, train


@pytest.fixture
def one_thread():
    """The CPU is shared: one intra-op thread avoids oversubscription stalls (measured 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_run_solves_easy_mqar(one_thread):
    """A 1-layer DeltaNet TinyLM learns associative recall on CPU in a few seconds. Chance is 1/32 (the
    values); guessing any value seen in the context gives 1/4; 0.5 needs real key -> value recall."""
    torch.manual_seed(0)
    model = TinyLM(64, 32, 1, "deltanet", heads=2)
    sample = lambda n, g: mqar(n, 32, 4, 64, g)  # noqa: E731
    log = train(model, sample, Recipe(steps=200, batch=32, lr=1e-2, warmup=10), seed=0, device="cpu", progress=False)
    x, y = mqar(256, 32, 4, 64, torch.Generator().manual_seed(123))
    metrics = evaluate(model, x, y, 128, "cpu")
    assert log["steps_done"] == 200 and not log["truncated"]
    assert metrics["accuracy"] > 0.5, metrics


def test_cli_quality_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "res"
    # A 1-second budget cannot hold 40 steps: fit_budget lowers the steps of both runs alike.
    rc = main(["quality", "--task", "lm", "--methods", "standard,gla", "--steps", "40", "--widths", "16",
               "--eval-examples", "4", "--out", str(out), "--budget-minutes", "0.02"])
    assert rc == 0
    result = json.loads((out / "quality_lm.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["standard", "gla"]
    steps = result["config"]["recipe"]["steps"]
    assert 10 <= steps < 40
    for run in result["runs"]:
        assert run["train"]["recipe"]["steps"] == steps and run["width"] == 16
        assert 0 < run["train"]["steps_done"] <= steps
        assert [e["setting"]["seq_len"] for e in run["eval"]] == [128, 256]
        assert all(e["bits_per_byte"] > 0 and 0 <= e["accuracy"] <= 1 for e in run["eval"])
    standard, gla = result["runs"]
    assert standard["eval"][1]["state_elements"] == 2 * standard["eval"][0]["state_elements"]  # KV grows
    assert gla["eval"][1]["state_elements"] == gla["eval"][0]["state_elements"]  # state is fixed
    assert (out / "quality_lm.png").stat().st_size > 10_000
    table = (out / "quality_lm.md").read_text()
    assert "| gla | 16 |" in table and "bits_per_byte T=256" in table
    assert "gla" in capsys.readouterr().out


def test_cli_quality_rejects_unknown_method(capsys):
    assert main(["quality", "--methods", "standard,deltanett", "--steps", "1"]) == 2
    assert "did you mean 'deltanet'" in capsys.readouterr().err


def test_sweep_records_a_failing_method_and_goes_on(tmp_path, monkeypatch):
    """A layer that raises (in the budget probe or in training) is listed under `failed` with its error;
    the other methods still train and the report names the failure."""
    from effattn.quality import harness

    real = harness.seconds_per_step

    def probe(cfg, method, width, *a, **k):
        if method == "gla":
            raise RuntimeError("illegal memory access (simulated)")
        return real(cfg, method, width, *a, **k)

    monkeypatch.setattr(harness, "seconds_per_step", probe)
    rc = main(["quality", "--task", "lm", "--methods", "standard,gla", "--steps", "12", "--widths", "16",
               "--eval-examples", "4", "--out", str(tmp_path), "--budget-minutes", "0.05", "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "quality_lm.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["standard"]
    assert result["failed"] == [{"method": "gla", "width": 16, "lr": 3e-3,
                                 "error": "RuntimeError: illegal memory access (simulated)"}]
    assert "gla width 16 lr 0.003: `RuntimeError: illegal memory access (simulated)`" in (tmp_path / "quality_lm.md").read_text()


def test_sweep_where_every_method_fails_still_writes_its_report(tmp_path, monkeypatch):
    from effattn.quality import harness

    def probe(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(harness, "seconds_per_step", probe)
    assert main(["quality", "--task", "lm", "--methods", "standard", "--steps", "5", "--widths", "16", "--out",
                 str(tmp_path), "--budget-minutes", "0.05", "--quiet"]) == 0
    result = json.loads((tmp_path / "quality_lm.json").read_text())
    assert result["runs"] == [] and [f["method"] for f in result["failed"]] == ["standard"]
    assert "Runs that raised" in (tmp_path / "quality_lm.md").read_text()
    assert not (tmp_path / "quality_lm.png").exists()


def test_isolated_sweep_trains_each_method_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFATTN_FLASH_TUNE", raising=False)
    args = ["quality", "--task", "lm", "--methods", "standard,gla", "--steps", "3", "--widths", "16",
            "--eval-examples", "4", "--isolate", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    # two methods at once, each in its own process: the same runs, in the same order, with the same results
    assert main(args + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "quality_lm.json").read_text())["runs"] for d in ("one", "two"))
    assert [r["method"] for r in one] == [r["method"] for r in two] == ["standard", "gla"]
    assert all(r["train"]["steps_done"] == 3 for r in one + two)
    assert [r["eval"][0]["loss"] for r in one] == pytest.approx([r["eval"][0]["loss"] for r in two], rel=1e-5)
    assert "EFFATTN_FLASH_TUNE" not in os.environ  # set to 0 (no autotuning) only while the command runs


def test_concurrent_jobs_need_isolation():
    from effattn.quality import PRESETS, harness

    with pytest.raises(ValueError, match="jobs=2, isolate=False"):
        harness.sweep(PRESETS["cpu"]["mqar"], ["standard"], "cpu", isolate=False, jobs=2, progress=False)


def _die(cfg, method, width, device, corpora):
    import os
    os._exit(3)  # what a hard fault looks like from the parent: the process is gone, no exception


def test_a_process_that_dies_is_recorded_as_failed_runs():
    from effattn.quality import PRESETS, harness

    failures = harness._in_fresh_process(_die, PRESETS["cpu"]["mqar"], "mamba", [(64, 1e-2), (256, 1e-3)], "cpu")
    assert [(f["method"], f["width"], f["lr"]) for f in failures] == [("mamba", 64, 1e-2), ("mamba", 256, 1e-3)]
    assert all(f["error"].startswith("BrokenProcessPool") for f in failures)


def test_merge_combines_sweeps_of_the_same_recipe(tmp_path, capsys):
    common = ["quality", "--task", "lm", "--steps", "2", "--widths", "16", "--eval-examples", "4", "--quiet"]
    assert main(common + ["--methods", "standard", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--methods", "gla", "--out", str(tmp_path / "b")]) == 0
    merge = ["quality", "--task", "lm", "--out", str(tmp_path / "ab"), "--merge"]
    assert main(merge + [str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    merged = json.loads((tmp_path / "ab" / "quality_lm.json").read_text())
    assert [r["method"] for r in merged["runs"]] == ["standard", "gla"] and " ; " in merged["command"]
    assert (tmp_path / "ab" / "quality_lm.md").exists() and (tmp_path / "ab" / "quality_lm.png").exists()
    assert main(common + ["--methods", "gla", "--eval-examples", "8", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    for dirs, error in ((["a", "a"], "appears in more than one result"), (["a", "c"], "recipe must match"),
                        (["nowhere"], "found no lm results")):
        assert main(merge + [str(tmp_path / d) for d in dirs]) == 2
        assert error in capsys.readouterr().err
    # the same runs at another learning rate merge into a sweep: each (method, width) shown at its best
    assert main(common + ["--methods", "standard", "--lr", "1e-2", "--out", str(tmp_path / "d")]) == 0
    assert main(merge + [str(tmp_path / "a"), str(tmp_path / "d")]) == 0
    merged = json.loads((tmp_path / "ab" / "quality_lm.json").read_text())
    assert [r["lr"] for r in merged["runs"]] == [3e-3, 1e-2] and merged["config"]["lrs"] == [3e-3, 1e-2]
    assert "Every learning rate" in (tmp_path / "ab" / "quality_lm.md").read_text()


def test_fit_budget_shares_the_work_over_jobs():
    """One process trains the runs one after another; with jobs, the sweep takes as long as its slowest run
    (or its total work over the jobs, if longer)."""
    from dataclasses import replace

    from effattn.quality import PRESETS, harness

    cfg = PRESETS["cpu"]["mqar"]
    cfg = replace(cfg, recipe=replace(cfg.recipe, steps=1000))
    per_step = {("a", 64): 0.01, ("b", 64): 0.01, ("c", 64): 0.01, ("d", 64): 0.04}

    def probe(work, cfg, method, points, device, *extra):
        return [per_step[(method, w)] for w, _ in points]

    def steps(jobs):
        runs = [(m, w, cfg.recipe.lr) for m, w in per_step]
        fitted, timed, failed = harness.fit_budget(cfg, runs, "cpu", 10.0, False, probe, jobs)
        assert timed == runs and failed == []
        return fitted.recipe.steps

    assert 110 <= steps(1) <= 114  # ~8 s usable / 0.07 s per step of all four runs
    assert 195 <= steps(4) <= 200  # ~8 s / 0.04 s, the slowest run


def test_run_minutes_caps_each_run(tmp_path, capsys):
    common = ["quality", "--task", "lm", "--methods", "standard", "--widths", "16", "--eval-examples", "4",
              "--quiet", "--out", str(tmp_path)]
    assert main(common + ["--steps", "100000", "--run-minutes", "0.002"]) == 0
    run = json.loads((tmp_path / "quality_lm.json").read_text())["runs"][0]
    assert run["train"]["truncated"] and run["train"]["steps_done"] < 100000
    assert main(common + ["--run-minutes", "0"]) == 2
    assert "--run-minutes must be > 0, got 0.0" in capsys.readouterr().err


def test_learning_rate_sweep_reports_each_run_at_its_best_rate(tmp_path, capsys):
    common = ["quality", "--task", "lm", "--methods", "standard", "--widths", "16", "--steps", "3",
              "--eval-examples", "4", "--quiet", "--out", str(tmp_path)]
    assert main(common + ["--lr", "1e-5,3e-2"]) == 0
    result = json.loads((tmp_path / "quality_lm.json").read_text())
    assert [(r["method"], r["lr"]) for r in result["runs"]] == [("standard", 1e-5), ("standard", 3e-2)]
    assert [r["train"]["recipe"]["lr"] for r in result["runs"]] == [1e-5, 3e-2]
    assert result["config"]["lrs"] == [1e-5, 3e-2]
    bpb = [sum(e["bits_per_byte"] for e in r["eval"]) for r in result["runs"]]
    best = result["runs"][bpb.index(min(bpb))]  # lower is better for bits per byte
    table = (tmp_path / "quality_lm.md").read_text()
    head, every = table.split("Every learning rate")
    assert head.count("| standard | 16 |") == 1 and f"| standard | 16 | {best['lr']:g} |" in head
    assert every.count("| standard | 16 |") == 2
    for bad in ("0", "1e-3,1e-3", "fast"):
        assert main(common + ["--lr", bad]) == 2
        assert "--lr must be one or more distinct positive numbers" in capsys.readouterr().err


def test_best_runs_picks_by_the_mean_over_settings():
    from effattn.quality.harness import best_runs

    def run(method, lr, values, key="accuracy"):
        return {"method": method, "width": 64, "lr": lr, "eval": [{key: v} for v in values]}

    runs = [run("a", 1e-3, [0.9, 0.1]), run("a", 1e-2, [0.6, 0.5]), run("b", 1e-3, [0.2, 0.2])]
    assert [(r["method"], r["lr"]) for r in best_runs(runs)] == [("a", 1e-2), ("b", 1e-3)]
    lm = [run("a", 1e-3, [2.0, 2.2], "bits_per_byte"), run("a", 1e-2, [1.9, 2.5], "bits_per_byte")]
    assert best_runs(lm)[0]["lr"] == 1e-3
