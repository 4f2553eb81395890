"""benchmarks/layer_check.py compares a layer's fast path with its float64 chunk form; on the CPU both run the
chunk form, so this checks the script itself: every case reported, errors at float32's resolution."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "layer_check.py"


def test_layer_check_reports_every_case(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--layers", "gla,deltanet",
                          "--widths", "32", "--seq", "19", "--batch", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "layer_check.json").read_text())["results"]
    assert [(r["layer"], r["width"], r["seq"]) for r in rows] == [("gla", 32, 19), ("deltanet", 32, 19)]
    for r in rows:
        assert "error" not in r, r
        assert r["finite"] and r["out"] < 1e-5 and r["dx"] < 1e-5 and r["worst_param_err"] < 1e-4, r
