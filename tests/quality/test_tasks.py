import pytest
import torch

from effattn.quality import tasks
from effattn.quality.tasks import IGNORE


def test_mqar_layout():
    n, T, pairs, V = 16, 40, 5, 64
    x, y = tasks.mqar(n, T, pairs, V, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (n, T) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < V
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and int(keys.max()) < V // 2 and int(keys.min()) >= 1
        assert int(values.min()) >= V // 2
        asked = (row_y != IGNORE).nonzero().flatten()
        assert len(asked) == pairs and int(asked.min()) >= 2 * pairs
        answer = dict(zip(keys.tolist(), values.tolist()))
        assert all(answer[int(row_x[p])] == int(row_y[p]) for p in asked)  # each query asks its key's value
        assert sorted(row_x[asked].tolist()) == sorted(keys.tolist())  # every key asked once
    x2, y2 = tasks.mqar(n, T, pairs, V, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded
    with pytest.raises(ValueError, match="seq_len >= 4 \\* num_kv_pairs"):
        tasks.mqar(2, 15, 4, V, torch.Generator())
    with pytest.raises(ValueError, match="num_kv_pairs must be >= 1"):
        tasks.mqar(2, 16, 0, V, torch.Generator())


def test_selective_copy_and_induction_layout():
    x, y = tasks.selective_copy(8, 30, 6, 10, torch.Generator().manual_seed(1))
    for row_x, row_y in zip(x, y):
        data = row_x[:24][row_x[:24] >= 2]
        assert torch.equal(row_y[24:], data) and (row_y[:24] == IGNORE).all() and (row_x[24:] == 1).all()
    x, y = tasks.induction(4, 21, 7, torch.Generator().manual_seed(2))
    assert torch.equal(x[:, :10], x[:, 10:20])
    asked = y != IGNORE
    assert torch.equal(y[:, 10:20], x[:, 11:21]) and asked.sum() == 4 * 10
    with pytest.raises(ValueError, match="seq_len >= 2 \\* num_tokens"):
        tasks.selective_copy(1, 10, 6, 10, torch.Generator())


def test_stdlib_bytes_are_local_and_split():
    train, val = tasks.stdlib_bytes(max_bytes=300_000)
    assert train.dtype == torch.uint8 and train.numel() > 100_000 and val.numel() > 1000
    assert b"def " in bytes(train[:50_000].tolist())
    x, y = tasks.byte_windows(train, 3, 17, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 17) and torch.equal(x[:, 1:], y[:, :-1])
