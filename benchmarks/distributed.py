"""Context-parallel attention on W GPUs vs one: speed at the same total sequence, and the longest sequence.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 benchmarks/distributed.py --out results_dir

1. Correctness on the GPU (bf16): ring (causal zigzag, MHA and GQA; non-causal) and Ulysses vs the float64
   reference on the gathered sequence, by the library's 2x rule (effattn.testing.compare).
2. Speed, fwd+bwd, B=1, H=16, D=128, bf16, causal: the same ring code on one GPU (a group of one: the
   local kernel alone) and on W GPUs, Ulysses on W GPUs, and PyTorch SDPA (flash and cuDNN) on one GPU as
   anchors. Timing: CUDA events around each iteration, median, slowest rank.
3. Longest sequence: peak allocated bytes of one fwd+bwd at two lengths give bytes per token; the longest
   length whose step fits a per-GPU budget is then run and its peak checked against the budget.
Results: JSON and Markdown in --out (rank 0 writes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from effattn.distributed import ring_attention, shard, ulysses_attention  # noqa: E402
from effattn.reference import softmax_attention  # noqa: E402
from effattn.testing import compare  # noqa: E402

H, D = 16, 128
MATMUL_TFLOPS = 790.0  # bf16 matrix-product rate measured on the H200 (KINDS.md), the compute ceiling
DEVICE = "cuda"


def log(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def inputs(N, heads=H, kv_heads=H, dtype=torch.bfloat16, seed=0):
    device = DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = [(1, N, heads, D), (1, N, kv_heads, D), (1, N, kv_heads, D), (1, N, heads, D)]
    return [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]


def sdpa(q, k, v, causal=False, backend=None):
    """PyTorch SDPA on [B, T, H, D] (the anchors, and Ulysses' local method)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ctx = sdpa_kernel(backend) if backend is not None else sdpa_kernel(
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    with ctx:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                           enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- checks
def check_case(name, fn, N, heads, kv_heads, causal, zigzag):
    q, k, v, do = inputs(N, heads, kv_heads, seed=1)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    o64 = softmax_attention(*leaves64, causal=causal)
    ref = [o64, *torch.autograd.grad(o64, leaves64, do.double())]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ob = softmax_attention(*leaves, causal=causal)
    base = [ob, *torch.autograd.grad(ob, leaves, do)]
    mine = [shard(x, zigzag=zigzag).clone().requires_grad_() for x in (q, k, v)]
    o = fn(*mine)
    got = [o, *torch.autograd.grad(o, mine, shard(do, zigzag=zigzag))]
    rows = []
    for label, g, b, r in zip(("o", "dq", "dk", "dv"), got, base, ref):
        c = compare(label, g, shard(b, zigzag=zigzag), shard(r, zigzag=zigzag), torch.bfloat16)
        ok = torch.tensor([float(c.ok), c.error, c.allowed], device=DEVICE, dtype=torch.float64)
        flags = [torch.zeros_like(ok) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, ok)
        worst = max(flags, key=lambda f: float(f[1]) / max(float(f[2]), 1e-30))  # the rank nearest its bound
        rows.append({"case": name, "tensor": label, "ok": all(bool(f[0]) for f in flags),
                     "error": float(worst[1]), "allowed": float(worst[2])})
    return rows


def run_checks(world, N):
    cases = [
        ("ring causal zigzag MHA", lambda *x: ring_attention(*x, causal=True), H, H, True, True),
        ("ring causal zigzag GQA 16/4", lambda *x: ring_attention(*x, causal=True), H, 4, True, True),
        ("ring non-causal", lambda *x: ring_attention(*x), H, H, False, False),
        ("ring causal zigzag, SDPA local", lambda *x: ring_attention(*x, causal=True, backend="sdpa"), H, H, True, True),
        ("ring causal zigzag, cuDNN local", lambda *x: ring_attention(*x, causal=True, backend="cudnn"), H, H, True, True),
        ("ring causal zigzag GQA 16/4, cuDNN local", lambda *x: ring_attention(*x, causal=True, backend="cudnn"), H, 4,
         True, True),
        ("ulysses causal (SDPA local)", lambda *x: ulysses_attention(*x, method=sdpa, causal=True), H, H, True, False),
    ]
    rows = []
    for name, fn, heads, kv_heads, causal, zigzag in cases:
        rows += check_case(name, fn, N, heads, kv_heads, causal, zigzag)
        log(f"check {name}: " + ", ".join(f"{r['tensor']} {'ok' if r['ok'] else 'FAIL'} {r['error']:.3g}/{r['allowed']:.3g}"
                                           for r in rows if r["case"] == name))
    return rows


# ---------------------------------------------------------------------------------------------- timing
def timed(step, iters=5, warmup=2):
    """Median ms of step() over iters (after warmup), the slowest rank's: every rank runs the same count."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor([statistics.median(times)], device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def train_step(fn, q, k, v, do):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def step():
        o = fn(*leaves)
        o.backward(do)
        for x in leaves:
            x.grad = None
    return step


def agreed(flag: bool) -> bool:
    """True on every rank if it is true on rank 0 (so all ranks take the same branch)."""
    t = torch.tensor([float(flag)], device=DEVICE)
    dist.broadcast(t, 0)
    return bool(t.item())


def run_speed(world, solo, seqs, deadline):
    rows = []
    for N in seqs:
        if not agreed(time.time() < deadline):
            log(f"speed: stopping before N={N}, out of time")
            break
        q, k, v, do = inputs(N)
        flops = 3.5 * 4 * N * N * D * H / 2  # causal fwd+bwd
        row = {"N": N, "fwd_bwd_tflop": flops / 1e12}
        # One GPU: every rank runs the full sequence alone (its own group of one), at the same time.
        row["ring_1gpu_ms"] = timed(train_step(lambda *x: ring_attention(*x, causal=True, group=solo), q, k, v, do))
        for label, backend in (("sdpa_flash_1gpu_ms", "FLASH_ATTENTION"), ("sdpa_cudnn_1gpu_ms", "CUDNN_ATTENTION")):
            from torch.nn.attention import SDPBackend
            try:
                row[label] = timed(train_step(lambda *x, b=getattr(SDPBackend, backend): sdpa(*x, causal=True, backend=b),
                                              q, k, v, do))
            except RuntimeError as e:  # a backend that refuses the shape
                row[label] = None
                log(f"{label} N={N}: {str(e)[:120]}")
        qz, kz, vz, doz = (shard(x, zigzag=True) for x in (q, k, v, do))
        row[f"ring_{world}gpu_ms"] = timed(train_step(lambda *x: ring_attention(*x, causal=True), qz, kz, vz, doz))
        row[f"ring_{world}gpu_sdpa_local_ms"] = timed(train_step(
            lambda *x: ring_attention(*x, causal=True, backend="sdpa"), qz, kz, vz, doz))
        row[f"ring_{world}gpu_cudnn_local_ms"] = timed(train_step(
            lambda *x: ring_attention(*x, causal=True, backend="cudnn"), qz, kz, vz, doz))
        qc, kc, vc, doc = (shard(x) for x in (q, k, v, do))
        row[f"ulysses_{world}gpu_ms"] = timed(train_step(
            lambda *x: ulysses_attention(*x, method=sdpa, causal=True), qc, kc, vc, doc))
        row["speedup_ring_vs_ring1"] = row["ring_1gpu_ms"] / row[f"ring_{world}gpu_ms"]
        if row["sdpa_cudnn_1gpu_ms"]:
            row["speedup_ring_cudnn_local_vs_sdpa_cudnn"] = row["sdpa_cudnn_1gpu_ms"] / row[f"ring_{world}gpu_cudnn_local_ms"]
        if row["sdpa_flash_1gpu_ms"]:
            row["speedup_ring_sdpa_local_vs_sdpa_flash"] = row["sdpa_flash_1gpu_ms"] / row[f"ring_{world}gpu_sdpa_local_ms"]
        best1 = min(t for t in (row["ring_1gpu_ms"], row["sdpa_flash_1gpu_ms"], row["sdpa_cudnn_1gpu_ms"]) if t)
        best_ring = min(row[f"ring_{world}gpu_ms"], row[f"ring_{world}gpu_sdpa_local_ms"],
                        row[f"ring_{world}gpu_cudnn_local_ms"])
        row["speedup_ring_vs_best_1gpu"] = best1 / best_ring
        row["speedup_ulysses_vs_best_1gpu"] = best1 / row[f"ulysses_{world}gpu_ms"]
        row[f"ring_{world}gpu_tflops_per_gpu"] = flops / world / (row[f"ring_{world}gpu_ms"] * 1e-3) / 1e12
        # Floors: the causal work split evenly at the measured bf16 matmul rate (KINDS.md, ~790 TFLOP/s on
        # H200), and the K/V bytes one ring step moves (hidden behind compute when overlap works).
        row[f"compute_floor_{world}gpu_ms"] = flops / world / MATMUL_TFLOPS / 1e9
        row["kv_bytes_per_step"] = 2 * (N // world) * H * D * 2
        log(json.dumps(row))
        rows.append(row)
        del q, k, v, do, qz, kz, vz, doz, qc, kc, vc, doc
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- memory
def peak_bytes(fn, N_local, world_inputs):
    """Peak bytes allocated above the inputs by one fwd+bwd (max over ranks), inputs of N_local tokens."""
    q, k, v, do = world_inputs(N_local)
    step = train_step(fn, q, k, v, do)
    step()  # first call: kernel autotuning allocates buffers of its own
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    t = torch.tensor([torch.cuda.max_memory_allocated() - before], device=DEVICE, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del q, k, v, do
    return float(t) + 4 * N_local * H * D * 2  # + the inputs q, k, v, do themselves


def run_fit(world, solo, budget_gib, quantum, lengths):
    budget = budget_gib * 2 ** 30
    configs = {
        "sdpa_flash_1gpu": (lambda *x: sdpa(*x, causal=True, backend=_flash_backend()), 1),
        "1gpu": (lambda *x: ring_attention(*x, causal=True, group=solo), 1),
        "cudnn_1gpu": (lambda *x: ring_attention(*x, causal=True, group=solo, backend="cudnn"), 1),
        f"ring_{world}gpu": (lambda *x: ring_attention(*x, causal=True), world),
        f"ring_{world}gpu_cudnn_local": (lambda *x: ring_attention(*x, causal=True, backend="cudnn"), world),
        f"ulysses_{world}gpu": (lambda *x: ulysses_attention(*x, method=sdpa, causal=True), world),
    }
    out = {"budget_gib": budget_gib}
    for label, (fn, parts) in configs.items():
        def world_inputs(n_local):
            return inputs(n_local, seed=2)
        a, b = lengths  # total lengths; each rank holds total / parts tokens
        pa, pb = peak_bytes(fn, a // parts, world_inputs), peak_bytes(fn, b // parts, world_inputs)
        per_token = (pb - pa) / (b - a)  # bytes per token of the total sequence, on each GPU
        n_max = max(quantum, int((budget - (pa - per_token * a)) / max(per_token, 1.0)) // quantum * quantum)
        measured = peak_bytes(fn, n_max // parts, world_inputs)
        for _ in range(3):  # the linear model was optimistic: scale down until it fits
            if measured <= budget:
                break
            n_max = max(quantum, int(n_max * budget / measured) // quantum * quantum)
            measured = peak_bytes(fn, n_max // parts, world_inputs)
        out[label] = {"bytes_per_token_per_gpu": per_token, "longest_N": n_max, "peak_gib_at_longest": measured / 2 ** 30}
        log(f"fit {label}: {per_token:.0f} B/token/GPU, longest N = {n_max} (peak {measured / 2 ** 30:.2f} GiB)")
        torch.cuda.empty_cache()
    best1 = max(out[c]["longest_N"] for c in ("1gpu", "cudnn_1gpu", "sdpa_flash_1gpu"))
    for label in configs:
        out[label]["ratio_vs_1gpu"] = out[label]["longest_N"] / best1
    return out


def _flash_backend():
    from torch.nn.attention import SDPBackend
    return SDPBackend.FLASH_ATTENTION


# ---------------------------------------------------------------------------------------------- report
def markdown(res):
    w = res["world"]
    lines = [f"# Context-parallel attention, {w} GPUs vs 1", "",
             f"{res['date']}, {res['gpu']} x{w}, torch {res['torch']}, NCCL {res['nccl']}, bf16, B=1, H={H}, D={D}, "
             "causal, fwd+bwd.", f"Command: `{res['command']}`", "", "## Correctness (2x rule vs float64)", "",
             "| case | tensor | error | allowed | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['tensor']} | {r['error']:.3g} | {r['allowed']:.3g} | {'yes' if r['ok'] else 'NO'} |"
              for r in res.get("checks", [])]
    lines += ["", "## Same total sequence (ms per fwd+bwd, slowest rank)", "",
              f"| N | ring 1 GPU (flash local) | SDPA flash 1 GPU | SDPA cuDNN 1 GPU | ring {w} GPUs (zigzag, flash local) | "
              f"ring {w} GPUs (zigzag, SDPA local) | ring {w} GPUs (zigzag, cuDNN local) | Ulysses {w} GPUs (SDPA) | "
              "ring vs ring-1 | ring (cuDNN local) vs SDPA cuDNN | best ring vs best 1-GPU | Ulysses vs best 1-GPU | "
              "ring TFLOP/s per GPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in res.get("speed", []):
        lines.append(f"| {r['N']} | {fmt(r['ring_1gpu_ms'])} | {fmt(r['sdpa_flash_1gpu_ms'])} | "
                     f"{fmt(r['sdpa_cudnn_1gpu_ms'])} | {fmt(r[f'ring_{w}gpu_ms'])} | "
                     f"{fmt(r[f'ring_{w}gpu_sdpa_local_ms'])} | {fmt(r[f'ring_{w}gpu_cudnn_local_ms'])} | "
                     f"{fmt(r[f'ulysses_{w}gpu_ms'])} | "
                     f"{r['speedup_ring_vs_ring1']:.2f}x | {r.get('speedup_ring_cudnn_local_vs_sdpa_cudnn', 0):.2f}x | "
                     f"{r['speedup_ring_vs_best_1gpu']:.2f}x | "
                     f"{r['speedup_ulysses_vs_best_1gpu']:.2f}x | {r[f'ring_{w}gpu_tflops_per_gpu']:.0f} |")
    if res.get("speed"):
        lines += ["", f"Compute floor at {MATMUL_TFLOPS:.0f} TFLOP/s split over {w} GPUs: " + ", ".join(
            f"N={r['N']}: {r[f'compute_floor_{w}gpu_ms']:.1f} ms" for r in res["speed"]) +
            "; each ring step moves " + ", ".join(f"{r['kv_bytes_per_step'] / 2 ** 20:.0f} MiB" for r in res["speed"])
            + " of K/V per rank."]
    fit = res.get("fit")
    if fit:
        lines += ["", f"## Longest sequence whose fwd+bwd fits {fit['budget_gib']} GiB per GPU", "",
                  "| config | bytes/token/GPU | longest N | peak GiB | vs 1 GPU |", "|---|---|---|---|---|"]
        for label, r in fit.items():
            if isinstance(r, dict):
                lines.append(f"| {label} | {r['bytes_per_token_per_gpu']:.0f} | {r['longest_N']} | "
                             f"{r['peak_gib_at_longest']:.2f} | {r['ratio_vs_1gpu']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seqs", default="32768,65536,131072")
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--fit-lengths", default="16384,32768", help="two total lengths for the bytes-per-token slope")
    p.add_argument("--check-chunk", type=int, default=384, help="tokens per zigzag chunk in the checks")
    p.add_argument("--speed-deadline-s", type=float, default=170.0, help="start no new length after this")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: checks,speed,fit")
    args = p.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank),
                            timeout=datetime.timedelta(seconds=120))
    world = dist.get_world_size()
    solos = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in order
    solo = solos[dist.get_rank()]
    res = {"world": world, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())),
           "command": "torchrun --nproc-per-node %d benchmarks/distributed.py %s" % (world, " ".join(sys.argv[1:])),
           "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                  "NVSHMEM_DISABLE_NVLS")}}
    skip = set(filter(None, args.skip.split(",")))
    quantum = 2 * world * 256

    def save():
        if dist.get_rank() == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"distributed_{world}gpu.json"), "w") as f:
                json.dump(res, f, indent=1)
            with open(os.path.join(args.out, f"distributed_{world}gpu.md"), "w") as f:
                f.write(markdown(res))

    t0 = time.time()
    if "checks" not in skip:
        res["checks"] = run_checks(world, 2 * world * args.check_chunk)
        save()
    if "speed" not in skip:
        res["speed"] = run_speed(world, solo, [int(s) for s in args.seqs.split(",")], t0 + args.speed_deadline_s)
        save()
    if "fit" not in skip:
        res["fit"] = run_fit(world, solo, args.budget_gib, quantum, [int(x) for x in args.fit_lengths.split(",")])
        save()
    log(f"done in {time.time() - t0:.0f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
