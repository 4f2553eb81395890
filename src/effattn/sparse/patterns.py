"""Sparse attention patterns as tiny pure mask functions `(b, h, q_idx, kv_idx) -> bool`.

Each factory returns a `Pattern`: a mask function with a readable `__name__`, combinable with `&`, `|`
and `~`, evaluated on broadcast index grids (`b [B,1,1,1]`, `h [1,H,1,1]`, `q_idx [1,1,T,1]`,
`kv_idx [1,1,1,S]`, as `effattn.reference.mask_from_fn` and `effattn.sparse.block_mask` call it).
Positions are absolute: `q_idx` is the query's position in the key sequence. For cross/decoding shapes
(T != S, bottom-right aligned) use `pattern.shifted(S - T)`. The only thing that turns a pattern into
work lists for the block-sparse flash kernel is `Pattern.block_mask` (-> `effattn.sparse.block_mask`).

    p = sliding_window(256) & causal()
    print(draw(p, 16, 16))                      # text picture; draw(p, T, S, path="p.png") writes a PNG
    bm = p.block_mask(1, 1, 4096, 4096)         # visit lists for flash_attention(..., block_mask=bm)
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Callable, Sequence

import torch

from ..reference.softmax import mask_from_fn
from ..validate import check_positive_int
from .block_mask import block_mask


class Pattern:
    """A named mask function `(b, h, q_idx, kv_idx) -> bool tensor`, combinable with `&`, `|`, `~`.

    `per_batch` / `per_head` say whether the mask depends on b / h; block masks of patterns that do not
    are built once and broadcast (B = 1 / H = 1), which keeps them cheap at long lengths. `window` =
    (left, right) when the pattern is exactly the band q - left <= kv <= q + right, or with `sinks` = s > 0
    that band plus the keys kv < s up to q + right (StreamingLLM), and with `global_rows` = g > 0 (a
    non-causal band only) also every key for the queries q < g (Longformer's global tokens at a prefix,
    with sinks = g): `pattern_attention` runs these natively (no block mask). `grid` (a token grid in raster
    order, for neighborhood and sliding-tile patterns) with `tiles` (tile shapes over it) says that the
    pattern may visit fewer blocks with its tokens in tile order (`in_tile_order`), which `pattern_attention`
    then tries. Patterns derived from one by `&`, `|`, `~` keep none of these; the name identifies a pattern
    that has a grid (`pattern_attention` caches its plan under it).
    """

    def __init__(self, fn: Callable, name: str, per_batch: bool = False, per_head: bool = False,
                 window: tuple[int, int] | None = None, sinks: int = 0, global_rows: int = 0,
                 grid: tuple[int, ...] | None = None, tiles: tuple[tuple[int, ...], ...] = ()) -> None:
        if global_rows and (window is None or window[1] == 0):
            raise ValueError(f"global_rows needs a non-causal window (right > 0), got window={window}")
        self.fn = fn
        self.__name__ = name
        self.per_batch, self.per_head, self.window, self.sinks = per_batch, per_head, window, sinks
        self.global_rows = global_rows
        self.grid, self.tiles = grid, tuple(t for t in tiles if grid is not None and fits_tiles(grid, t))
        self._block_masks: dict = {}  # block_mask's results: a pattern's mask function never changes
        self._shifted: dict = {}  # shifted's results, so that their block masks are kept too

    def _derived(self, fn: Callable, name: str, *others: "Pattern") -> "Pattern":
        return Pattern(fn, name, any(p.per_batch for p in (self, *others)), any(p.per_head for p in (self, *others)))

    def __call__(self, b, h, q_idx, kv_idx) -> torch.Tensor:
        out = self.fn(b, h, q_idx, kv_idx)
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)

    def __and__(self, other: Callable) -> "Pattern":
        other = as_pattern(other)
        return self._derived(lambda b, h, q, kv: self(b, h, q, kv) & other(b, h, q, kv),
                             f"({self.__name__} & {other.__name__})", other)

    def __or__(self, other: Callable) -> "Pattern":
        other = as_pattern(other)
        return self._derived(lambda b, h, q, kv: self(b, h, q, kv) | other(b, h, q, kv),
                             f"({self.__name__} | {other.__name__})", other)

    def __invert__(self) -> "Pattern":
        return self._derived(lambda b, h, q, kv: ~self(b, h, q, kv), f"~{self.__name__}")

    def __repr__(self) -> str:
        return f"Pattern({self.__name__})"

    def in_tile_order(self, tile: Sequence[int]) -> "Pattern":
        """The same mask for the tokens in tile order (`tile_order(self.grid, tile)`): position i there is
        the raster position order[i]."""
        if self.grid is None or not fits_tiles(self.grid, tile):
            raise ValueError(f"{self.__name__}: tile {tuple(tile)} does not cut the grid {self.grid} evenly")
        order = tile_order(self.grid, tile)
        return Pattern(lambda b, h, q, kv: self(b, h, order.to(q.device)[q], order.to(kv.device)[kv]),
                       f"{self.__name__}@tiles{tuple(tile)}", self.per_batch, self.per_head)

    def shifted(self, offset: int) -> "Pattern":
        """Query i at key position i + offset: `shifted(S - T)` aligns T queries bottom-right to S keys."""
        if offset == 0:
            return self
        if offset not in self._shifted:
            self._shifted[offset] = self._derived(lambda b, h, q, kv: self(b, h, q + offset, kv),
                                                  f"{self.__name__}>>{offset}")
        return self._shifted[offset]

    def dense(self, B: int, H: int, T: int, S: int, device=None) -> torch.Tensor:
        """The elementwise mask `[B, H, T, S]` (True = attend); for tests and pictures, O(B H T S)."""
        return mask_from_fn(self, B, H, T, S, device)

    def block_mask(self, B: int, H: int, T: int, S: int, block=None, device=None):
        """The `BlockMask` of the block-sparse flash kernel, `[B or 1, H or 1]` as the pattern needs. Built once
        per shape, tile and device and kept on the pattern (a build evaluates the mask over T x S: 0.07 s on
        the H100 at N = 16k, some 50x the attention it serves), at most 4 of them."""
        kw = {} if block is None else {"block": tuple(block)}  # None: the kernel's default tiles
        B, H = B if self.per_batch else 1, H if self.per_head else 1
        key = (B, H, T, S, kw.get("block"), str(torch.device(device) if device is not None else None))
        if key not in self._block_masks:
            if len(self._block_masks) >= 4:
                self._block_masks.clear()
            self._block_masks[key] = block_mask(self, B, H, T, S, device=device, **kw)
        return self._block_masks[key]


def as_pattern(fn: Callable) -> Pattern:
    if isinstance(fn, Pattern):
        return fn
    if not callable(fn):
        raise TypeError(f"a pattern must be a mask function (b, h, q_idx, kv_idx) -> bool, got {type(fn).__name__}")
    return Pattern(fn, getattr(fn, "__name__", "mask_fn"), per_batch=True, per_head=True)  # may use b and h


def _int(name, value, minimum=0):
    return check_positive_int(name, value, minimum=minimum)


def _positions(name, values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.long).flatten()
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be non-negative positions, got {t.tolist()}")
    return t


class _Const:
    """A tensor a mask function reads, with one copy per device, made on first use. Eager evaluations
    (block-mask builders, FlexAttention's create_block_mask) make the copy, so compiled FlexAttention finds
    it on its device and never has to lower a device move inside the mask, which Inductor cannot."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.copies = t, {t.device: t}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        if like.device not in self.copies:
            self.copies[like.device] = self.t.to(like.device)
        return self.copies[like.device]


def _member(x: torch.Tensor, values: _Const) -> torch.Tensor:
    """x in values, elementwise; written with == and any (not torch.isin) so FlexAttention can trace it."""
    return (x.unsqueeze(-1) == values.on(x)).any(-1)


# ---------------------------------------------------------------- 1D patterns (language)

def full() -> Pattern:
    return Pattern(lambda b, h, q, kv: (q >= 0) & (kv >= 0), "full")


def causal() -> Pattern:
    return Pattern(lambda b, h, q, kv: kv <= q, "causal")


def sliding_window(left: int, right: int = 0) -> Pattern:
    """Local attention (Beltagy et al. 2020): q - left <= kv <= q + right; right=0 is causal."""
    _int("left", left), _int("right", right)
    return Pattern(lambda b, h, q, kv: (kv >= q - left) & (kv <= q + right), f"window({left},{right})",
                   window=(left, right))


def dilated_window(window: int, dilation: int, causal: bool = True) -> Pattern:
    """Dilated window (Longformer): keys at distances 0, d, 2d, ..., window*d (both sides unless causal)."""
    _int("window", window), _int("dilation", dilation, 1)

    def fn(b, h, q, kv):
        dist = q - kv if causal else (q - kv).abs()
        return (dist >= 0) & (dist <= window * dilation) & (dist % dilation == 0)
    return Pattern(fn, f"dilated({window},d={dilation}{',causal' if causal else ''})")


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted distinct positions as half-open runs [a, b) of consecutive integers."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(positions.tolist())):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def _in_runs(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """x in the union of the runs, with comparisons against Python ints only: no tensor is captured, so
    FlexAttention's compiler never has to move one to the GPU inside the mask (it cannot lower that)."""
    out = x < 0  # all False: positions are non-negative
    for a, b in runs:
        out = out | ((x >= a) & (x < b))
    return out


def global_tokens(positions: Sequence[int]) -> Pattern:
    """Longformer global attention: the chosen positions attend to all keys and are attended by all.
    Cost per element: two comparisons per run of consecutive positions (typically a prefix: one run)."""
    g = _positions("positions", positions)
    runs = _runs(g)
    return Pattern(lambda b, h, q, kv: _in_runs(q, runs) | _in_runs(kv, runs),
                   f"global({g.tolist()})")


def random_blocks(T: int, S: int, block: int, n_random: int, seed: int = 0, heads: int = 1) -> Pattern:
    """BigBird random attention: each block of `block` queries sees `n_random` random key blocks, drawn
    per head from `torch.Generator().manual_seed(seed)` (same seed, same pattern, on every device)."""
    _int("block", block, 1), _int("n_random", n_random), _int("heads", heads, 1)
    nq, nk = math.ceil(T / block), math.ceil(S / block)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(heads, nq, nk, generator=gen)
    table = torch.zeros(heads, nq, nk, dtype=torch.bool)
    table.scatter_(-1, scores.topk(min(n_random, nk), dim=-1).indices, True)
    table = _Const(table)

    def fn(b, h, q, kv):
        t = table.on(q)
        return t[h % heads, (q // block).clamp(max=nq - 1), (kv // block).clamp(max=nk - 1)]
    return Pattern(fn, f"random_blocks({n_random}x{block},seed={seed})", per_head=heads > 1)


def block_window(block: int, window_blocks: int) -> Pattern:
    """Block-granular window: query block i sees key blocks i - w .. i + w (BigBird's sliding blocks)."""
    _int("block", block, 1), _int("window_blocks", window_blocks)
    return Pattern(lambda b, h, q, kv: (q // block - kv // block).abs() <= window_blocks,
                   f"block_window({block},{window_blocks})")


def bigbird(T: int, S: int, block: int, window_blocks: int = 1, global_blocks: int = 1, n_random: int = 1,
            seed: int = 0, heads: int = 1) -> Pattern:
    """BigBird (Zaheer et al. 2020) = block window | first `global_blocks` blocks global | random blocks."""
    p = block_window(block, window_blocks) | random_blocks(T, S, block, n_random, seed, heads)
    if global_blocks:
        p = p | global_tokens(range(min(global_blocks * block, max(T, S))))
    return Pattern(p.fn, f"bigbird(b={block},w={window_blocks},g={global_blocks},r={n_random},seed={seed})",
                   per_head=p.per_head)


def strided(stride: int) -> Pattern:
    """Sparse Transformer strided (Child et al. 2019): causal, previous `stride` keys or every stride-th."""
    _int("stride", stride, 1)
    return Pattern(lambda b, h, q, kv: (kv <= q) & ((q - kv < stride) | ((q - kv) % stride == 0)),
                   f"strided({stride})")


def fixed(stride: int, summary: int = 1) -> Pattern:
    """Sparse Transformer fixed: causal, same block of `stride`, or the last `summary` keys of any block."""
    _int("stride", stride, 1), _int("summary", summary, 1)
    return Pattern(lambda b, h, q, kv: (kv <= q) & ((q // stride == kv // stride) | (kv % stride >= stride - summary)),
                   f"fixed({stride},c={summary})")


def sinks_recent(sinks: int, window: int) -> Pattern:
    """StreamingLLM: causal, the first `sinks` keys plus the `window` most recent (current included)."""
    _int("sinks", sinks), _int("window", window, 1)
    return Pattern(lambda b, h, q, kv: (kv <= q) & ((kv < sinks) | (q - kv < window)),
                   f"sinks_recent({sinks},{window})", window=(window - 1, 0), sinks=sinks)


def a_shape(sinks: int, window: int) -> Pattern:
    """MInference's A-shape head: the same set as `sinks_recent`, under MInference's name."""
    p = sinks_recent(sinks, window)
    return Pattern(p.fn, f"a_shape({sinks},{window})", window=p.window, sinks=p.sinks)


def vertical_slash(vertical: Sequence[int], slash: Sequence[int]) -> Pattern:
    """MInference vertical-slash: causal, key columns `vertical` plus diagonals q - kv in `slash`."""
    vt, st = _positions("vertical", vertical), _positions("slash", slash)
    name = f"vertical_slash(v={len(vt)},s={len(st)})"
    vt, st = _Const(vt), _Const(st)
    return Pattern(lambda b, h, q, kv: (kv <= q) & (_member(kv, vt) | _member(q - kv, st)), name)


def prefix_lm(prefix) -> Pattern:
    """Prefix-LM: bidirectional over the first `prefix` keys, causal after; `prefix` an int or `[B]`."""
    if isinstance(prefix, torch.Tensor):
        p = _Const(prefix.long().flatten())
        return Pattern(lambda b, h, q, kv: (kv < p.on(kv)[b]) | (kv <= q), "prefix_lm(per-batch)", per_batch=True)
    _int("prefix", prefix)
    return Pattern(lambda b, h, q, kv: (kv < prefix) | (kv <= q), f"prefix_lm({prefix})")


def document(doc_ids: torch.Tensor) -> Pattern:
    """Packed sequences: query and key must belong to the same document (`doc_ids [S]`); `& causal()`."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 1:
        raise TypeError(f"doc_ids must be a 1-D tensor [S] of document ids, got {doc_ids!r}")
    d = doc_ids.long()
    n = d.numel()
    name = f"document({int(d.max()) + 1 if n else 0} docs)"
    d = _Const(d)
    # Clamped lookups: block-mask builders may evaluate padded index grids past the sequence end.
    return Pattern(lambda b, h, q, kv: d.on(q)[q.clamp(0, n - 1)] == d.on(kv)[kv.clamp(0, n - 1)], name)


def document_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`cu_seqlens [n+1]` (packed offsets) -> `doc_ids [total]`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


# ---------------------------------------------------------------- 2D/3D patterns (images, video)

def _grid(name, grid, dims=(2, 3)) -> tuple[int, ...]:
    if not isinstance(grid, (tuple, list)) or len(grid) not in dims:
        raise TypeError(f"{name} must be a tuple of {' or '.join(map(str, dims))} ints, got {grid!r}")
    for g in grid:
        _int(name, g, 1)
    return tuple(grid)


def fits_tiles(grid: Sequence[int], tile: Sequence[int]) -> bool:
    return len(tile) == len(grid) and all(t >= 1 and g % t == 0 for g, t in zip(grid, tile))


def to_tile_order(x: torch.Tensor, grid: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """x `[B, N, ...]` with its N = prod(grid) tokens in raster order -> the same tokens in tile order: the
    grid's tiles in raster order, each tile's tokens in raster order within it (one copy)."""
    B, rest, d = x.shape[0], x.shape[2:], len(grid)
    split = [n for g, t in zip(grid, tile) for n in (g // t, t)]  # (tiles, in tile) per axis
    perm = [0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), *range(2 * d + 1, 2 * d + 1 + len(rest))]
    return x.reshape(B, *split, *rest).permute(perm).reshape(x.shape)


def from_tile_order(x: torch.Tensor, grid: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """The inverse of `to_tile_order`."""
    B, rest, d = x.shape[0], x.shape[2:], len(grid)
    split = [g // t for g, t in zip(grid, tile)] + list(tile)  # (tiles per axis, then in tile per axis)
    perm = [0, *(i for a in range(d) for i in (1 + a, 1 + d + a)), *range(2 * d + 1, 2 * d + 1 + len(rest))]
    return x.reshape(B, *split, *rest).permute(perm).reshape(x.shape)


def tile_order(grid: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """int64 `[N]`: the raster position of each token of the tile order."""
    N = math.prod(grid)
    return to_tile_order(torch.arange(N).view(1, N), grid, tile)[0]


# Tile shapes tried for grid patterns: 64 tokens, one key block of the kernel's default 128 x 64 tiles.
GRID_TILES = {2: ((8, 8), (4, 16), (16, 4)), 3: ((1, 8, 8), (2, 4, 8), (4, 4, 4))}


def _coords(i: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Raster-order token index -> grid coordinates (last axis fastest)."""
    out = []
    for size in reversed(grid):
        out.append(i % size)
        i = i // size
    return out[::-1]


def _window_start(c: torch.Tensor, size: int, kernel: int) -> torch.Tensor:
    """NATTEN's window: centred on c, shifted inwards at the borders so it always holds `kernel` cells."""
    return (c - kernel // 2).clamp(min=0, max=size - kernel)


def neighborhood(grid: Sequence[int], kernel: Sequence[int]) -> Pattern:
    """Neighborhood attention (Hassani et al. 2023, NATTEN) over a 2D or 3D token grid in raster order:
    each query sees the `kernel`-sized window around it, clamped at the borders."""
    grid = _grid("grid", grid)
    kernel = _grid("kernel", kernel, (len(grid),))
    if any(k > g for k, g in zip(kernel, grid)):
        raise ValueError(f"kernel {kernel} must fit in the grid {grid}")

    def fn(b, h, q, kv):
        keep = None
        for cq, ck, g, k in zip(_coords(q, grid), _coords(kv, grid), grid, kernel):
            s = _window_start(cq, g, k)
            part = (ck >= s) & (ck < s + k)
            keep = part if keep is None else keep & part
        return keep
    return Pattern(fn, f"neighborhood{len(grid)}d(grid={grid},kernel={kernel})", grid=grid,
                   tiles=GRID_TILES[len(grid)])


def sliding_tile(grid: Sequence[int], tile: Sequence[int], window_tiles: Sequence[int]) -> Pattern:
    """Sliding Tile Attention (Zhang et al. 2025d): the grid is cut into tiles; a query tile sees the
    `window_tiles` tiles around it (clamped like NATTEN), so blocks are fully dense or empty."""
    grid = _grid("grid", grid)
    tile = _grid("tile", tile, (len(grid),))
    window_tiles = _grid("window_tiles", window_tiles, (len(grid),))
    ntiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    if any(w > n for w, n in zip(window_tiles, ntiles)):
        raise ValueError(f"window_tiles {window_tiles} must fit in the tile grid {tuple(ntiles)}")

    def fn(b, h, q, kv):
        keep = None
        for cq, ck, t, n, w in zip(_coords(q, grid), _coords(kv, grid), tile, ntiles, window_tiles):
            s = _window_start(cq // t, n, w)
            part = (ck // t >= s) & (ck // t < s + w)
            keep = part if keep is None else keep & part
        return keep
    return Pattern(fn, f"sliding_tile(grid={grid},tile={tile},window={window_tiles})", grid=grid,
                   tiles=(tile, *GRID_TILES[len(grid)]))


def radial(frames: int, tokens_per_frame: int, width: int) -> Pattern:
    """Radial-style video mask (Li et al. 2025): tokens of frames d apart attend within a spatial band of
    half-width `width >> floor(log2(d + 1))`, so density halves each time the frame distance doubles;
    frames too far for any band keep only the token at the same spatial index."""
    _int("frames", frames, 1), _int("tokens_per_frame", tokens_per_frame, 1), _int("width", width)

    def fn(b, h, q, kv):
        d = (q // tokens_per_frame - kv // tokens_per_frame).abs()
        halvings = torch.floor(torch.log2((d + 1).double())).long()
        band = torch.div(torch.full_like(halvings, width), 2 ** halvings, rounding_mode="floor")
        return (q % tokens_per_frame - kv % tokens_per_frame).abs() <= band
    return Pattern(fn, f"radial(frames={frames},tokens={tokens_per_frame},width={width})")


# ---------------------------------------------------------------- pictures

def _png(mask: torch.Tensor, path: str, pixel: int) -> None:
    img = (~mask).to(torch.uint8).mul(255).repeat_interleave(pixel, 0).repeat_interleave(pixel, 1)
    rows = b"".join(b"\x00" + bytes(r) for r in img.tolist())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = img.shape
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def draw(mask_fn, T: int, S: int | None = None, *, b: int = 0, h: int = 0, path: str | None = None,
         pixel: int = 4) -> str:
    """Picture of a mask (a pattern, a mask function or a bool `[T, S]` tensor): returns text, one row per
    query ('#' = attend, '.' = skip); with `path` also writes a grey-scale PNG (black = attend)."""
    S = T if S is None else S
    if isinstance(mask_fn, torch.Tensor):
        m = mask_fn.bool().cpu()
    else:
        m = as_pattern(mask_fn).dense(b + 1, h + 1, T, S)[b, h].cpu()
    if path is not None:
        _png(m, path, pixel)
    name = getattr(mask_fn, "__name__", "mask")
    return "\n".join([f"{name}  [{T} x {S}], density {m.float().mean():.3f}"]
                     + ["".join("#" if x else "." for x in row) for row in m.tolist()])


def _demo() -> None:
    """`python -m effattn.sparse.patterns`: draw every pattern of this file on a small grid."""
    for p in (causal(), sliding_window(3), dilated_window(2, 2), global_tokens([0, 7]) | sliding_window(1, 1),
              bigbird(16, 16, 4, seed=0), strided(4), fixed(4, 1), sinks_recent(2, 4), vertical_slash([1, 9], [0, 5]),
              prefix_lm(5), document(torch.tensor([0] * 5 + [1] * 7 + [2] * 4)) & causal(),
              neighborhood((4, 4), (3, 3)), sliding_tile((4, 4), (2, 2), (1, 1)), radial(4, 4, 2)):
        print(draw(p, 16), end="\n\n")


if __name__ == "__main__":
    _demo()
