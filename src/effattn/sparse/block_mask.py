"""Block masks: which KV blocks each query block visits, the work list of block-sparse flash attention.

A mask function `(b, h, q_idx, kv_idx) -> bool` (True = attend, evaluated on broadcast index grids like
`effattn.reference.softmax.mask_from_fn`) is cut into tiles of `block = (BLOCK_Q, BLOCK_K)`. Each tile is
skipped (nothing visible), full (everything visible: the kernel applies no mask) or partial (the kernel
reads the tile's precomputed bitmask, since a Python function cannot run inside a Triton kernel). Like
FlexAttention's BlockMask it keeps per-query-block index lists of full and partial KV blocks, and their
transpose (per KV block, the query blocks that visit it) for the dK/dV pass of the backward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..validate import check_positive_int, check_tensor

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SKIP, PARTIAL, FULL = 0, 1, 2
_CHUNK_ELEMENTS = 1 << 26  # evaluate the mask function on at most this many elements at a time


@dataclass(frozen=True)
class BlockMask:
    """Block-sparse work lists for `effattn.flash_attention(..., block_mask=bm)`.

    B and H may be 1 (the same mask for every batch element / head). With NQB = ceil(T / BLOCK_Q) and
    NKB = ceil(S / BLOCK_K): `kv_num`/`kv_idx` `[B, H, NQB]`/`[B, H, NQB, NKB]` list the partial KV blocks of
    each query block, `full_kv_num`/`full_kv_idx` the full ones; `q_num`, `q_idx`, `full_q_num`,
    `full_q_idx` are the transpose (`[B, H, NKB]`, `[B, H, NKB, NQB]`). `tile_map` `[B, H, NQB, NKB]` gives
    each partial tile's row in `tile_bits` `[num_partial, BLOCK_Q, words]` (bit c % 32 of word c // 32 is
    column c of the tile), -1 elsewhere. All int32.
    """

    B: int
    H: int
    T: int
    S: int
    block: tuple[int, int]
    state: torch.Tensor  # int8 [B, H, NQB, NKB]: SKIP / PARTIAL / FULL
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor
    full_kv_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: torch.Tensor
    full_q_idx: torch.Tensor
    tile_map: torch.Tensor
    tile_bits: torch.Tensor
    # Whether launches may split its long walks over several programs (effattn.hardware._flash_split), which
    # reads the counts on the host once; off for per-call selections that promise no synchronisation.
    balance: bool = True
    splits: dict = field(default_factory=dict, repr=False, compare=False)  # the launches' splits, cached

    @property
    def num_q_blocks(self) -> int:
        return self.state.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.state.shape[3]

    @property
    def words(self) -> int:
        return self.tile_bits.shape[2]

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def tuning_class(self) -> tuple[tuple[int, int], int]:
        """(tile, partial tiles per query-block row rounded up to a power of two): what the kernels' tuner
        keys block-sparse launches on, besides the problem's shape. From shapes only (no device sync):
        masks with many partial tiles (Longformer's global rows) prefer other launch configurations than
        plain bands (measured on the H200: 8 warps against 4)."""
        rows = max(1, self.kv_num.numel())
        per_row = -(-self.tile_bits.shape[0] // rows)
        return self.block, 1 << max(per_row - 1, 0).bit_length()

    def density(self) -> float:
        """Fraction of the (query block, KV block) tiles that the kernel visits."""
        return float((self.state != SKIP).float().mean())

    def to(self, device) -> "BlockMask":
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "splits"}
        return BlockMask(**{f: v.to(device) if isinstance(v, torch.Tensor) else v for f, v in fields.items()})

    def to_dense(self) -> torch.Tensor:
        """The elementwise mask the kernel applies, bool `[B, H, T, S]` (B, H as stored). For tests."""
        BQ, BK = self.block
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        tiles = (self.state == FULL).view(self.B, self.H, nq, 1, nk, 1).expand(-1, -1, -1, BQ, -1, BK)
        tiles = tiles.permute(0, 1, 2, 4, 3, 5).contiguous()  # [B, H, nq, nk, BQ, BK]
        part = (self.state == PARTIAL).nonzero(as_tuple=True)
        cols = torch.arange(BK, device=self.device)
        tiles[part] = (self.tile_bits[self.tile_map[part].long()][:, :, cols // 32] >> (cols % 32) & 1) != 0
        return tiles.permute(0, 1, 2, 4, 3, 5).reshape(self.B, self.H, nq * BQ, nk * BK)[:, :, :self.T, :self.S]

    def kernel_args(self) -> tuple:
        """Arguments of the forward / dQ kernels: query-block-major lists and the mask's broadcast strides."""
        return (self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx, self.tile_map, self.tile_bits,
                int(self.B > 1), int(self.H > 1), self.H, self.num_q_blocks, self.num_kv_blocks)

    def kernel_args_transposed(self) -> tuple:
        """Arguments of the dK/dV kernel: KV-block-major lists."""
        return (self.q_num, self.q_idx, self.full_q_num, self.full_q_idx, self.tile_map, self.tile_bits,
                int(self.B > 1), int(self.H > 1), self.H, self.num_q_blocks, self.num_kv_blocks)

    def __repr__(self) -> str:
        return (f"BlockMask(B={self.B}, H={self.H}, T={self.T}, S={self.S}, block={self.block}, "
                f"density={self.density():.3f}, partial={int((self.state == PARTIAL).sum())})")


def _index_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts `[..., R]` and left-packed column indices `[..., R, C]` of the True entries of sel `[..., R, C]`:
    the selected columns in increasing order, then the others in increasing order (a stable partition,
    done with one cumulative sum and a scatter instead of a sort)."""
    C = sel.shape[-1]
    cols = torch.arange(C, device=sel.device, dtype=torch.int32).expand(sel.shape)
    before = sel.to(torch.int32).cumsum(-1, dtype=torch.int32)  # selected columns up to and including c
    num = before[..., -1:]
    dest = torch.where(sel, before - 1, num + cols - before).long()
    idx = torch.empty(sel.shape, dtype=torch.int32, device=sel.device).scatter_(-1, dest, cols)
    return num.squeeze(-1).contiguous(), idx

def _pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """bool `[n, BQ, BK]` -> int32 `[n, BQ, ceil(BK / 32)]`, bit c % 32 of word c // 32 = column c."""
    n, BQ, BK = tiles.shape
    words = -(-BK // 32)
    padded = torch.zeros(n, BQ, words * 32, dtype=torch.int64, device=tiles.device)
    padded[:, :, :BK] = tiles.to(torch.int64)
    packed = (padded.view(n, BQ, words, 32) << torch.arange(32, device=tiles.device)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # two's complement


def _assemble(B: int, H: int, T: int, S: int, block: tuple[int, int], state: torch.Tensor,
              tile_map: torch.Tensor, bits: list[torch.Tensor], balance: bool = True) -> BlockMask:
    """BlockMask from the tile states, `tile_map` and the partial tiles' bitmasks (concatenated: rows of tile_bits)."""
    BQ, BK = block
    words = -(-BK // 32)
    bits = [x for x in bits if x.shape[0]]
    # The kernels take a pointer even when no tile is partial: keep one (unread) row.
    tile_bits = torch.cat(bits) if bits else torch.zeros(1, BQ, words, dtype=torch.int32, device=state.device)
    partial, full = state == PARTIAL, state == FULL
    kv_num, kv_idx = _index_lists(partial)
    full_kv_num, full_kv_idx = _index_lists(full)
    q_num, q_idx = _index_lists(partial.transpose(2, 3))
    full_q_num, full_q_idx = _index_lists(full.transpose(2, 3))
    return BlockMask(B, H, T, S, (BQ, BK), state, kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx,
                     full_q_num, full_q_idx, tile_map.contiguous(), tile_bits.contiguous(), balance)


def _classify(t: torch.Tensor) -> torch.Tensor:
    """Tile states of bool tiles `[..., BQ, BK]` (padding is False, so padded tiles are never full)."""
    return torch.where(t.all(-1).all(-1), FULL, torch.where(t.any(-1).any(-1), PARTIAL, SKIP)).to(torch.int8)


def _build(B: int, H: int, T: int, S: int, block: tuple[int, int], device, rows_mask) -> BlockMask:
    """Classify every tile from `rows_mask(r0, r1) -> bool [B, H, r1 - r0, S]` (evaluated in row chunks so
    that no [T, S] mask is ever held) and assemble the index lists and partial-tile bitmasks."""
    BQ, BK = block
    nq, nk = -(-T // BQ), -(-S // BK)
    state = torch.zeros(B, H, nq, nk, dtype=torch.int8, device=device)
    tile_map = torch.full((B, H, nq, nk), -1, dtype=torch.int32, device=device)
    bits, n_tiles = [], 0
    step = max(1, _CHUNK_ELEMENTS // max(1, B * H * BQ * nk * BK))
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        r0, r1 = i0 * BQ, min(T, i1 * BQ)
        m = torch.zeros(B, H, (i1 - i0) * BQ, nk * BK, dtype=torch.bool, device=device)
        m[:, :, :r1 - r0, :S] = rows_mask(r0, r1)
        t = m.view(B, H, i1 - i0, BQ, nk, BK).permute(0, 1, 2, 4, 3, 5)  # [B, H, nq', nk, BQ, BK]
        st = state[:, :, i0:i1] = _classify(t)
        where = (st == PARTIAL).nonzero(as_tuple=True)
        n = where[0].numel()
        tile_map[:, :, i0:i1][where] = torch.arange(n_tiles, n_tiles + n, dtype=torch.int32, device=device)
        bits.append(_pack_bits(t[where]))
        n_tiles += n
    return _assemble(B, H, T, S, block, state, tile_map, bits)


def _check_block(block) -> tuple[int, int]:
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(f"block must be a (BLOCK_Q, BLOCK_K) pair of ints, got {block!r}")
    for name, b in zip(("BLOCK_Q", "BLOCK_K"), block):
        check_positive_int(f"block {name}", b, power_of_two=True, minimum=16)
    return int(block[0]), int(block[1])


def _eval_rows(mask_fn: MaskFn, B: int, H: int, r0: int, r1: int, S: int, device) -> torch.Tensor:
    """mask_fn on the index grids of rows r0..r1-1 (as `mask_from_fn` builds them): bool [B, H, r1-r0, S]."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    qi = torch.arange(r0, r1, device=device).view(1, 1, r1 - r0, 1)
    ki = torch.arange(S, device=device).view(1, 1, 1, S)
    return torch.as_tensor(mask_fn(b, h, qi, ki), device=device).to(torch.bool).expand(B, H, r1 - r0, S)


def block_mask(mask_fn: MaskFn, B: int, H: int, T: int, S: int, block=(128, 64), device=None) -> BlockMask:
    """BlockMask of the elementwise mask `mask_fn(b, h, q_idx, kv_idx) -> bool` over `[B, H, T, S]`.

    B or H = 1 means the mask is the same for every batch element or head. `block` = (BLOCK_Q, BLOCK_K),
    powers of two >= 16, are also the kernel's tiles. Cost: one evaluation of mask_fn over T x S, in
    chunks of query rows.
    """
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be a function (b, h, q_idx, kv_idx) -> bool tensor, "
                        f"got {type(mask_fn).__name__}")
    for name, n in (("B", B), ("H", H), ("T", T), ("S", S)):
        check_positive_int(name, n)
    block = _check_block(block)
    return _build(B, H, T, S, block, device, lambda r0, r1: _eval_rows(mask_fn, B, H, r0, r1, S, device))


def _tile_grids(where, block: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Index grids of the tiles `where` = (b, h, i, j): b, h `[n, 1, 1]`, rows `[n, BQ, 1]`, cols `[n, 1, BK]`."""
    b, h, i, j = where
    BQ, BK = block
    rows = i.view(-1, 1, 1) * BQ + torch.arange(BQ, device=i.device).view(1, BQ, 1)
    cols = j.view(-1, 1, 1) * BK + torch.arange(BK, device=j.device).view(1, 1, BK)
    return b.view(-1, 1, 1), h.view(-1, 1, 1), rows, cols


def _eval_tiles(where, block, T: int, S: int, causal: bool, mask_fn: MaskFn | None) -> torch.Tensor:
    """The elementwise mask inside the tiles `where`: bool `[n, BQ, BK]`, False on padding past T or S."""
    b, h, rows, cols = _tile_grids(where, block)
    m = (rows < T) & (cols < S)
    if causal:
        m = m & (cols <= rows + (S - T))
    if mask_fn is not None:  # clamped: mask functions index tensors of length T / S
        m = m & torch.as_tensor(mask_fn(b, h, rows.clamp(max=T - 1), cols.clamp(max=S - 1)), device=m.device).to(torch.bool)
    return m.expand(b.shape[0], *block)


@functools.lru_cache(maxsize=32)
def _tile_classes(T: int, S: int, block: tuple[int, int], causal: bool, device: torch.device):
    """What causality and the T/S edges alone say about each tile, from the shapes only (cached, so a
    selection's block mask needs no host synchronisation): `full` bool `[nq, nk]` (all visible),
    `edge` bool `[nq, nk]` (some but not all visible: the causal diagonal band and the padded last
    row / column of tiles), `edge_id` int32 `[nq, nk]` (the edge tile's row in `edge_bits`, else -1) and
    `edge_bits` (the edge tiles' bitmasks). Other tiles are all hidden."""
    BQ, BK = block
    i = torch.arange(-(-T // BQ), device=device).view(-1, 1)
    j = torch.arange(-(-S // BK), device=device).view(1, -1)
    no_padding = ((i + 1) * BQ <= T) & ((j + 1) * BK <= S)
    if causal:
        first_q, last_q = i * BQ + (S - T), torch.clamp((i + 1) * BQ, max=T) - 1 + (S - T)
        # A tile that is not empty holds (its last row, its first key): last row < T, first key < S.
        full, empty = no_padding & ((j + 1) * BK - 1 <= first_q), j * BK > last_q
    else:
        full, empty = no_padding, torch.zeros_like(no_padding)
    edge = ~full & ~empty
    flat = edge.flatten()
    edge_id = torch.where(flat, flat.to(torch.int32).cumsum(0, dtype=torch.int32) - 1, -1).view(edge.shape)
    _, _, ei, ej = (edge.view(1, 1, *edge.shape)).nonzero(as_tuple=True)
    zero = torch.zeros_like(ei)
    return full, edge, edge_id.to(torch.int32), _pack_bits(_eval_tiles((zero, zero, ei, ej), block, T, S, causal, None))


def block_mask_from_blocks(selected: torch.Tensor, T: int, S: int, block=(128, 64),
                           mask_fn: MaskFn | None = None, causal: bool = False) -> BlockMask:
    """BlockMask from a block selection: bool `selected` `[B|1, H|1, ceil(T/BLOCK_Q), ceil(S/BLOCK_K)]` says
    which KV blocks each query block visits (MoBA / NSA / Quest style). Inside the selected blocks,
    `causal=True` keeps keys at or before each query's position (bottom-right, i + S - T) and `mask_fn`,
    if given, is applied elementwise.

    Vectorised on the selection's device. Without `mask_fn` every tile's state follows from the selection,
    causality and the edges, and the partial tiles (causal diagonal, padded edges) share bitmasks that
    depend only on the shapes: no element is evaluated per call and no host synchronisation happens.
    With `mask_fn`, it is evaluated on the selected tiles only, in chunks (one synchronisation per chunk).
    """
    block = _check_block(block)
    check_positive_int("T", T)
    check_positive_int("S", S)
    check_tensor("selected", selected, ndim=4, dtypes=(torch.bool,), layout="[B, H, ceil(T/BLOCK_Q), ceil(S/BLOCK_K)]")
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be a function (b, h, q_idx, kv_idx) -> bool tensor or None, "
                        f"got {type(mask_fn).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    BQ, BK = block
    nq, nk = -(-T // BQ), -(-S // BK)
    if tuple(selected.shape[2:]) != (nq, nk):
        raise ValueError(f"selected must have shape [B, H, {nq}, {nk}] for T={T}, S={S}, block={block}, "
                         f"got {tuple(selected.shape)}")
    B, H = selected.shape[:2]
    full, edge, edge_id, edge_bits = _tile_classes(T, S, block, causal, selected.device)
    if mask_fn is None:
        state = torch.where(selected & full, FULL, torch.where(selected & edge, PARTIAL, SKIP)).to(torch.int8)
        tile_map = torch.where(selected & edge, edge_id, -1).to(torch.int32)
        return _assemble(B, H, T, S, block, state, tile_map, [edge_bits.clone()], balance=False)
    state = torch.zeros(B, H, nq, nk, dtype=torch.int8, device=selected.device)
    where = (selected & (full | edge)).nonzero(as_tuple=True)  # tiles to look inside, row-major (b, h, i, j)
    bits, step = [], max(1, _CHUNK_ELEMENTS // (BQ * BK))
    for s in range(0, where[0].numel(), step):
        w = tuple(x[s:s + step] for x in where)
        t = _eval_tiles(w, block, T, S, causal, mask_fn)
        st = state[w] = _classify(t)
        bits.append(_pack_bits(t[st == PARTIAL]))
    # The partial tiles in row-major order are the rows of the concatenated bits: the map is a running count.
    partial = (state == PARTIAL).flatten()
    tile_map = torch.where(partial, partial.to(torch.int32).cumsum(0, dtype=torch.int32) - 1, -1)
    return _assemble(B, H, T, S, block, state, tile_map.view(state.shape).to(torch.int32), bits)
