"""Block masks: which KV blocks each query block visits, the work list of block-sparse flash attention.

A mask function `(b, h, q_idx, kv_idx) -> bool` (True = attend, evaluated on broadcast index grids like
`effattn.reference.softmax.mask_from_fn`) is cut into tiles of `block = (BLOCK_Q, BLOCK_K)`. Each tile is
skipped (nothing visible), full (everything visible: the kernel applies no mask) or partial (the kernel
reads the tile's precomputed bitmask, since a Python function cannot run inside a Triton kernel). Like
FlexAttention's BlockMask it keeps per-query-block index lists of full and partial KV blocks, and their
transpose (per KV block, the query blocks that visit it) for the dK/dV pass of the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
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

    def density(self) -> float:
        """Fraction of the (query block, KV block) tiles that the kernel visits."""
        return float((self.state != SKIP).float().mean())

    def to(self, device) -> "BlockMask":
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return BlockMask(**{f: v.to(device) if isinstance(v, torch.Tensor) else v for f, v in fields.items()})

    def to_dense(self) -> torch.Tensor:
        """The elementwise mask the kernel applies, bool `[B, H, T, S]` (B, H as stored). For tests."""
        BQ, BK = self.block
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        tiles = (self.state == FULL).view(self.B, self.H, nq, 1, nk, 1).expand(-1, -1, -1, BQ, -1, BK).clone()
        part = (self.state == PARTIAL).nonzero().tolist()
        if part:
            cols = torch.arange(BK, device=self.device)
            bits = self.tile_bits[:, :, cols // 32] >> (cols % 32) & 1  # [num_partial, BQ, BK]
            for b, h, i, j in part:
                tiles[b, h, i, :, j, :] = bits[self.tile_map[b, h, i, j]] != 0
        return tiles.reshape(self.B, self.H, nq * BQ, nk * BK)[:, :, :self.T, :self.S]

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
    """Counts `[..., R]` and left-packed column indices `[..., R, C]` of the True entries of sel `[..., R, C]`."""
    C = sel.shape[-1]
    cols = torch.arange(C, device=sel.device).expand_as(sel)
    # Stable sort of "not selected" keys brings the selected columns to the front in increasing order.
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices
    idx = torch.gather(cols, -1, order).to(torch.int32).contiguous()
    return sel.sum(-1).to(torch.int32).contiguous(), idx


def _pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """bool `[n, BQ, BK]` -> int32 `[n, BQ, ceil(BK / 32)]`, bit c % 32 of word c // 32 = column c."""
    n, BQ, BK = tiles.shape
    words = -(-BK // 32)
    padded = torch.zeros(n, BQ, words * 32, dtype=torch.int64, device=tiles.device)
    padded[:, :, :BK] = tiles.to(torch.int64)
    packed = (padded.view(n, BQ, words, 32) << torch.arange(32, device=tiles.device)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # two's complement


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
        any_ = t.any(-1).any(-1)
        all_ = t.all(-1).all(-1)  # tiles past T or S hold False padding, so they are never "full"
        st = torch.where(all_, FULL, torch.where(any_, PARTIAL, SKIP)).to(torch.int8)
        state[:, :, i0:i1] = st
        where = (st == PARTIAL).nonzero(as_tuple=True)
        if where[0].numel():
            ids = torch.arange(n_tiles, n_tiles + where[0].numel(), dtype=torch.int32, device=device)
            tile_map[:, :, i0:i1][where] = ids
            bits.append(_pack_bits(t[where]))
            n_tiles += where[0].numel()
    words = -(-BK // 32)
    tile_bits = torch.cat(bits) if bits else torch.zeros(1, BQ, words, dtype=torch.int32, device=device)
    kv_num, kv_idx = _index_lists(state == PARTIAL)
    full_kv_num, full_kv_idx = _index_lists(state == FULL)
    q_num, q_idx = _index_lists((state == PARTIAL).transpose(2, 3))
    full_q_num, full_q_idx = _index_lists((state == FULL).transpose(2, 3))
    return BlockMask(B, H, T, S, (BQ, BK), state, kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx,
                     full_q_num, full_q_idx, tile_map.contiguous(), tile_bits.contiguous())


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


def block_mask_from_blocks(selected: torch.Tensor, T: int, S: int, block=(128, 64),
                           mask_fn: MaskFn | None = None) -> BlockMask:
    """BlockMask from a block selection: bool `selected` `[B|1, H|1, ceil(T/BLOCK_Q), ceil(S/BLOCK_K)]` says
    which KV blocks each query block visits (MoBA / NSA / Quest style); `mask_fn`, if given, is applied
    elementwise inside the selected blocks (e.g. causal)."""
    block = _check_block(block)
    check_positive_int("T", T)
    check_positive_int("S", S)
    check_tensor("selected", selected, ndim=4, dtypes=(torch.bool,), layout="[B, H, ceil(T/BLOCK_Q), ceil(S/BLOCK_K)]")
    BQ, BK = block
    nq, nk = -(-T // BQ), -(-S // BK)
    if tuple(selected.shape[2:]) != (nq, nk):
        raise ValueError(f"selected must have shape [B, H, {nq}, {nk}] for T={T}, S={S}, block={block}, "
                         f"got {tuple(selected.shape)}")
    B, H = selected.shape[:2]
    device = selected.device

    def rows(r0: int, r1: int) -> torch.Tensor:
        qb = torch.arange(r0, r1, device=device) // BQ
        kb = torch.arange(S, device=device) // BK
        m = selected[:, :, qb][:, :, :, kb]
        return m & _eval_rows(mask_fn, B, H, r0, r1, S, device) if mask_fn is not None else m

    return _build(B, H, T, S, block, device, rows)
