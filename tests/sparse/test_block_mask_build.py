"""block_mask_from_blocks (vectorised, shape-cached edge tiles) equals the elementwise definition: the
generic builder on the expanded selection & causal & mask_fn, field by field."""
import pytest
import torch

from effattn.sparse import block_mask, block_mask_from_blocks
from effattn.sparse.block_mask import PARTIAL

FIELDS = ("state", "kv_num", "kv_idx", "full_kv_num", "full_kv_idx", "q_num", "q_idx", "full_q_num", "full_q_idx")


def partial_bits(bm):
    where = (bm.state == PARTIAL).nonzero(as_tuple=True)
    return bm.tile_bits[bm.tile_map[where].long()]


def assert_same(new, old):
    for f in FIELDS:
        assert torch.equal(getattr(new, f), getattr(old, f)), f
    assert torch.equal(partial_bits(new), partial_bits(old))
    assert torch.equal(new.to_dense(), old.to_dense())
    assert ((new.tile_map >= 0) == (new.state == PARTIAL)).all()


@pytest.mark.parametrize("B,H,T,S,block,causal,with_fn", [
    (2, 3, 70, 90, (16, 32), True, False),   # S > T: bottom-right diagonal, padded edges
    (1, 2, 90, 45, (32, 16), True, False),   # T > S: the first queries see nothing
    (2, 1, 64, 64, (16, 16), False, False),  # no edge tile at all
    (1, 3, 50, 77, (16, 32), False, False),
    (2, 2, 70, 90, (16, 32), True, True),    # mask_fn evaluated inside the selected tiles
], ids=["causal_S>T", "causal_T>S", "exact", "edges", "mask_fn"])
def test_from_blocks_equals_elementwise_definition(B, H, T, S, block, causal, with_fn):
    BQ, BK = block
    g = torch.Generator().manual_seed(B * 100 + T + S)
    sel = torch.rand(B, H, -(-T // BQ), -(-S // BK), generator=g) < 0.5
    fn = (lambda b, h, q, k: (q + k + h) % 5 != 0) if with_fn else None

    def elementwise(b, h, q, k):
        m = sel[b, h, q // BQ, k // BK]
        if causal:
            m = m & (k <= q + (S - T))
        return m & fn(b, h, q, k) if fn is not None else m

    old = block_mask(elementwise, B, H, T, S, block=block)
    assert_same(block_mask_from_blocks(sel, T, S, block=block, causal=causal, mask_fn=fn), old)


def test_from_blocks_broadcast_and_errors():
    sel = torch.ones(1, 1, 3, 2, dtype=torch.bool)
    bm = block_mask_from_blocks(sel, 40, 60, block=(16, 32), causal=True)
    assert torch.equal(bm.to_dense()[0, 0], torch.ones(40, 60, dtype=torch.bool).tril(20))
    with pytest.raises(TypeError, match="causal must be a bool"):
        block_mask_from_blocks(sel, 40, 60, block=(16, 32), causal=1)
    with pytest.raises(TypeError, match="mask_fn must be a function"):
        block_mask_from_blocks(sel, 40, 60, block=(16, 32), mask_fn="causal")


def test_tuning_class_separates_masks_by_partial_tiles_per_row():
    """The tuner's key for block-sparse launches: a band has a few partial tiles per query block, global
    rows make every tile of their block partial; computed from shapes, so no device sync."""
    from effattn.sparse import block_mask

    band = block_mask(lambda b, h, i, j: (j <= i) & (j > i - 20), 1, 2, 1024, 1024, block=(64, 32))
    glob = block_mask(lambda b, h, i, j: ((j <= i) & (j > i - 20)) | (i < 3), 1, 2, 1024, 1024, block=(64, 32))
    # 47 partial tiles per head over 16 query blocks (ceil 3 -> 4); the 3 global rows add 31 more (5 -> 8)
    assert band.tuning_class == ((64, 32), 4) and glob.tuning_class == ((64, 32), 8)
