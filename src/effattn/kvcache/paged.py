"""Paged KV cache (PagedAttention, Kwon et al. 2023; survey Table 4 KV storage).

Keys and values live in a pool of fixed-size blocks `[num_blocks, block_size, Hkv, D]`; each sequence owns
a block table (list of block ids) and a length. Only the last block of a sequence can be partly empty, so
the waste is below one block per sequence. `fork` shares every block of a sequence (reference counts);
the first append into a shared, partly filled last block copies it first (copy-on-write), so no sequence
ever writes into a block another one reads. An append that needs more blocks than are free raises
`PoolExhaustedError` before anything changes.
"""
from __future__ import annotations

import torch

from ..hardware.decode_kernels import KVSegment
from ..validate import check_positive_int
from .base import KVCacheBase


class PoolExhaustedError(RuntimeError):
    """The block pool has fewer free blocks than an append needs; the cache is unchanged."""


class PagedKVCache(KVCacheBase):
    """A block pool shared by sequences, identified by the ids `add_sequence` and `fork` return."""

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 head_dim_v: int | None = None, *, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__(kv_heads, head_dim, head_dim_v, dtype, device)
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros(num_blocks, block_size, kv_heads, self.head_dim_v, dtype=dtype, device=self.device)
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out block 0 first
        self.refcount = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self.seq_lengths: dict[int, int] = {}
        self._next_id = 0

    # ------------------------------------------------------------------------------ sequence management
    def add_sequence(self) -> int:
        sid, self._next_id = self._next_id, self._next_id + 1
        self.tables[sid], self.seq_lengths[sid] = [], 0
        self._memo = None
        return sid

    def _check_id(self, sid) -> int:
        if sid not in self.tables:
            raise ValueError(f"unknown sequence id {sid!r} (live: {list(self.tables)})")
        return sid

    def fork(self, sid: int) -> int:
        """A new sequence sharing all of `sid`'s blocks (beam search, parallel sampling): no copy now."""
        self._check_id(sid)
        new = self.add_sequence()
        self.tables[new] = list(self.tables[sid])
        self.seq_lengths[new] = self.seq_lengths[sid]
        for blk in self.tables[new]:
            self.refcount[blk] += 1
        return new

    def free(self, sid: int) -> None:
        """Drop a sequence; blocks nobody else references return to the pool."""
        self._check_id(sid)
        for blk in self.tables.pop(sid):
            self.refcount[blk] -= 1
            if self.refcount[blk] == 0:
                self.free_blocks.append(blk)
        del self.seq_lengths[sid]
        self._memo = None

    @property
    def lengths(self) -> list[int]:
        return list(self.seq_lengths.values())

    def sequence_ids(self) -> list[int]:
        return list(self.tables)

    def batch_lengths(self, seq_ids=None) -> list[int]:
        return [self.seq_lengths[s] for s in self._ids(seq_ids)]

    def _ids(self, seq_ids) -> list[int]:
        ids = list(self.tables) if seq_ids is None else [self._check_id(s) for s in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {ids}")
        return ids

    # ---------------------------------------------------------------------------------------- appending
    def _blocks_needed(self, sid: int, n: int) -> int:
        L, bs = self.seq_lengths[sid], self.block_size
        if n == 0:
            return 0
        copy = 1 if L % bs and self.refcount[self.tables[sid][-1]] > 1 else 0
        return copy + -(-(L + n) // bs) - -(-L // bs)

    def append(self, k: torch.Tensor, v: torch.Tensor, seq_ids=None, lengths=None) -> None:
        """Append k `[n, T, Hkv, D]`, v `[n, T, Hkv, Dv]` to the sequences `seq_ids` (default: all live ones
        in order), the first `lengths[i]` tokens of row i. Raises PoolExhaustedError, changing nothing,
        when the free blocks do not suffice."""
        ids = self._ids(seq_ids)
        lengths = self._check_append(k, v, len(ids), lengths)
        need = sum(self._blocks_needed(s, n) for s, n in zip(ids, lengths))
        if need > len(self.free_blocks):
            raise PoolExhaustedError(
                f"the KV block pool is exhausted: appending {sum(lengths)} tokens needs {need} free blocks of "
                f"{self.block_size} tokens, only {len(self.free_blocks)} of {self.num_blocks} are free; free "
                f"finished sequences or create the cache with more num_blocks")
        for row, (sid, n) in enumerate(zip(ids, lengths)):
            self._append_one(sid, k[row, :n], v[row, :n])

    def _take_block(self) -> int:
        blk = self.free_blocks.pop()
        self.refcount[blk] = 1
        return blk

    def _append_one(self, sid: int, k: torch.Tensor, v: torch.Tensor) -> None:
        table, bs, n = self.tables[sid], self.block_size, k.shape[0]
        L = self.seq_lengths[sid]
        if n and L % bs and self.refcount[table[-1]] > 1:  # copy-on-write of the shared last block
            old, new = table[-1], self._take_block()
            self.k[new], self.v[new] = self.k[old], self.v[old]
            self.refcount[old] -= 1
            table[-1] = new
        done = 0
        while done < n:
            if L % bs == 0:
                table.append(self._take_block())
            blk, off = table[-1], L % bs
            take = min(bs - off, n - done)
            self.k[blk, off:off + take] = k[done:done + take]
            self.v[blk, off:off + take] = v[done:done + take]
            L, done = L + take, done + take
        self.seq_lengths[sid] = L
        self._memo = None

    # ----------------------------------------------------------------------------------- kernel + checks
    def _build_segments(self, seq_ids):
        ids = self._ids(seq_ids)
        width = max(1, max(len(self.tables[s]) for s in ids))
        table = torch.zeros(len(ids), width, dtype=torch.int32)
        for row, sid in enumerate(ids):
            table[row, :len(self.tables[sid])] = torch.tensor(self.tables[sid], dtype=torch.int32)
        lens = self._lengths_tensor(self.batch_lengths(ids))
        seg = KVSegment(self.k, self.v, lens, torch.zeros_like(lens), max(self.batch_lengths(ids)),
                        block_table=table.to(self.device))
        return [seg], lens

    def keys_values(self, sid: int, dtype=None):
        self._check_id(sid)
        L, table = self.seq_lengths[sid], self.tables[sid]
        idx = torch.tensor(table, dtype=torch.long, device=self.device)
        k = self.k[idx].flatten(0, 1)[:L]
        v = self.v[idx].flatten(0, 1)[:L]
        return k.to(dtype or self.dtype), v.to(dtype or self.dtype)

    def memory_report(self) -> dict:
        """Blocks in use (shared ones counted once), token slots they hold, tokens stored and the waste."""
        used = [b for b in range(self.num_blocks) if self.refcount[b] > 0]
        slots = len(used) * self.block_size
        # Tokens physically stored: a shared block counts once, filled up to the longest sharer's use.
        filled = {}
        for sid, table in self.tables.items():
            L = self.seq_lengths[sid]
            for i, blk in enumerate(table):
                filled[blk] = max(filled.get(blk, 0), min(self.block_size, L - i * self.block_size))
        stored = sum(filled.values())
        return {"blocks_used": len(used), "blocks_free": len(self.free_blocks), "slots": slots,
                "tokens_stored": stored, "wasted_slots": slots - stored,
                "waste_fraction": (slots - stored) / slots if slots else 0.0,
                "logical_tokens": sum(self.seq_lengths.values())}

    def check_invariants(self) -> None:
        """Raise AssertionError if the allocator's bookkeeping is inconsistent."""
        counts = [0] * self.num_blocks
        for sid, table in self.tables.items():
            L = self.seq_lengths[sid]
            assert len(table) == -(-L // self.block_size), f"sequence {sid}: {len(table)} blocks for {L} tokens"
            for blk in table:
                counts[blk] += 1
        assert counts == self.refcount, "reference counts differ from the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        assert free == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list != unreferenced blocks"
        assert self.memory_report()["wasted_slots"] < self.block_size * max(1, len(self.tables)), "waste bound"
