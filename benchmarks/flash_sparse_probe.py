"""Diagnostic probe (one device call): where the block-sparse forward loses time on pattern masks.

    PYTHONPATH=src python3 benchmarks/flash_sparse_probe.py --out DIR            # parent: every variant
    PYTHONPATH=src python3 benchmarks/flash_sparse_probe.py --variant rows_tma   # one variant (child)

Each variant runs in its own process (Triton caches a kernel's dependencies on first compile, so swapping a
@triton.jit helper needs a fresh interpreter). For a sliding window (1024, causal) and Longformer (window
512 + 16 global tokens) at N = 16384, H = 16, D = 128, bf16, 128 x 64 BlockMask tiles, it times the forward:

- gather: partial-tile bitmask read with one load per score (the kernel before 2026-12-02);
- rows / rows_tma: one load per row and word, expanded by shifts (pointer loads / TMA descriptor loads);
- nobits: partial tiles read no bitmask at all (wrong output; it bounds what the bitmask can cost);
- tuned: whatever the tuner picks;
beside the kernel's native window path (no BlockMask), dense flash and compiled FlexAttention with the mask.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

VARIANTS = {"gather": "128,64,8,3,0", "rows": "128,64,8,3,0", "rows_tma": "128,64,8,3,1", "nobits": "128,64,8,3,1",
            "tuned": None}
N, H, D = 16384, 16, 128


@triton.jit
def _bits_gather(BITS, tile, r, c, BLOCK_Q: tl.constexpr, WORDS: tl.constexpr):
    w = tl.load(BITS + (tile * BLOCK_Q + r) * WORDS + c // 32)
    return ((w >> (c % 32)) & 1) != 0


@triton.jit
def _bits_none(BITS, tile, r, c, BLOCK_Q: tl.constexpr, WORDS: tl.constexpr):
    return (r >= 0) & (c >= 0)


def patterns():
    from effattn.sparse.pattern_methods import longformer_pattern, sliding_window_pattern
    return {"sliding_window": sliding_window_pattern(N, N, H, window=1024, causal=True),
            "longformer": longformer_pattern(N, N, H, window=512, global_tokens=tuple(range(16)))}


def ms(fn):
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def child(variant: str) -> dict:
    import effattn
    from effattn.hardware import flash_fwd
    if variant == "gather":
        flash_fwd._tile_bits = _bits_gather
    if variant == "nobits":
        flash_fwd._tile_bits = _bits_none
    if VARIANTS[variant]:
        os.environ["EFFATTN_FLASH_CONFIGS"] = "fwd=" + VARIANTS[variant]
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for name, p in patterns().items():
        bm = p.block_mask(1, H, N, N, block=(128, 64), device="cuda")
        with torch.no_grad():
            out[name] = {"ms": ms(lambda: effattn.flash_attention(q, k, v, block_mask=bm)),
                         "density": bm.density(), "partial_tiles": int(bm.kv_num.sum()), "full_tiles": int(bm.full_kv_num.sum())}
    from effattn.hardware._flash_common import _BEST
    out["picked"] = {str(k_): list(v_) for k_, v_ in _BEST.items()}
    return out


def anchors() -> dict:
    import effattn
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    res = {}
    with torch.no_grad():
        res["dense_flash_ms"] = ms(lambda: effattn.flash_attention(q, k, v))
        res["native_window_ms"] = ms(lambda: effattn.flash_attention(q, k, v, causal=True, window=(1024, 0)))
        for name, p in patterns().items():
            fbm = create_block_mask(p, None, None, N, N, device="cuda")
            res[f"flex_{name}_ms"] = ms(lambda: flex(qt, kt, vt, block_mask=fbm))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--variant", choices=list(VARIANTS))
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(child(a.variant)), flush=True)
        return
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "N": N, "H": H, "D": D, "variants": {}}
    for variant in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True, timeout=240)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        res["variants"][variant] = json.loads(lines[-1]) if lines else {"error": r.stderr[-800:]}
        print(variant, json.dumps(res["variants"][variant]), flush=True)
    res["anchors"] = anchors()
    print("anchors", json.dumps(res["anchors"]), flush=True)
    if a.out:
        with open(os.path.join(a.out, "flash_sparse_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
