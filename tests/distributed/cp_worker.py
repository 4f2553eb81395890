"""Run in each spawned process: context-parallel results vs the single-process float64 reference.

Every rank draws the same full-sequence inputs from one seed, takes its shard, runs the distributed
function forward and backward, and compares its rows of o, dq, dk, dv (and parameter gradients, summed
over ranks) with the reference on the whole sequence. Each case's outcome goes to a JSON file per rank.
"""
from __future__ import annotations

import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist

import effattn
from effattn.distributed import ContextParallel, local, ring_attention, shard, ulysses_attention, unshard
from effattn.distributed import ring as ring_module
from effattn.reference import softmax_attention
from effattn.testing import compare

CHUNK = 3  # tokens per zigzag chunk: N = 2 W CHUNK, odd chunks so no block size divides anything


def _inputs(world, heads, kv_heads, dtype=torch.float64, seed=0, dv=6):
    gen = torch.Generator().manual_seed(seed)
    N = 2 * world * CHUNK
    q = torch.randn(2, N, heads, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, N, kv_heads, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, N, kv_heads, dv, generator=gen, dtype=torch.float64)
    do = torch.randn(2, N, heads, dv, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, do)]


def _reference(q, k, v, do, **options):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o = softmax_attention(*leaves, **options)
    return [o, *torch.autograd.grad(o, leaves, do.double())]


def _check_sharded(fn, q, k, v, do, *, zigzag, tol=1e-10, **ref_options):
    """fn(q_shard, k_shard, v_shard) vs the reference on the gathered sequence, o and gradients.

    Every collective runs before any assertion, so a rank that fails does not leave the others waiting."""
    want = _reference(q, k, v, do, **ref_options)
    mine = [shard(x, zigzag=zigzag).clone().requires_grad_() for x in (q, k, v)]
    o = fn(*mine)
    got = [o, *torch.autograd.grad(o, mine, shard(do, zigzag=zigzag))]
    full = unshard(o.detach(), zigzag=zigzag)
    errors = []
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        w = shard(w, zigzag=zigzag)
        if tol is None:  # low precision: the 2x rule against plain PyTorch in the same dtype
            c = compare(name, g, _reference_in(q.dtype, q, k, v, do, name, zigzag, **ref_options), w, q.dtype)
            errors += [] if c.ok else [str(c)]
        else:
            err = (g.double() - w).abs().max().item()
            errors += [] if err <= tol else [f"{name}: max error {err:.3g} > {tol}"]
    if not torch.allclose(full.double(), want[0].detach(), atol=1e-4):
        errors.append("unshard does not restore the sequence")
    assert not errors, "; ".join(errors)


def _reference_in(dtype, q, k, v, do, name, zigzag, **options):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = softmax_attention(*leaves, **options)
    outs = dict(zip(("o", "dq", "dk", "dv"), [o, *torch.autograd.grad(o, leaves, do)]))
    return shard(outs[name], zigzag=zigzag)


def case_ring_causal_zigzag_gqa(world):
    q, k, v, do = _inputs(world, 4, 2)
    sent = []

    class Recording(ring_module.RingExchange):
        def __init__(self, tensors, *args):
            sent.extend(tuple(t.shape) for t in tensors)
            super().__init__(tensors, *args)

    ring_module.RingExchange = Recording
    try:
        _check_sharded(lambda *x: ring_attention(*x, causal=True, zigzag=True), q, k, v, do, zigzag=True,
                       causal=True)
    finally:
        ring_module.RingExchange = Recording.__bases__[0]
    # K/V (and dK/dV) travel with their Hkv = 2 heads: GQA never repeats them in the ring's buffers.
    assert sent and all(shape[2] == 2 for shape in sent), f"sent shapes {sorted(set(sent))}"


def case_ring_causal_contiguous_mqa(world):
    q, k, v, do = _inputs(world, 4, 1, seed=1)
    _check_sharded(lambda *x: ring_attention(*x, causal=True, zigzag=False, scale=0.3), q, k, v, do,
                   zigzag=False, causal=True, scale=0.3)


def case_ring_noncausal_mha(world):
    q, k, v, do = _inputs(world, 2, 2, seed=2)
    _check_sharded(lambda *x: ring_attention(*x), q, k, v, do, zigzag=False)


def case_ring_float32_causal(world):
    q, k, v, do = _inputs(world, 4, 2, dtype=torch.float32, seed=3, dv=8)
    _check_sharded(lambda *x: ring_attention(*x, causal=True), q, k, v, do, zigzag=True, tol=None, causal=True)


def case_ring_flash_backend(world):
    q, k, v, do = _inputs(world, 4, 2, dtype=torch.float32, seed=9, dv=16)
    q, k = (torch.nn.functional.pad(x, (0, 8)) for x in (q, k))  # the kernels take D in 16, 32, ...
    _check_sharded(lambda *x: ring_attention(*x, causal=True, backend="flash"), q, k, v, do, zigzag=True,
                   tol=None, causal=True)


def case_ring_lse(world):
    q, k, v, _ = _inputs(world, 4, 2, seed=4)
    _, lse_ref = softmax_attention(q, k, v, causal=True, return_lse=True)
    _, lse = ring_attention(*(shard(x, zigzag=True) for x in (q, k, v)), causal=True, return_lse=True)
    err = (lse - shard(lse_ref, zigzag=True, dim=2)).abs().max().item()
    assert err <= 1e-10, f"lse: max error {err:.3g}"


def case_ulysses_causal_gqa(world):
    q, k, v, do = _inputs(world, 2 * world, world, seed=5)
    _check_sharded(lambda *x: ulysses_attention(*x, method="gqa", causal=True), q, k, v, do, zigzag=False,
                   causal=True)


def case_ulysses_zigzag_callable(world):
    q, k, v, do = _inputs(world, world, world, seed=6)
    fn = effattn.compact.mha.standard_attention
    _check_sharded(lambda *x: ulysses_attention(*x, method=fn, zigzag=True, causal=True, scale=0.5), q, k, v,
                   do, zigzag=True, causal=True, scale=0.5)


class _Layer(torch.nn.Module):
    """Token-wise projections around one effattn.attention call, like any attention layer."""

    def __init__(self, dim=16, heads=4, kv_heads=2, head_dim=4):
        super().__init__()
        self.shape = (heads, kv_heads, head_dim)
        self.wq = torch.nn.Linear(dim, heads * head_dim, dtype=torch.float64)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * head_dim, dtype=torch.float64)
        self.wo = torch.nn.Linear(heads * head_dim, dim, dtype=torch.float64)

    def forward(self, x):
        B, N, _ = x.shape
        H, Hkv, d = self.shape
        q = self.wq(x).view(B, N, H, d)
        k, v = self.wkv(x).view(B, N, 2, Hkv, d).unbind(2)
        return self.wo(effattn.attention(q, k, v, method="gqa", causal=True).reshape(B, N, H * d))


def _check_layer(world, mode):
    torch.manual_seed(7)
    layer = _Layer(heads=2 * world, kv_heads=world)
    x = torch.randn(2, 2 * world * CHUNK, 16, dtype=torch.float64)
    dy = torch.randn_like(x)
    y_ref = layer(x)
    want = torch.autograd.grad(y_ref, list(layer.parameters()), dy)
    cp = ContextParallel(layer, mode=mode, zigzag=True)
    y = cp(shard(x, zigzag=True))
    got = torch.autograd.grad(y, list(layer.parameters()), shard(dy, zigzag=True))
    for g in got:
        dist.all_reduce(g)  # each rank holds its tokens' share of the parameter gradient
    err = (y - shard(y_ref, zigzag=True)).abs().max().item()
    assert err <= 1e-10, f"layer output: max error {err:.3g}"
    errs = [(g - w).abs().max().item() for g, w in zip(got, want)]
    assert max(errs) <= 1e-10, f"parameter gradients: max errors {errs}"


def case_wrapper_ring(world):
    _check_layer(world, "ring")


def case_wrapper_ulysses(world):
    _check_layer(world, "ulysses")


def case_wrapper_function(world):
    q, k, v, do = _inputs(world, 4, 2, seed=8)
    cp = ContextParallel(effattn.attention, mode="ring")
    _check_sharded(lambda *x: cp(*x, method="gqa", causal=True), q, k, v, do, zigzag=True, causal=True)


def case_errors(world):
    q, k, v, _ = _inputs(world, 3, 1)
    with pytest.raises(ValueError, match="must both divide by the world size"):
        ulysses_attention(*(shard(x) for x in (q, k, v)))
    with pytest.raises(ValueError, match="mode='ring' runs exact full softmax"):
        ContextParallel(effattn.attention)(q, q, q, method="linear_transformer")


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}
# Four processes share CI's two cores: there, the cases whose schedules change with the ring's length.
CASES_BY_WORLD = {2: sorted(CASES), 4: ["errors", "ring_causal_contiguous_mqa", "ring_causal_zigzag_gqa",
                                        "ring_noncausal_mha", "ulysses_causal_gqa", "ulysses_zigzag_callable",
                                        "wrapper_ring"]}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    local.QUERY_BLOCK = 5  # several blocks, the last one ragged
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    try:
        for name in CASES_BY_WORLD[world]:
            try:
                CASES[name](world)
                results[name] = "ok"
            except Exception:  # recorded per case; the test reports it
                results[name] = traceback.format_exc(limit=4)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()

