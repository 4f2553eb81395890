"""benchmarks/flash_compile.py compiles a flash kernel for sm_90a without a GPU (Triton's own ptxas)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flash_compile.py"


def _compile(kernel: str, *args: str) -> dict:
    """benchmarks/flash_compile.py's report of one configuration, compiled for sm_90a."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # compile for the GPU target, not the interpreter
    out = subprocess.run([sys.executable, str(SCRIPT), "--kernel", kernel, *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_offline_hopper_compile_reports_registers_and_shared_memory():
    r = _compile("fwd", "--tile", "64,32", "--warps", "4", "--stages", "2", "--head-dim", "64", "--sparse")
    assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0
    assert r["HGMMA"] > 0  # Hopper's warpgroup MMA: it really was compiled for sm_90a


def test_look_ahead_overlaps_exponentials_with_the_next_scores():
    """The look-ahead forward candidate (D = 128, 128 x 64, 8 warps) issues its exponentials while the next
    block's Q K^T is in flight, without spilling; the plain loop waits for Q K^T first. ptxas gave up the
    overlap once when the masked loop after it was software-pipelined (255 registers)."""
    cfg = ("--tile", "128,64", "--warps", "8", "--stages", "3", "--head-dim", "128")
    plain, ahead = _compile("fwd", *cfg), _compile("fwd", *cfg, "--ahead")
    assert plain["loop_mufu_in_flight"] == 0 and plain["loop_instructions"] > 0
    assert ahead["loop_mufu_in_flight"] >= 16, ahead
    assert ahead["spill_store_bytes"] == 0


def test_early_dp_overlaps_the_backward_exponentials():
    """dK/dV with dP^T issued before the exponentials (D = 128, 64 x 128, 8 warps, 2 stages): they issue while
    the tensor cores work; in the plain order they wait for them."""
    cfg = ("--tile", "64,128", "--warps", "8", "--stages", "2", "--head-dim", "128")
    plain, early = _compile("dkdv", *cfg), _compile("dkdv", *cfg, "--ahead")
    assert plain["loop_mufu_in_flight"] == 0 and early["loop_mufu_in_flight"] >= 16, (plain, early)


def test_sink_parts_compile_for_hopper():
    """The sinks' row split (dK/dV's SINK_PARTS) compiles for sm_90a, which the interpreter's tests cannot
    show, with the same tensor-core work as the kernel without it and only its extra bookkeeping."""
    cfg = ("--tile", "64,64", "--warps", "4", "--stages", "2", "--head-dim", "64")
    plain, split = _compile("dkdv", *cfg), _compile("dkdv", *cfg, "--sink-parts")
    assert split["HGMMA"] == plain["HGMMA"] > 0 and split["instructions"] > plain["instructions"]
    assert split["loop_instructions"] > 0


def test_split_walks_compile_for_hopper():
    """The block-sparse kernels' part programs (SPLIT) compile for sm_90a, with the same tensor-core work as
    without them (the interpreter's tests cannot show that the runtime branches compile)."""
    cfg = ("--tile", "64,64", "--warps", "4", "--stages", "2", "--head-dim", "64", "--sparse")
    for kernel in ("fwd", "dq", "dkdv"):
        plain, split = _compile(kernel, *cfg), _compile(kernel, *cfg, "--split")
        assert split["HGMMA"] == plain["HGMMA"] > 0 and split["instructions"] > plain["instructions"], kernel


def test_register_cap_gives_the_window_dq_three_programs_an_sm():
    """`Config.regs` (ptx .maxnreg; a pinned `EFFATTN_FLASH_CONFIGS` field, no longer a tuner candidate): the dQ at
    64 x 32 in 2 stages capped at 160 compiles for sm_90a within 160 registers and 64 KB of shared memory, so three
    programs (12 warps) share an SM; uncapped it takes more."""
    cfg = ("--tile", "64,32", "--warps", "4", "--stages", "2", "--head-dim", "128")
    capped, free = _compile("dq", *cfg, "--regs", "160"), _compile("dq", *cfg)
    assert capped["registers"] <= 160 < free["registers"], (capped["registers"], free["registers"])
    assert 3 * capped["registers"] * 128 <= 65536 and 3 * (capped["shared_bytes"] + 1024) <= 233472
    assert capped["spill_store_bytes"] <= 64


def test_dq_reduce_probe_compiles_its_four_ways_of_adding_tiles():
    """benchmarks/dq_reduce_probe.py (GPU-only: the interpreter has no TMA reduce): for sm_90a its TMA mode is a
    bulk tensor reduce-add and its relaxed mode plain reductions, not the acq_rel atomics of the default."""
    code = f"""
import sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import flash_compile, dq_reduce_probe
for mode in (1, 2, 3):
    k = flash_compile.compile_typed(dq_reduce_probe._add_tiles, {{"DQ": "*fp32"}},
                                    dict(MODE=mode, BM=64, BN=64, D=128), 4)
    ptx = k.asm["ptx"]
    print(mode, "cp.reduce.async.bulk.tensor" in ptx, "acq_rel" in ptx, "relaxed" in ptx)
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines == ["1 False True False", "2 True False False", "3 False False True"], lines


def test_lazy_rescale_skips_the_output_rescale():
    """The lazy forward (D = 64, 128 x 64, 4 warps): compiled for sm_90a, its unmasked loop jumps over the
    rescale of the output tile (64 multiplies a thread and more) when no row's max grew, so the loop it runs is
    shorter than the eager one; no spills."""
    cfg = ("--tile", "128,64", "--warps", "4", "--stages", "3", "--head-dim", "64")
    eager, lazy = _compile("fwd", *cfg), _compile("fwd", *cfg, "--lazy")
    assert eager["loop_skippable"] == 0 and lazy["loop_skippable"] >= 64, (eager, lazy)
    assert lazy["loop_instructions"] - lazy["loop_skippable"] < eager["loop_instructions"]
    assert lazy["spill_store_bytes"] == 0
