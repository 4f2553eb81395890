"""Pattern-based sparse attention methods (survey Sec. 6.3), each a pattern run by the block-sparse kernel.

A method here is one function `(T, S, H, **options) -> Pattern` (the mask, in absolute positions); the
fast path builds its `BlockMask` and calls `effattn.flash_attention(q, k, v, block_mask=...)`, which skips
the empty blocks; the reference is `softmax_attention` with the same elementwise mask. Queries are
aligned bottom-right when T != S, as everywhere in effattn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch

from ..hardware.flash import flash_attention
from ..reference.softmax import softmax_attention
from ..validate import check_qkv, check_scale
from . import patterns as P


def pattern_attention(q, k, v, pattern, *, scale=None, block=None):
    """Softmax attention restricted to `pattern` (a mask function), through the block-sparse flash kernel.

    q: `[B, T, H, D]`, k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]`; `pattern(b, h, q_idx, kv_idx)` in
    absolute positions (query i at key position i + S - T). `block=(BQ, BK)` the kernel's tile (None: the
    kernel's default). Returns o `[B, T, H, Dv]`; rows that see no key are 0. Time O(visited blocks * BQ * BK * d).
    A plain sliding window (`pattern.window` set, with or without `pattern.sinks`) runs the kernel's window
    path instead of a block mask unless `block` is given: the same mask without partial-tile bitmasks (on
    the H200 at N = 16k the window path ran at 1.05-1.10x compiled Flex fwd, the block-mask path at
    1.00x; benchmarks/results/sparse_patterns_2026-12-04_h200.md). With `pattern.global_rows` = g (and
    T = S) the rows q >= g take that path and the g global rows a dense one (`_every_key`). A grid pattern
    (`pattern.grid`: neighborhood, sliding tile) runs with its tokens in the tile order that visits the
    fewest blocks (`grid_plan`), when that order beats raster order by TILE_ORDER_GAIN.
    """
    B, T, S, H, _, _, _ = check_qkv(q, k, v)
    check_scale(scale)
    p = P.as_pattern(pattern)
    if p.grid is not None and T == S == math.prod(p.grid):
        tile, bm = grid_plan(p, B, H, T, block, q.device)
        if tile is None:
            return flash_attention(q, k, v, block_mask=bm, scale=scale)
        to = lambda x: P.to_tile_order(x, p.grid, tile)  # noqa: E731
        return P.from_tile_order(flash_attention(to(q), to(k), to(v), block_mask=bm, scale=scale), p.grid, tile)
    if p.window is not None and block is None and (not p.global_rows or T == S):  # the kernel's own band
        left, right = p.window
        g = min(p.global_rows, T)
        if g == T:
            return _every_key(q, k, v, scale)
        # rows past the global ones: T - g queries bottom-right aligned to the keys, i.e. at positions g..T-1
        o = flash_attention(q[:, g:], k, v, causal=right == 0, window=(left, right), sink_tokens=p.sinks,
                            scale=scale)
        return torch.cat([_every_key(q[:, :g], k, v, scale), o], dim=1) if g else o
    p = p.shifted(S - T)
    bm = p.block_mask(B, H, T, S, block=block, device=q.device)
    return flash_attention(q, k, v, block_mask=bm, scale=scale)


# A tile order is taken when raster order visits this many times its blocks: the reordering costs four
# copies of a [B, N, H, D] tensor forward (q, k, v, o) and four backward (do, dq, dk, dv).
TILE_ORDER_GAIN = 1.25
_GRID_PLANS: dict = {}


def grid_plan(p: P.Pattern, B: int, H: int, N: int, block=None, device=None):
    """(tile, block mask) of grid pattern `p` over N tokens: `tile` None (raster order) or the tile shape of
    `p.tiles` whose tile order visits the fewest blocks, and that order's block mask. Cached under the
    pattern's name (which, for a grid pattern, holds all its parameters), the shapes and the device."""
    key = (p.__name__, p.grid, p.tiles, B if p.per_batch else 1, H if p.per_head else 1, N,
           None if block is None else tuple(block), str(device))
    if key not in _GRID_PLANS:
        raster = p.block_mask(B, H, N, N, block=block, device=device)
        tiled = [(tile, p.in_tile_order(tile).block_mask(B, H, N, N, block=block, device=device)) for tile in p.tiles]
        tile, bm = min(tiled, key=lambda plan: plan[1].density(), default=(None, raster))
        if len(_GRID_PLANS) >= 16:
            _GRID_PLANS.clear()
        _GRID_PLANS[key] = (tile, bm) if bm.density() * TILE_ORDER_GAIN <= raster.density() else (None, raster)
    return _GRID_PLANS[key]


def _every_key(q, k, v, scale, part_keys: int = 2048):
    """Dense attention of a few rows q `[B, g, H, D]` over all S keys, split-KV (FlashDecoding): the keys cut
    into P equal parts folded into the batch, so B * P * H programs share the work instead of B * H each
    walking all S keys; the parts' outputs combine by their LSEs (differentiable: the kernel's backward
    takes the LSE's gradient). P = the most parts of at least `part_keys` keys that divide S (1: one call)."""
    B, g, H, _ = q.shape
    S = k.shape[1]
    parts = max((p for p in range(1, S // part_keys + 1) if S % p == 0), default=1)
    if parts == 1:
        return flash_attention(q, k, v, scale=scale)
    fold = lambda t: t.reshape(B * parts, S // parts, *t.shape[2:])  # noqa: E731  (part-major keys)
    qp = q.unsqueeze(1).expand(B, parts, g, H, q.shape[3]).reshape(B * parts, g, H, q.shape[3])
    o, lse = flash_attention(qp, fold(k), fold(v), scale=scale, return_lse=True)  # [B*P, g, H, Dv], [B*P, H, g]
    w = torch.softmax(lse.view(B, parts, H, g), dim=1)  # each part's share of the row's softmax mass
    return (o.view(B, parts, g, H, -1).float() * w.permute(0, 1, 3, 2).unsqueeze(-1)).sum(1).to(q.dtype)


def pattern_reference(q, k, v, pattern, *, scale=None, **_ignored):
    """`softmax_attention` with the pattern's elementwise mask, bottom-right aligned (float64 ground truth)."""
    T, S = q.shape[1], k.shape[1]
    return softmax_attention(q, k, v, mask=P.as_pattern(pattern).shifted(S - T), scale=scale)


# ---------------------------------------------------------------- the patterns of the registered methods

def sliding_window_pattern(T, S, H, *, window=256, causal=True):
    """Each query sees the `window` keys before it (and after it unless causal), itself included."""
    return P.sliding_window(window, 0 if causal else window)


def longformer_pattern(T, S, H, *, window=256, global_tokens=(0,), causal=False):
    """Longformer (Beltagy et al. 2020): sliding window | global tokens (attend to / attended by all).
    Global tokens at a prefix 0..g-1 (the usual layout: [CLS], a question) run natively: the band with g
    sinks, and non-causally the g global rows over every key."""
    p = sliding_window_pattern(T, S, H, window=window, causal=causal) | P.global_tokens(global_tokens)
    p = p & P.causal() if causal else p
    g = len(set(global_tokens))
    if g and set(global_tokens) == set(range(g)):  # a prefix: the same mask, as window + sinks (+ global rows)
        return P.Pattern(p.fn, p.__name__, window=(window, 0 if causal else window), sinks=g,
                         global_rows=0 if causal else g)
    return p


def bigbird_pattern(T, S, H, *, block_size=64, window_blocks=1, global_blocks=1, random_blocks=2, seed=0):
    """BigBird (Zaheer et al. 2020): block window + global blocks + seeded random blocks per head."""
    return P.bigbird(max(T, S), S, block_size, window_blocks, global_blocks, random_blocks, seed, heads=H)


def sparse_transformer_pattern(T, S, H, *, stride=128, variant="strided", summary=1):
    """Sparse Transformer (Child et al. 2019), the union of its two heads' patterns ("strided" or "fixed")."""
    if variant == "strided":
        return P.strided(stride)
    if variant == "fixed":
        return P.fixed(stride, summary)
    raise ValueError(f"variant must be 'strided' or 'fixed', got {variant!r}")


def streaming_llm_pattern(T, S, H, *, sinks=4, window=1024):
    """StreamingLLM (Xiao et al. 2024b): attention sinks + the most recent `window` keys, causal."""
    return P.sinks_recent(sinks, window)


def _grid_pattern(T, S, grid, kernel, dims):
    if not isinstance(grid, (tuple, list)) or len(grid) != dims:
        raise TypeError(f"grid must be a tuple of {dims} ints, got {grid!r}")
    if not (T == S == math.prod(grid)):
        raise ValueError(f"neighborhood attention needs T == S == prod(grid) = {math.prod(grid)}, got T={T}, S={S}")
    return P.neighborhood(grid, kernel)


def neighborhood_2d_pattern(T, S, H, *, grid=(32, 32), kernel=(7, 7)):
    """NATTEN 2D: tokens of an image in raster order, each sees its kernel-sized window (clamped)."""
    return _grid_pattern(T, S, grid, kernel, 2)


def neighborhood_3d_pattern(T, S, H, *, grid=(8, 16, 16), kernel=(3, 7, 7)):
    """NATTEN 3D: tokens of a video (frames, height, width) in raster order."""
    return _grid_pattern(T, S, grid, kernel, 3)


# ---------------------------------------------------------------- registration

@dataclass(frozen=True)
class _Spec:
    name: str
    build: Callable
    options: Mapping[str, Any]
    test_options: Mapping[str, Any]
    cite: str
    description: str
    complexity: tuple
    grid: tuple | None = None  # the registry's shapes must be this grid's length


_PATTERNS: dict = {}


def _frozen(x):
    """A hashable copy of an option value (lists and tuples -> tuples); TypeError if there is none."""
    if isinstance(x, (list, tuple)):
        return tuple(_frozen(y) for y in x)
    hash(x)
    return x


def _built(spec: _Spec, T: int, S: int, H: int, options: dict) -> P.Pattern:
    """`spec.build(T, S, H, **options)`, cached: the same pattern object (and so its block masks, which
    `Pattern.block_mask` keeps) for every call of a registered method with the same shapes and options."""
    try:
        key = (spec.name, T, S, H, tuple(sorted((k, _frozen(v)) for k, v in options.items())))
    except TypeError:  # an option without a hashable value (e.g. a tensor): no caching
        return spec.build(T, S, H, **options)
    if key not in _PATTERNS:
        if len(_PATTERNS) >= 8:  # (each keeps up to 4 block masks: ~30 MB each for BigBird at 32k)
            _PATTERNS.clear()
        _PATTERNS[key] = spec.build(T, S, H, **options)
    return _PATTERNS[key]


def _methods(spec: _Spec):
    def fn(q, k, v, *, scale=None, block=None, **options):
        return pattern_attention(q, k, v, _built(spec, q.shape[1], k.shape[1], q.shape[2], options),
                                 scale=scale, block=block)

    def reference(q, k, v, *, scale=None, block=None, **options):
        return pattern_reference(q, k, v, spec.build(q.shape[1], k.shape[1], q.shape[2], **options), scale=scale)

    fn.__name__, reference.__name__ = spec.name, f"{spec.name}_reference"
    fn.__doc__ = (f"{spec.build.__doc__}\n\n    q: `[B, T, H, D]`, k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]` -> "
                  f"o `[B, T, H, Dv]`, through the block-sparse flash kernel (see `pattern_attention`).")
    return fn, reference


SPECS = (
    _Spec("sliding_window", sliding_window_pattern, {"window": 256, "causal": True}, {"window": 7},
          "Beltagy et al. 2020 (survey Sec. 6.3, window attention)", "causal local window via block mask",
          ("O(N w d)", "O(N)")),
    _Spec("longformer", longformer_pattern, {"window": 256, "global_tokens": (0,), "causal": False},
          {"window": 3, "global_tokens": (0, 11)}, "Beltagy et al. 2020 (Longformer; survey Sec. 6.3)",
          "sliding window plus global tokens", ("O(N (w + g) d)", "O(N)")),
    _Spec("bigbird", bigbird_pattern, {"block_size": 64, "window_blocks": 1, "global_blocks": 1,
                                       "random_blocks": 2, "seed": 0},
          {"block_size": 8, "random_blocks": 1, "seed": 3}, "Zaheer et al. 2020 (BigBird; survey Sec. 6.3)",
          "block window + global + seeded random blocks", ("O(N (w + g + r) b d)", "O(N)")),
    _Spec("sparse_transformer", sparse_transformer_pattern, {"stride": 128, "variant": "strided", "summary": 1},
          {"stride": 6}, "Child et al. 2019 (Sparse Transformer; survey Sec. 3.3)",
          "strided (or fixed) factorised pattern, causal", ("O(N sqrt(N) d)", "O(N)")),
    _Spec("streaming_llm", streaming_llm_pattern, {"sinks": 4, "window": 1024}, {"sinks": 2, "window": 8},
          "Xiao et al. 2024b (survey Table 4, StreamingLLM)", "attention sinks + recent window, causal",
          ("O(N (s + w) d)", "O(s + w)")),
    _Spec("neighborhood_2d", neighborhood_2d_pattern, {"grid": (32, 32), "kernel": (7, 7)},
          {"grid": (5, 7), "kernel": (3, 3)}, "Hassani et al. 2023a (survey Table 4, NeighborAttn)",
          "2D neighborhood attention over an image token grid", ("O(N k^2 d)", "O(N)"), grid=(5, 7)),
    _Spec("neighborhood_3d", neighborhood_3d_pattern, {"grid": (8, 16, 16), "kernel": (3, 7, 7)},
          {"grid": (3, 3, 4), "kernel": (2, 3, 3)}, "Hassani et al. 2023a (survey Table 4, NeighborAttn)",
          "3D neighborhood attention over a video token grid", ("O(N k^3 d)", "O(N)"), grid=(3, 3, 4)),
)

FUNCTIONS = {spec.name: _methods(spec) for spec in SPECS}


def _register() -> None:
    from ..inputs import softmax_inputs
    from ..registry import KV_CACHE, Complexity, Method, register
    from ..inputs import is_small
    from ._inputs import fit_kernel, grid_for

    def make_inputs(spec):
        def make(shape, dtype, device, generator, **options):
            sized = dict(spec.test_options) if is_small(shape) else {}
            if spec.grid is not None and is_small(shape):
                shape = replace(shape, seq_q=math.prod(spec.grid), seq_k=None)
            elif spec.grid is not None:  # a grid of the benchmark's length, the default kernel fitted in
                shape = replace(shape, seq_k=None)
                grid = grid_for(shape.seq_q, len(spec.grid))
                sized = {"grid": grid, "kernel": fit_kernel(spec.options["kernel"], grid)}
            return softmax_inputs(shape, dtype, device, generator, **{**sized, **options})
        return make

    for spec in SPECS:
        fn, reference = FUNCTIONS[spec.name]
        causal = spec.options.get("causal", spec.name in ("sparse_transformer", "streaming_llm"))
        register(Method(
            name=spec.name, family="sparse", cite=spec.cite, fn=fn, reference=reference,
            make_inputs=make_inputs(spec), complexity=Complexity(*spec.complexity, 1.0, 1.0),
            state_or_cache=KV_CACHE,
            options={"scale": None, "block": None, **spec.options},
            supports=frozenset({"causal" if causal else "noncausal", "backward", "gqa"}),
            approximates_softmax=True, description=spec.description))


_register()
