"""benchmarks/engine_compile.py compiles the linear engine's kernels for sm_90a, as launched, without a GPU."""
import ast
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_compile.py"


def test_every_engine_kernel_has_a_candidate_that_fits_hopper_shared_memory():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dtype", "bf16", "--dim", "32", "--gate", "scalar",
                          "--delta-rule"], capture_output=True, text=True, env={**os.environ}, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ast.literal_eval(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    # the delta rule's forward and backward: every kernel the tuner launches
    assert kernels == {"wy", "state_fwd", "output", "bwd_dx", "state_bwd", "bwd_dqk", "wy_bwd"}, kernels
    for kernel in kernels:
        assert any(r["fits"] for r in rows if r["kernel"] == kernel), (kernel, rows)
    assert all(0 < r["shared_bytes"] for r in rows)
