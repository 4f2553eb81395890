"""Compiled for sm_90a without a GPU, two kernels keep the code shape that the 2026-12-05 work gave them
(benchmarks/results/mamba_compile_2026-12-05.md, quant_compile_2026-12-05.md); each check fails on the defect
it guards against:
- Mamba's walk forward keeps one channel per thread with all its states: no barrier in pass 1, no spills, and
  exp-bound. Specialising D moved the warps onto the state axis: 16 barriers per 4 tokens in pass 1. Its walk
  backward at SUB = 2 and its chunk chain compile without spills. The walk backward's lane shuffles (inline PTX,
  which the interpreter replaces by a gather over the columns) each see channel l in lane l, the layout that
  replacement assumes.
- The FP8-PV attention copies its V tiles asynchronously (LDGSTS), stages ahead. A token mask or an unaligned
  start left them to per-byte loads (LDG 150 and LDGSTS 27 at D = 128 with 8 warps). Its V scale is per channel,
  read once after the loop: the per-tile scales of before were 32 more LDG (54 in all).
- The quantized look-ahead loops overlap their exponentials with the next Q K^T, unserialized."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _rows(script: str, *args: str, tmp_path) -> list[dict]:
    out_json = tmp_path / f"{script}.json"
    out = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out_json)], capture_output=True,
                         text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out_json.read_text())


def test_mamba_walk_forward_keeps_states_in_thread(tmp_path):
    rows = _rows("mamba_compile.py", tmp_path=tmp_path)
    pass1 = [r for r in rows if r["kernel"].startswith("walk fwd pass 1")]
    pass2 = [r for r in rows if r["kernel"].startswith("walk fwd pass 2")]
    assert pass1 and pass2
    for r in pass1:
        assert r["BAR"] == 0 and r["spill_bytes"] == 0 and r["bound"] == "exp", r
    for r in pass2:
        assert r["BAR"] <= 8 and r["spill_bytes"] == 0 and r["instr_per_state"] <= 12, r
    walk_bwd = [r for r in rows if r["kernel"].startswith("walk bwd, SUB") and r["warps"] == 1]
    assert len(walk_bwd) == 4 and all(r["BAR"] <= 20 for r in walk_bwd), walk_bwd  # sums over channels stay in the warp
    assert [r["spill_bytes"] for r in walk_bwd if "SUB = 2" in r["kernel"]] == [0, 0], walk_bwd  # stores deferred too
    chain = [r for r in rows if r["kernel"].startswith("chunk chain")]
    assert chain and chain[0]["spill_bytes"] == 0, chain


def test_mamba_lane_shuffles_see_channel_l_in_lane_l():
    out = subprocess.run([sys.executable, str(BENCH / "mamba_compile.py"), "--check-lanes"], capture_output=True,
                         text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "80 shuffles, 0 with lanes off the channels" in out.stdout  # SUB = 2 and 4, and SUB = 2 stores deferred


def test_fp8_pv_attention_pipelines_its_v_tiles(tmp_path):
    rows = _rows("quant_compile.py", "--head-dim", "128", tmp_path=tmp_path)
    fp8 = [r for r in rows if r["path"] in ("sage_int8_fp8pv", "flash_fp8") and r["warps"] == 8]
    plain = [r for r in fp8 if not r["ahead"]]
    assert len(plain) == 4  # two paths x two key tiles (64, 128)
    for r in plain:
        assert r["LDGSTS"] >= 45 and r["LDG"] <= 30 and r["QGMMA"] > 0 and r["spill_store_bytes"] == 0, r
    # The look-ahead loops (every path): tiles still copied asynchronously (one scalar load: the K scale),
    # wgmma not serialized by ptxas, and exponentials issued while the next Q K^T runs. Loading the K scale
    # with the softmax put a shared-memory read after the wgmma wait (0 in flight); the fp16-PV path's plain
    # loop is serialized (C7515).
    ahead = [r for r in rows if r["ahead"]]
    assert {r["path"] for r in ahead} == {"sage_int8", "sage_int8_fp8pv", "flash_fp8"}
    for r in ahead:
        assert r["loop_LDG"] <= 1 and not r["wgmma_serialized"] and r["spill_store_bytes"] == 0, r
        assert r["loop_mufu_in_flight"] >= 16, r
