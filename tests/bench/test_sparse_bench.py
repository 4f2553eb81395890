"""benchmarks/sparse.py --isolate: each pattern row timed in a process of its own, the rows gathered as the
in-process sweep gathers them (CPU smoke sizes, Triton interpreter)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse.py"


def test_isolated_pattern_rows(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "patterns", "--patterns", "bigbird",
                          "longformer", "--isolate", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "sparse_patterns.json").read_text())["patterns"]
    assert [r["method"] for r in rows] == ["longformer", "bigbird"]  # the registry's order, one row each
    assert len({r["pid"] for r in rows}) == 2  # timed in two processes
    for r in rows:
        assert r["N"] == 128 and r["fwd_ms"] > 0 and r["max_abs_diff_vs_flex"] < 1e-4, r
        assert set(r["by_block"]) >= {"16x16", "16x32"}, r
