"""Block-sparse work split: long walks of a block mask cut over several programs, their partial results combined.

A block-sparse launch runs one program per (batch, head, block): the forward and dQ one per query block,
walking its listed key blocks; dK/dV one per key block, walking its listed query blocks. Most walks are about
as long as each other, but a global row (Longformer, BigBird) lists every key block, and a global key block is
listed by every query block: such a program walks 10-30x the others, and the last head's one starts late, so
the launch ends long after the rest of the GPU is idle (a model of the launch order at 8k-32k: BigBird's forward
at 1.7-1.8x the time of a balanced grid with 132 program slots).

`plan_split` cuts each walk longer than twice a fair share (and IMBALANCE times the mean walk) into parts of
about one share, and gives every part a program of its own, appended to the launch's grid (a second grid axis
past the ordinary programs, so that they run last and the grid's order is kept: reordering lost K/V reuse on
the H100, 2026-12-06). The
ordinary program of a split block then does nothing (dQ still writes its rows' Delta). A part walks units
[u0, u1) of its block's list (a unit = one listed block: the full blocks first, then the partial ones), and
stores float32 partial results, which `combine` merges: the forward's by their log-sum-exp (outputs
normalised per part), the gradients by a sum.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._flash_common import KernelLaunch, block_d, cdiv, remember_plan

SPLIT_MIN_UNITS = 8  # a part walks at least this many listed blocks
SPLIT_WAVES = 4  # a part is at most 1/SPLIT_WAVES of a program slot's share of the walk (the tail it may add)
SLOTS_PER_SM = 2  # programs resident per SM, for the share
MAX_PARTS = 64  # parts of one block's walk
IMBALANCE = 4  # only walks this many times the mean are split (not a grid that is merely short)
SPLIT_UNITS: int | None = None  # forced part length (tests): every walk over twice it is split


@dataclass(frozen=True)
class WorkSplit:
    """Part programs of a block-sparse launch. `flags` int32 `[n_bh * NB]`: 1 where the (batch * heads + head,
    block) program's walk is done by parts; `parts` int32 `[n_parts, 5]`: (batch, head, block, u0, u1);
    `groups` int32 `[n_groups, 5]`: (batch, head, block, first part, number of parts), the parts of a block
    being consecutive. Heads are KV heads for dK/dV (its programs walk a GQA group's heads)."""

    flags: torch.Tensor
    parts: torch.Tensor
    groups: torch.Tensor

    @property
    def n_parts(self) -> int:
        return self.parts.shape[0]

    @property
    def n_groups(self) -> int:
        return self.groups.shape[0]


@functools.lru_cache(maxsize=None)
def _slots(device: torch.device) -> int:
    if device.type != "cuda":
        return 132 * SLOTS_PER_SM  # the interpreter: as an H100
    return torch.cuda.get_device_properties(device).multi_processor_count * SLOTS_PER_SM


def plan_split(num: torch.Tensor, full_num: torch.Tensor, B: int, H: int, group: int) -> WorkSplit | None:
    """The split of a launch over `B` x `H` x `group` heads whose blocks list `num + full_num` blocks
    (`[B|1, H*group|1, NB]`, the mask's broadcast dims): None when no walk is long enough to split. One host
    synchronisation (the counts); callers cache the result per mask."""
    counts = (num + full_num).cpu().to(torch.int64)
    nb = counts.shape[2]
    counts = counts.expand(B, H * group, nb).reshape(B, H, group, nb)
    work, span = counts.sum(2), counts.amax(2)  # a program walks [0, span) of each of its heads' lists
    total = int(work.sum())
    unit = SPLIT_UNITS or max(SPLIT_MIN_UNITS, cdiv(total, SPLIT_WAVES * _slots(num.device)))
    long = work > 2 * unit
    if SPLIT_UNITS is None:
        long &= work * work.numel() > IMBALANCE * total
    if not bool(long.any()):
        return None
    parts, groups = [], []
    for b, h, blk in long.nonzero().tolist():
        n = min(cdiv(int(work[b, h, blk]), unit), MAX_PARTS, int(span[b, h, blk]))
        edges = [int(span[b, h, blk]) * p // n for p in range(n + 1)]
        groups.append((b, h, blk, len(parts), n))
        parts += [(b, h, blk, edges[p], edges[p + 1]) for p in range(n)]
    dev = num.device
    return WorkSplit(long.to(torch.int32).flatten().to(dev), torch.tensor(parts, dtype=torch.int32, device=dev),
                     torch.tensor(groups, dtype=torch.int32, device=dev))


def mask_split(mask, transposed: bool, B: int, H: int, group: int) -> WorkSplit | None:
    """The split of a launch over `mask` (a BlockMask): its query blocks' walks (forward, dQ: H heads, group 1)
    or, `transposed`, its key blocks' (dK/dV: H = KV heads, `group` query heads each). Cached on the mask; None
    for masks built not to synchronise (`mask.balance` False: per-call selections such as MoBA's)."""
    if not mask.balance:
        return None
    key = (transposed, B, H, group, SPLIT_UNITS, SPLIT_MIN_UNITS, SPLIT_WAVES, SLOTS_PER_SM, MAX_PARTS, IMBALANCE)
    if key not in mask.splits:
        num, full = (mask.q_num, mask.full_q_num) if transposed else (mask.kv_num, mask.full_kv_num)
        mask.splits[key] = plan_split(num, full, B, H, group)
    return mask.splits[key]


def sparse_signature(mask, splits) -> tuple | None:
    """What a launch plan over `mask` (None: dense) depends on besides the inputs' shapes: the mask's geometry
    (its tensors' shapes, which the kernels take as integers) and the split's part counts (the grid). Masks with
    the same signature share plans; their tensors are passed anew on every launch."""
    if mask is None:
        return None
    return (mask.B, mask.H, mask.block, mask.num_q_blocks, mask.num_kv_blocks, mask.words, mask.tuning_class,
            tuple(None if s is None else s.n_parts for s in splits))


def part_buffer(split: WorkSplit | None, rows: int, dim: int | None, dummy: torch.Tensor) -> torch.Tensor:
    """The float32 results of a split launch's parts, `[n_parts, rows, dim]` (`[n_parts, rows]` for dim None), as
    `_store_part` writes and `combine` reads them; `dummy` (unread) without a split."""
    if split is None:
        return dummy
    return torch.empty((split.n_parts, rows) + (() if dim is None else (dim,)), dtype=torch.float32,
                       device=dummy.device)


def extra_rows(split: WorkSplit | None, grid0: int, sub: int) -> int:
    """Rows to append to the second grid axis of a launch with `grid0` programs on its first, `sub` per block."""
    return 0 if split is None else cdiv(split.n_parts * sub, grid0)


def split_args(split: WorkSplit | None, n_bh: int, dummy: torch.Tensor) -> tuple:
    """The kernels' FLAGS, PARTS, NPARTS, NBH for a launch over `n_bh` (batch, head) rows (`dummy`: unread)."""
    return (dummy, dummy, 0, n_bh) if split is None else (split.flags, split.parts, split.n_parts, n_bh)


@triton.jit
def _split_program(FLAGS, PARTS, NPARTS, NBH, HH, NB, SUB: tl.constexpr):
    """Who this program is: (batch, head, grid column, u0, u1, slot, skip). slot >= 0 for a part program (its
    row in PARTS), -1 for an ordinary one; skip: nothing to walk (an ordinary program of a split block, or a
    program past the last part). HH: heads of the launch's second grid axis, NB: blocks per head, SUB:
    programs per block."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    q = tl.maximum(pid1 - NBH, 0) * tl.num_programs(0) + pid0
    slot = tl.where(pid1 >= NBH, q // SUB, -1)
    row = PARTS + tl.minimum(tl.maximum(slot, 0), NPARTS - 1) * 5
    is_part = slot >= 0
    bh = tl.where(is_part, tl.load(row) * HH + tl.load(row + 1), pid1)
    col = tl.where(is_part, tl.load(row + 2) * SUB + q % SUB, pid0)
    u0 = tl.where(is_part, tl.load(row + 3), 0)
    u1 = tl.where(is_part, tl.load(row + 4), 1 << 30)
    flag = tl.load(FLAGS + tl.minimum(pid1, NBH - 1) * NB + tl.minimum(pid0 // SUB, NB - 1))
    skip = (slot >= NPARTS) | ((slot < 0) & (flag != 0))
    return bh // HH, bh % HH, col, u0, u1, slot, skip


@triton.jit
def _store_part(PART, slot, r0, x, offs, ROWS: tl.constexpr, DIM: tl.constexpr):
    """Store x `[n, len(offs)]` (float32) as rows r0.. of part `slot` of PART `[NPARTS, ROWS, DIM]`."""
    rows = slot * ROWS + r0 + tl.arange(0, x.shape[0])
    tl.store(PART + rows[:, None] * DIM + offs[None, :], x, mask=offs[None, :] < DIM)


@triton.jit
def _walk_ranges(FULL_NUM, NUM, row, u0, u1, SPLIT: tl.constexpr):
    """The listed blocks a program walks: (full lo, hi, partial lo, hi) of `row`'s lists of full and partial
    blocks; with SPLIT, units [u0, u1) of the two lists one after the other, else all of them."""
    n_full = tl.load(FULL_NUM + row)
    n_part = tl.load(NUM + row)
    f_lo = 0
    f_hi = n_full
    p_lo = 0
    p_hi = n_part
    if SPLIT:
        f_lo = tl.minimum(u0, n_full)
        f_hi = tl.minimum(u1, n_full)
        p_lo = tl.minimum(tl.maximum(u0 - n_full, 0), n_part)
        p_hi = tl.minimum(tl.maximum(u1 - n_full, 0), n_part)
    return f_lo, f_hi, p_lo, p_hi


@triton.jit
def _combine_kernel(PART, PART_LSE, OUT, OUT_LSE, GROUPS, s_b, s_t, s_h, slse_b, slse_h, N,
                    ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    SOFTMAX: tl.constexpr):
    """Rows [r, r + BLOCK_R) of one split block: its parts' float32 results `[n, ROWS, DIM]` merged into OUT
    (by their LSE `[n, ROWS]` into OUT and OUT_LSE with SOFTMAX, else summed)."""
    g = tl.program_id(0)
    b = tl.load(GROUPS + g * 5)
    h = tl.load(GROUPS + g * 5 + 1)
    blk = tl.load(GROUPS + g * 5 + 2)
    first = tl.load(GROUPS + g * 5 + 3)
    n = tl.load(GROUPS + g * 5 + 4)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < DIM
    rows = blk * ROWS + offs_r
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    if SOFTMAX:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for s in range(n):
            m = tl.maximum(m, tl.load(PART_LSE + (first + s) * ROWS + offs_r))
        m = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros([BLOCK_R], tl.float32)
        for s in range(n):
            w = tl.exp(tl.load(PART_LSE + (first + s) * ROWS + offs_r) - m)
            x = tl.load(PART + ((first + s) * ROWS + offs_r[:, None]) * DIM + offs_d[None, :], mask=d_ok, other=0.0)
            l += w
            acc += w[:, None] * x
        acc = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log(tl.where(l == 0.0, 1.0, l)))
        tl.store(OUT_LSE + b * slse_b + h * slse_h + rows, lse, mask=rows < N)
    else:
        for s in range(n):
            acc += tl.load(PART + ((first + s) * ROWS + offs_r[:, None]) * DIM + offs_d[None, :], mask=d_ok,
                           other=0.0)
    tl.store(OUT + b * s_b + rows[:, None] * s_t + h * s_h + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < N) & d_ok)


_COMBINES: dict = {}  # the merge launches, by what they specialise on (replayed: KernelLaunch)


def combine(split: WorkSplit, part: torch.Tensor, out: torch.Tensor, part_lse=None, out_lse=None) -> None:
    """Merge the parts' results `part` `[n_parts, ROWS, DIM]` into the split blocks' rows of `out` `[B, N, H,
    DIM]` (and, for the forward, `part_lse` `[n_parts, ROWS]` into `out_lse` `[B, H, N]`)."""
    _, rows, dim = part.shape
    softmax = part_lse is not None
    lse_args = (part_lse, out_lse, out_lse.stride(0), out_lse.stride(1)) if softmax else (part, part, 0, 0)
    args = (part, lse_args[0], out, lse_args[1], split.groups, out.stride(0), out.stride(1), out.stride(2),
            lse_args[2], lse_args[3], out.shape[1])
    key = (split.n_groups, rows, dim, softmax, out.dtype, out.device, args[5:])
    launch = _COMBINES.get(key)
    if launch is None:
        block_r = min(rows, 32)
        launch = remember_plan(_COMBINES, key, KernelLaunch(
            _combine_kernel, (split.n_groups, rows // block_r),
            dict(ROWS=rows, DIM=dim, BLOCK_R=block_r, BLOCK_D=block_d(dim), SOFTMAX=softmax, num_warps=4)))
    launch(*args)
