"""Synthetic tasks that separate token mixers in minutes, and a byte-level corpus that is on every machine.

Every generator returns (inputs, targets), int64 `[N, T]`, targets -100 where nothing is asked; it draws
from the given `torch.Generator` only, so the same seed gives the same data for every method.

- `mqar`: multi-query associative recall (Arora et al., 2023, Zoology). Key-value pairs first, then the
  keys again, each at a query slot amid noise; at a query the model must output its key's value.
- `selective_copy`: data tokens scattered among noise, then one marker per data token; at marker i the
  model outputs the i-th data token (Gu & Dao, 2023, Mamba's selective copying).
- `induction`: a random sequence repeated twice; in the second half the next token is predictable only by
  finding the previous occurrence (Olsson et al., 2022, induction heads).
- `stdlib_bytes`: the bytes of the Python standard library's own source files (deterministic order,
  split by file into train/validation) for byte-level perplexity.
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

from ..validate import check_positive_int

IGNORE = -100


def mqar(n: int, seq_len: int, num_kv_pairs: int, vocab: int, generator: torch.Generator,
         power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys from [1, vocab/2), values from [vocab/2, vocab). Layout: k1 v1 ... kn vn, then seq_len - 2n
    tokens of query region cut in 2-token slots; each key is asked once, in a slot drawn with probability
    proportional to (slot + 1)^(power_a - 1) (Zoology's power law: most queries soon after the pairs).
    The other query-region tokens are random noise. Target at a query key = its value."""
    for name, value in (("n", n), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab", vocab)):
        check_positive_int(name, value)
    half = vocab // 2
    slots = (seq_len - 2 * num_kv_pairs) // 2
    if slots < num_kv_pairs or half - 1 < num_kv_pairs:
        raise ValueError(f"mqar needs seq_len >= 4 * num_kv_pairs and vocab > 2 * (num_kv_pairs + 1); got "
                         f"seq_len={seq_len}, num_kv_pairs={num_kv_pairs}, vocab={vocab}")
    # distinct per row: the positions of the smallest of half - 1 uniform draws (what argsort()[:, :pairs]
    # gives, in the same order, but 25x faster at Zoology's vocabulary: 1.2 against 30 ms per batch of 128)
    keys = torch.rand(n, half - 1, generator=generator).topk(num_kv_pairs, largest=False).indices + 1
    values = torch.randint(half, vocab, (n, num_kv_pairs), generator=generator)
    inputs = torch.randint(0, vocab, (n, seq_len), generator=generator)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * num_kv_pairs:2], inputs[:, 1:2 * num_kv_pairs:2] = keys, values
    weights = (torch.arange(slots, dtype=torch.float64) + 1) ** (power_a - 1)
    slot = torch.multinomial(weights.expand(n, slots), num_kv_pairs, replacement=False, generator=generator)
    pos = 2 * num_kv_pairs + 2 * slot  # [n, pairs], query pair i sits at pos[:, i]
    rows = torch.arange(n).unsqueeze(1)
    inputs[rows, pos], targets[rows, pos] = keys, values
    return inputs, targets


def selective_copy(n: int, seq_len: int, num_tokens: int, vocab: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens: 0 = noise, 1 = marker, data from [2, vocab). seq_len - num_tokens positions hold
    num_tokens data tokens at random places; then num_tokens markers, the i-th asking for data token i."""
    for name, value in (("n", n), ("seq_len", seq_len), ("num_tokens", num_tokens), ("vocab", vocab)):
        check_positive_int(name, value)
    region = seq_len - num_tokens
    if region < num_tokens or vocab < 3:
        raise ValueError(f"selective_copy needs seq_len >= 2 * num_tokens and vocab >= 3, got seq_len={seq_len}, "
                         f"num_tokens={num_tokens}, vocab={vocab}")
    data = torch.randint(2, vocab, (n, num_tokens), generator=generator)
    pos = torch.rand(n, region, generator=generator).argsort(-1)[:, :num_tokens].sort(-1).values
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    rows = torch.arange(n).unsqueeze(1)
    inputs[rows, pos] = data
    inputs[:, region:] = 1
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, region:] = data
    return inputs, targets


def induction(n: int, seq_len: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random sequence of length seq_len // 2 repeated; targets: the next token at every position of
    the second copy (the first copy is unpredictable and not asked)."""
    check_positive_int("n", n)
    check_positive_int("seq_len", seq_len, minimum=4)
    check_positive_int("vocab", vocab, minimum=2)
    half = seq_len // 2
    first = torch.randint(0, vocab, (n, half), generator=generator)
    inputs = torch.cat([first, first, first[:, :seq_len - 2 * half]], dim=1)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, half:seq_len - 1] = inputs[:, half + 1:]
    return inputs, targets


def stdlib_files() -> list[Path]:
    """The standard library's .py files (site-packages excluded), sorted: the same list on every run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def stdlib_bytes(max_bytes: int = 4_000_000, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 tensors of stdlib source bytes, about max_bytes in all. A file goes to
    validation when the hash of its relative path falls in the first `val_fraction` (a stable split);
    each side takes files, in sorted order, until it holds its share of max_bytes."""
    check_positive_int("max_bytes", max_bytes)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {True: [], False: []}
    budget = {True: val_fraction * max_bytes, False: (1 - val_fraction) * max_bytes}
    for path in stdlib_files():
        rel = str(path.relative_to(root)).encode()
        in_val = int(hashlib.sha1(rel).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction
        if budget[in_val] > 0:
            data = path.read_bytes()
            parts[in_val].append(data)
            budget[in_val] -= len(data)
        if budget[True] <= 0 and budget[False] <= 0:
            break
    if not parts[True] or not parts[False]:
        raise RuntimeError(f"found too little standard-library source under {root} for a train/val split")
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(parts[False]), as_tensor(parts[True])


def byte_windows(data: torch.Tensor, n: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random windows: inputs `[n, seq_len]` bytes and targets the next byte at every position."""
    start = torch.randint(0, data.numel() - seq_len - 1, (n,), generator=generator)
    idx = start.unsqueeze(1) + torch.arange(seq_len + 1)
    win = data[idx].long()
    return win[:, :-1], win[:, 1:]
