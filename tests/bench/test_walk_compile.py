"""benchmarks/walk_compile.py: the sequential linear kernels, compiled for sm_90a without a GPU, load what a step
needs on the loop's path one step ahead (or through the software pipeline), never synchronously in that step."""
import ast
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "walk_compile.py"


def _reports(*names: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compile for the GPU target, not the interpreter
    out = subprocess.run([sys.executable, str(SCRIPT), *names], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ast.literal_eval(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["kernel"]: r for r in rows}


def test_walk_and_state_pass_loops_wait_on_no_load_of_their_own_step():
    """The TTT forward walk's keys and step sizes, gsa's state passes' rows and chunk decays, its scan's and backward
    walks' chunk rows, and the engine's vector-gate state passes' last gates are carried a step ahead: no synchronous
    load is left in those loops, and nothing spills."""
    reports = _reports("ttt forward walk", "gsa state pass", "gsa reverse state pass", "gsa scan", "gsa backward walk",
                       "gsa backward dq walk", "engine state_fwd, vector gate", "engine state_bwd, vector gate")
    assert len(reports) == 8, reports
    for name, r in reports.items():
        *inner, loop = r["loads_per_loop"]  # the walk closes last; an inner loop (gsa's exact sums) loads nothing
        assert not any(inner), (name, inner)
        assert loop.get("sync", 0) == 0 and loop.get("ahead", 0) >= 1, (name, loop)
        assert r["spill_store_bytes"] == 0 and r["loop_instructions"] > 0, (name, r)
