"""Compile the linear engine's kernels for Hopper (sm_90a) on a machine without a GPU: the shared memory of
every tuner candidate, as the engine launches them (benchmarks/flash_compile.py reads registers and SASS).

    python benchmarks/engine_compile.py --dtype fp32 bf16 --dim 128 --gate scalar --delta-rule
    python benchmarks/engine_compile.py --dtype fp32 --dim 64 128 --gate vector --all

One forward and backward runs first under Triton's interpreter at the chosen Dk = Dv, and every kernel
launch is recorded with its real argument dtypes and constexprs; each candidate configuration of each kernel
is then compiled for sm_90a, up to the first that fits (`--all`: every one). A kernel none of whose candidates
fits in Hopper's 227 KB of shared memory per block cannot run there at all (on 2026-12-04 `_bwd_dqk` with
float32 inputs at Dk = Dv = 128 needed 240-360 KB in every candidate, and the quality harness's Gated DeltaNet
at width 256 stopped on it). It times nothing and cannot catch faults that only the GPU shows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if "--record" in sys.argv:  # the recording pass (a child process) runs the kernels on the CPU
    os.environ["TRITON_INTERPRET"] = "1"
else:  # compile, never interpret: the interpreter's kernels cannot be compiled
    os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER_SHARED_BYTES = 232448  # the most dynamic shared memory one block may take on sm_90
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
          torch.int64: "*i64"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def record_launches(dtype: torch.dtype, dim: int, gate: str, delta_rule: bool, T: int = 40) -> list[dict]:
    """Run one forward and backward of the engine at Dk = Dv = dim under the interpreter; returns, per kernel
    launch through the tuner: name, kernel, candidate configs (as the tuner sees them), args and constexprs."""
    from effattn.linear import chunk_gated_linear_attn, engine

    records, real_tuned, real_pick = [], engine._tuned, engine.pick_config

    def pick(key, configs, launch):
        records[-1]["configs"] = list(configs)
        return real_pick(key, configs, launch)

    def tuned(name, kernel, grid, key, configs, *args, variant=None, **meta):
        a, extra = (args, {}) if variant is None else variant(configs[0])
        records.append({"name": name, "module": kernel.fn.__module__, "kernel": kernel.fn.__name__,
                        "signature": _signature(kernel.arg_names, a, {**meta, **extra})})
        return real_tuned(name, kernel, grid, key, configs, *args, variant=variant, **meta)

    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = (r(1, T, 1, dim).to(dtype).requires_grad_() for _ in range(3))
    g = {"none": None, "scalar": -torch.rand(1, T, 1, generator=gen),
         "vector": -torch.rand(1, T, 1, dim, generator=gen)}[gate]
    beta = torch.rand(1, T, 1, generator=gen).to(dtype) if delta_rule else None
    if delta_rule:
        k = torch.nn.functional.normalize(k.detach().float(), dim=-1).to(dtype).requires_grad_()
    engine._tuned, engine.pick_config = tuned, pick
    try:
        chunk_gated_linear_attn(q, k, v, g, beta, delta_rule=delta_rule).float().sum().backward()
    finally:
        engine._tuned, engine.pick_config = real_tuned, real_pick
    return records


def _signature(arg_names, args, meta) -> dict:
    """{argument: Triton type, or ["constexpr", value]} of one launch (pointer types from the tensors)."""
    sig = {}
    for name, value in zip(arg_names, list(args) + [None] * len(arg_names)):
        if name in meta:
            sig[name] = ["constexpr", meta[name]]
        elif value is None:
            sig[name] = ["constexpr", None]
        elif isinstance(value, torch.Tensor):
            sig[name] = _TYPES[value.dtype]
        else:
            sig[name] = "fp32" if isinstance(value, float) else "i32"
    return sig


def compile_sm90(record: dict, config, dtype: str):
    """Compile one recorded launch with one candidate (BV, num_warps, num_stages[, BK[, RAW_G]]) for sm_90a,
    with the dot precision the GPU uses for `dtype` (the interpreter's differs: "ieee" against "tf32x3" for
    float32)."""
    import importlib

    from effattn.hardware._flash_common import dot_precision

    fn = getattr(importlib.import_module(record["module"]), record["kernel"])
    sig = dict(record["signature"], BV=["constexpr", config[0]])
    if "PREC" in sig:
        sig["PREC"] = ["constexpr", dot_precision(DTYPES[dtype])]
    if len(config) > 3:
        sig["BK"] = ["constexpr", config[3]]
    if len(config) > 4:  # the state pass's scalar-gate variant (engine._forward)
        sig["RAW_G"] = ["constexpr", config[4]]
    types = {n: "constexpr" if isinstance(t, list) else t for n, t in sig.items()}
    constexprs = {(fn.arg_names.index(n),): t[1] for n, t in sig.items() if isinstance(t, list)}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types[n].startswith("*")}
    src = ASTSource(fn, types, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": config[1],
                                                                           "num_stages": config[2]})


def recorded(dtype: str, dim: int, gate: str, delta_rule: bool) -> list[dict]:
    """`record_launches` in a child process under the interpreter (this one compiles)."""
    cmd = [sys.executable, __file__, "--record", "--dtype", dtype, "--dim", str(dim), "--gate", gate]
    out = subprocess.run(cmd + (["--delta-rule"] if delta_rule else []), capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"the recording pass failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def survey(dtype: str, dim: int, gate: str, delta_rule: bool, all_candidates: bool = False, ptxas: bool = False):
    """Shared memory of each launched kernel's candidates, up to the first that fits (or all of them), one
    row at a time: float32 kernels at Dk = 128 take ptxas up to a minute each. With `ptxas`, also registers,
    spill bytes and SASS counts (flash_compile.report)."""
    for record in recorded(dtype, dim, gate, delta_rule):
        for config in record["configs"]:
            compiled = compile_sm90(record, config, dtype)
            shared = compiled.metadata.shared
            row = {"kernel": record["name"], "config": tuple(config), "shared_bytes": shared,
                   "fits": shared <= HOPPER_SHARED_BYTES}
            if ptxas:
                from flash_compile import report
                row.update({k: v for k, v in report(compiled).items() if k != "shared_bytes"})
            yield row
            if shared <= HOPPER_SHARED_BYTES and not all_candidates:
                break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    p.add_argument("--dim", nargs="+", type=int, default=[128], help="Dk = Dv")
    p.add_argument("--gate", nargs="+", choices=("none", "scalar", "vector"), default=["scalar"])
    p.add_argument("--delta-rule", action="store_true")
    p.add_argument("--all", action="store_true", help="every candidate, not only up to the first that fits")
    p.add_argument("--ptxas", action="store_true", help="also registers, spill bytes and SASS instruction counts")
    p.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # the child pass: print the launches
    args = p.parse_args()
    if args.record:
        print(json.dumps(record_launches(DTYPES[args.dtype[0]], args.dim[0], args.gate[0], args.delta_rule)))
        return
    for dt in args.dtype:
        for dim in args.dim:
            for gate in args.gate:
                print(f"# {dt}, Dk = Dv = {dim}, gate {gate}, delta rule {args.delta_rule}", flush=True)
                for row in survey(dt, dim, gate, args.delta_rule, args.all, args.ptxas):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
