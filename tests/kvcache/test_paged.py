"""Paged KV cache: block-table bookkeeping, copy-on-write forks, exhaustion, waste report."""
import random

import pytest
import torch

from effattn.kvcache import PagedKVCache, PoolExhaustedError


def tokens(n, start, Hkv=1, D=4):
    """Distinct, recognisable rows: token j of a stream with id `start` holds start + j everywhere."""
    x = (start + torch.arange(n, dtype=torch.float32)).view(1, n, 1, 1).expand(1, n, Hkv, D).contiguous()
    return x, -x


def test_randomized_append_fork_free_keeps_invariants():
    rng = random.Random(0)
    cache = PagedKVCache(40, 4, 1, 4)
    shadow = {}  # sid -> list of token values: what each sequence must read back
    counter, exhausted, copies = 0, 0, 0
    for _ in range(300):
        op = rng.random()
        live = list(cache.tables)
        if op < 0.15 or not live:
            shadow[cache.add_sequence()] = []
        elif op < 0.3:
            src = rng.choice(live)
            shadow[cache.fork(src)] = list(shadow[src])
        elif op < 0.45:
            sid = rng.choice(live)
            cache.free(sid)
            del shadow[sid]
        else:
            sid, n = rng.choice(live), rng.randint(1, 7)
            k, v = tokens(n, counter)
            before = {s: cache.keys_values(s) for s in cache.tables}, list(cache.free_blocks), list(cache.refcount)
            table = list(cache.tables[sid])
            try:
                cache.append(k, v, seq_ids=[sid])
            except PoolExhaustedError:
                exhausted += 1
                # nothing changed: same free list, counts and contents
                assert cache.free_blocks == before[1] and cache.refcount == before[2]
                for s, (ks, vs) in before[0].items():
                    k2, v2 = cache.keys_values(s)
                    assert torch.equal(ks, k2) and torch.equal(vs, v2)
            else:
                copies += bool(table) and cache.tables[sid][len(table) - 1] != table[-1]
                shadow[sid] += list(range(counter, counter + n))
                counter += n
        cache.check_invariants()
        for sid, want in shadow.items():  # no sequence sees another one's writes (copy-on-write)
            k, v = cache.keys_values(sid)
            assert k[:, 0, 0].tolist() == want and v[:, 0, 0].tolist() == [-x for x in want]
        report = cache.memory_report()
        assert report["blocks_used"] + report["blocks_free"] == 40
        assert 0 <= report["wasted_slots"] < 4 * max(1, len(shadow))
    assert exhausted > 0 and copies > 0  # the sequence exercised both paths


def test_fork_shares_blocks_until_written():
    cache = PagedKVCache(8, 4, 1, 4)
    a = cache.add_sequence()
    cache.append(*tokens(6, 0), seq_ids=[a])  # one full block + one half block
    b = cache.fork(a)
    assert cache.tables[a] == cache.tables[b] and cache.memory_report()["blocks_used"] == 2
    cache.append(*tokens(1, 100), seq_ids=[b])  # copy-on-write of the shared half block only
    assert cache.tables[a][0] == cache.tables[b][0] and cache.tables[a][1] != cache.tables[b][1]
    assert cache.keys_values(a)[0][:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert cache.keys_values(b)[0][:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 100]
    cache.free(a)
    assert cache.refcount[cache.tables[b][0]] == 1
    cache.check_invariants()


def test_exhaustion_raises_and_changes_nothing():
    cache = PagedKVCache(3, 4, 1, 4)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(*tokens(5, 0), seq_ids=[a])
    snapshot = (list(cache.free_blocks), list(cache.refcount), {s: list(t) for s, t in cache.tables.items()},
                dict(cache.seq_lengths), cache.k.clone())
    k = torch.cat([tokens(4, 50)[0], tokens(4, 60)[0]])
    with pytest.raises(PoolExhaustedError, match="needs 2 free blocks of 4 tokens, only 1 of 3 are free"):
        cache.append(k, -k, seq_ids=[a, b])  # a fits in its last block + 1 new, b needs 1: 2 > 1 free
    assert (cache.free_blocks, cache.refcount, cache.tables, cache.seq_lengths) == snapshot[:4]
    assert torch.equal(cache.k, snapshot[4])
    cache.append(*tokens(3, 70), seq_ids=[a])  # still usable: fills a's last block exactly
    cache.check_invariants()


def test_memory_report_counts_only_last_block_waste():
    cache = PagedKVCache(10, 4, 1, 4)
    for n in (5, 8, 1):
        cache.append(*tokens(n, 0), seq_ids=[cache.add_sequence()])
    r = cache.memory_report()
    assert r["blocks_used"] == 2 + 2 + 1 and r["tokens_stored"] == 14 and r["wasted_slots"] == 3 + 0 + 3
    assert r["waste_fraction"] == pytest.approx(6 / 20)


def test_paged_errors():
    cache = PagedKVCache(4, 4, 2, 8)
    a = cache.add_sequence()
    with pytest.raises(ValueError, match="unknown sequence id 7"):
        cache.fork(7)
    with pytest.raises(ValueError, match="must not repeat"):
        cache.append(torch.zeros(2, 1, 2, 8), torch.zeros(2, 1, 2, 8), seq_ids=[a, a])
    with pytest.raises(ValueError, match=r"k must have shape \[B, T, Hkv, D\] = \[1, 1, 2, 8\]"):
        cache.append(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8))
    with pytest.raises(TypeError, match="cache's dtype"):
        cache.append(torch.zeros(1, 1, 2, 8, dtype=torch.float64), torch.zeros(1, 1, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="lengths must hold 1 ints"):
        cache.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), lengths=[3])
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        PagedKVCache(0, 4, 1, 4)
