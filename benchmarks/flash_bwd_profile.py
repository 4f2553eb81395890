"""Diagnostic probe (GPU): where fwd+bwd time goes, kernel by kernel, for our flash and the anchors.

    PYTHONPATH=src python3 benchmarks/flash_bwd_profile.py --out DIR [--cases dense,window,patterns] [--n 16384]

bf16, H = 16, B = 1, N = 16384 (or --n). For each case, torch.profiler sums the CUDA time of every kernel over a few
fwd+bwd steps (after a warm-up that also runs the tuner) and reports milliseconds per step and kernel:
- dense: D = 128 (causal and not) and D = 64 (not causal), ours vs SDPA's flash and cuDNN backends;
- window: causal sliding window 1024, D = 128, ours (native band) vs compiled FlexAttention;
- patterns: the window and Longformer (512 + 16 globals) as block masks of 128 x 64 and 128 x 128 tiles
  vs compiled FlexAttention with the same mask_mod.
Also writes the tuner's timing of every candidate configuration, so a kernel's alternatives can be compared.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import effattn
from effattn.hardware import _flash_common
from effattn.sparse.pattern_methods import SPECS

N, H = 16384, 16
STEPS = 5


def kernel_ms(step) -> dict:
    """Milliseconds per step of every CUDA kernel that `step` launches, largest first."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    total = collections.Counter()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.key[:90]] += e.self_device_time_total / 1e3 / STEPS
    out = dict(total.most_common())
    out["TOTAL"] = sum(total.values())
    return out


def fwd_bwd(call, *inputs):
    def step():
        o = call()
        o.backward(torch.ones_like(o))
        for t in inputs:
            t.grad = None
    return step


def inputs(D, layout="bthd"):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1, N, H, D, generator=g).cuda().bfloat16() for _ in range(3)]
    if layout == "bhtd":
        ts = [t.transpose(1, 2).contiguous() for t in ts]
    return [t.requires_grad_() for t in ts]


def sdpa(backend, q, k, v, causal):
    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return call


def dense_cases(res):
    for D, causal in ((128, True), (128, False), (64, False)):
        q, k, v = inputs(D)
        qt, kt, vt = inputs(D, "bhtd")
        name = f"dense D={D} causal={causal}"
        res[name] = {"ours": kernel_ms(fwd_bwd(lambda: effattn.flash_attention(q, k, v, causal=causal), q, k, v)),
                     "sdpa_flash": kernel_ms(fwd_bwd(sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal), qt, kt, vt)),
                     "cudnn": kernel_ms(fwd_bwd(sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, causal), qt, kt, vt))}
        print(name, {k_: round(v_["TOTAL"], 3) for k_, v_ in res[name].items()}, flush=True)


def pattern_cases(res, with_masks):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.config.cache_size_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    specs = {s.name: s for s in SPECS}
    opts = {"sliding_window": {"window": 1024}, "longformer": {"window": 512, "global_tokens": tuple(range(16))}}
    q, k, v = inputs(128)
    qt, kt, vt = inputs(128, "bhtd")
    for name in (("sliding_window", "longformer") if with_masks else ("sliding_window",)):
        pattern = specs[name].build(N, N, H, **opts[name])
        fbm = create_block_mask(pattern, None, H if pattern.per_head else None, N, N, device="cuda")
        row = res[name] = {"flex": kernel_ms(fwd_bwd(lambda: flex(qt, kt, vt, block_mask=fbm), qt, kt, vt))}
        if name == "sliding_window":
            row["ours native band"] = kernel_ms(fwd_bwd(
                lambda: effattn.flash_attention(q, k, v, causal=True, window=(1024, 0)), q, k, v))
        if with_masks:
            for block in ((128, 64), (128, 128)):
                bm = pattern.block_mask(1, H, N, N, block=block, device="cuda")
                row[f"ours mask {block[0]}x{block[1]}"] = kernel_ms(fwd_bwd(
                    lambda: effattn.flash_attention(q, k, v, block_mask=bm), q, k, v))
        print(name, {k_: round(v_["TOTAL"], 3) for k_, v_ in row.items()}, flush=True)


def main():
    global N
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--cases", default="dense,window,patterns")
    ap.add_argument("--n", type=int, default=N, help="sequence length")
    args = ap.parse_args()
    N = args.n
    os.makedirs(args.out, exist_ok=True)
    cases = args.cases.split(",")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "N": N, "H": H, "steps": STEPS}

    def save():
        res["tuner"] = {repr(k): {repr(c): ms for c, ms in v.items()} for k, v in _flash_common.TIMINGS.items()}
        with open(f"{args.out}/flash_bwd_profile.json", "w") as f:
            json.dump(res, f, indent=1)

    if "dense" in cases:
        dense_cases(res)
        save()
    if "window" in cases or "patterns" in cases:
        pattern_cases(res, "patterns" in cases)
    save()


if __name__ == "__main__":
    main()
