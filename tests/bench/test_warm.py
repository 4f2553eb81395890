"""Compiling ahead in worker processes (warm.py): units of work, statuses, the deadline, the harness's record."""
import io

from effattn.bench import run_bench
from effattn.bench.config import Cell
from effattn.bench.report import caveats
from effattn.bench.warm import compile_ahead, default_jobs, units


def test_units_take_each_subjects_smallest_sizes_in_plan_order():
    cells = [Cell("anchor", "sdpa_math", "default", "fwd", 8), Cell("method", "gla", "chunk", "fwd", 8),
             Cell("method", "gla", "recurrent", "fwd", 8), Cell("anchor", "sdpa_math", "default", "fwd", 16),
             Cell("method", "gla", "chunk", "fwdbwd", 16), Cell("method", "gla", "chunk", "fwdbwd", 4)]
    assert units(cells) == [[cells[0]], [cells[1], cells[2], cells[5]]]
    assert default_jobs("cpu") == 0 and default_jobs("cuda") >= 1


def test_workers_report_every_cell(tiny):
    cfg = tiny(seq_lens=(8,), modes=("fwd", "fwdbwd", "decode"))
    cells = [Cell("method", "standard", "default", m, 8) for m in cfg.modes]
    cells += [Cell("anchor", "sdpa_math", "default", "fwd", 8), Cell("method", "linformer", "default", "decode", 8),
              Cell("method", "no_such_method", "default", "fwd", 8)]
    out = compile_ahead(cfg, cells, 2, None, io.StringIO())
    assert out["units"] == out["done"] == 4 and out["jobs"] == 2 and out["unfinished"] == []
    status = out["cells"]
    assert [status[c.key] for c in cells[:4]] == ["ok"] * 4
    assert status[cells[4].key].startswith("skipped: no decode support")
    assert status[cells[5].key].startswith("error: ValueError: unknown method 'no_such_method'")


def test_the_deadline_stops_the_workers(tiny):
    cfg = tiny(seq_lens=(8,), modes=("fwd",))
    out = compile_ahead(cfg, [Cell("method", "standard", "default", "fwd", 8)], 1, 0.0, io.StringIO())
    assert out["done"] == 0 and out["cells"] == {} and out["unfinished"] == ["standard"]


def test_the_run_records_what_was_compiled_ahead(tmp_path, tiny):
    cfg = tiny(seq_lens=(8, 16), modes=("fwd",), methods=("standard", "mqa"), anchors="none", compile_jobs=2)
    data = run_bench(cfg, tmp_path, stream=io.StringIO(), write_reports=False)
    [ahead] = data["compile_ahead"]
    assert ahead["units"] == ahead["done"] == 2 and ahead["failed"] == {} and ahead["seconds"] > 0
    assert data["complete"] and [r["status"] for r in data["records"]] == ["ok"] * 4
    assert "Compiled ahead: 2 of 2 subjects in" in "\n".join(caveats(data))
