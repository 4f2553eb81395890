"""Block-sparse flash attention: BlockMask construction and the kernels' index-list path vs the reference."""
import pytest
import torch

import effattn
from effattn.reference.softmax import mask_from_fn
from effattn.registry import REGISTRY, Shape
from effattn.sparse import block_mask, block_mask_from_blocks
from effattn.sparse.block_mask import FULL, PARTIAL, SKIP
from effattn.testing import assert_matches_reference

FLASH = REGISTRY.get("flash")


def stripes(b, h, q_idx, kv_idx):
    """Per-head pattern with full, partial and skipped 16 x 32 tiles."""
    return (((q_idx // 16) + (kv_idx // 32) + h) % 3 != 0) & ((kv_idx % 7 != 3) | (q_idx < 16)) | (kv_idx < 2)


def document(b, h, q_idx, kv_idx):
    doc_q, doc_k = (q_idx >= 29 + b) + (q_idx >= 51), (kv_idx >= 29 + b) + (kv_idx >= 51)
    return (doc_q == doc_k) & (kv_idx <= q_idx)


@pytest.mark.parametrize("mask_fn,B,H", [(stripes, 1, 4), (document, 2, 1)], ids=["stripes_heads", "docs_batch"])
def test_block_mask_matches_mask_from_fn(mask_fn, B, H):
    bm = block_mask(mask_fn, B, H, 70, 90, block=(16, 32))
    assert torch.equal(bm.to_dense(), mask_from_fn(mask_fn, B, H, 70, 90))
    st = bm.state
    assert {SKIP, PARTIAL, FULL} <= set(st.unique().tolist()) or mask_fn is document
    assert bm.density() == pytest.approx(float((st != SKIP).float().mean()))
    # The index lists hold exactly the visited tiles, so the work is proportional to them.
    assert int(bm.kv_num.sum() + bm.full_kv_num.sum()) == int((st != SKIP).sum())
    assert int(bm.q_num.sum() + bm.full_q_num.sum()) == int((st != SKIP).sum())
    i = int(bm.kv_num[0, 0, 1])
    assert sorted(bm.kv_idx[0, 0, 1, :i].tolist()) == (st[0, 0, 1] == PARTIAL).nonzero().flatten().tolist()


@pytest.mark.parametrize("mask_fn,B,H,options", [
    (stripes, 1, 4, dict()),
    (stripes, 1, 4, dict(causal=True, return_lse=True)),
    (document, 2, 1, dict(softcap=6.0)),
], ids=["stripes", "stripes_causal", "docs_softcap"])
def test_flash_block_mask_matches_reference(mask_fn, B, H, options, device):
    bm = block_mask(mask_fn, B, H, 70, 90, block=(16, 32), device=device)
    shape = Shape(batch=2, seq_q=70, seq_k=90, heads=4, kv_heads=2, head_dim=32)
    assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, **{"causal": False, **options})


def test_block_mask_from_blocks(device):
    T, S, block = 70, 45, (16, 32)
    selected = torch.rand(2, 1, 5, 2, generator=torch.Generator().manual_seed(3)) > 0.4
    selected[0, 0, 2] = False  # a query block that visits nothing: its rows output 0
    bm = block_mask_from_blocks(selected.to(device), T, S, block=block)
    expect = selected.repeat_interleave(16, 2).repeat_interleave(32, 3)[:, :, :T, :S]
    assert torch.equal(bm.to_dense().cpu(), expect)
    shape = Shape(batch=2, seq_q=T, seq_k=S, heads=2, kv_heads=1, head_dim=32)
    assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, causal=False, return_lse=True)
    causal = block_mask_from_blocks(selected, T, S, block=block, mask_fn=lambda b, h, q, k: k <= q)
    assert torch.equal(causal.to_dense(), expect & mask_from_fn(lambda b, h, q, k: k <= q, 2, 1, T, S))


def test_bf16_block_mask(device):
    bm = block_mask(document, 1, 1, 70, 70, block=(32, 16), device=device)
    shape = Shape(batch=1, seq_q=70, heads=2, head_dim=32)
    assert_matches_reference(FLASH, shape=shape, dtype=torch.bfloat16, device=device, block_mask=bm, causal=False)


def test_block_mask_errors():
    with pytest.raises(ValueError, match="power of two"):
        block_mask(stripes, 1, 1, 64, 64, block=(24, 32))
    with pytest.raises(ValueError, match="block BLOCK_K must be >= 16"):
        block_mask(stripes, 1, 1, 64, 64, block=(16, 8))
    with pytest.raises(TypeError, match="mask_fn must be a function"):
        block_mask("causal", 1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"selected must have shape \[B, H, 4, 2\]"):
        block_mask_from_blocks(torch.ones(1, 1, 3, 2, dtype=torch.bool), 64, 64, block=(16, 32))
    bm = block_mask(stripes, 1, 4, 70, 90, block=(16, 32))
    q, k = torch.randn(1, 70, 4, 32), torch.randn(1, 91, 4, 32)
    with pytest.raises(ValueError, match="block_mask was built for"):
        effattn.flash_attention(q, k, k, block_mask=bm)
    with pytest.raises(TypeError, match="block_mask must be an effattn.sparse.BlockMask"):
        effattn.flash_attention(q, k, k, block_mask=torch.ones(1, 1, 70, 91, dtype=torch.bool))


# kernel kind: (its pinned step configuration, a variant (look-ahead, TMA) or None, a configuration that does
# not divide the mask's blocks, and the error that names it)
STEP_CASES = {
    "fwd": ("fwd=16,16,4,1", "fwd=16,16,4,1,1", "fwd=64,32,4,1",
            r"split the block mask's blocks evenly: mask block \(32, 32\), got BLOCK_M=64, BLOCK_N=32"),
    "dkdv": ("dkdv=16,32,4,1", "dkdv=16,32,4,1,0,0,1", "dkdv=16,16,4,1",
             r"keep the block mask's key block.*mask block \(32, 32\), got BLOCK_M=16, BLOCK_N=16"),
    "dq": ("dq=32,16,4,1", None, "dq=16,16,4,1",
           r"keep the block mask's query block.*mask block \(32, 32\), got BLOCK_M=16, BLOCK_N=16"),
}


@pytest.mark.parametrize("kind", sorted(STEP_CASES))
def test_block_sparse_kernels_walk_mask_blocks_in_steps(kind, monkeypatch, device):
    """The forward may split each mask block's query rows over programs and walk its key blocks in smaller
    steps (one-warpgroup programs, the dense kernel's winner on short programs), dK/dV may walk each listed
    query block in smaller row steps (the tuner's spill-free candidates on Hopper), dQ each listed key block in
    smaller key steps (the dense kernel's 64-key tiles under 128-key mask blocks). Pinned here: 32 x 32 mask
    blocks in 16-row / 16-key steps, full and partial tiles (a second step reads the partial tiles' bits from
    row or column 16 on), GQA, causal, softcap, the forward's TMA loads and dK/dV's dP^T before the
    exponentials; then with the walks split into part programs (the forward's two programs per mask block)."""
    from effattn.hardware import _flash_split

    steps, ahead, bad, message = STEP_CASES[kind]
    def checkers(b, h, q_idx, kv_idx):
        return (((q_idx // 32) + (kv_idx // 32) + h) % 3 != 0) | ((kv_idx - q_idx).abs() < 5)

    bm = block_mask(checkers, 1, 4, 70, 90, block=(32, 32), device=device)
    assert {FULL, PARTIAL, SKIP} <= set(bm.state.unique().tolist())
    shape = Shape(batch=2, seq_q=70, seq_k=90, heads=4, kv_heads=2, head_dim=32)
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", steps)
    assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, causal=False)
    assert_matches_reference(FLASH, shape=shape, dtype=torch.bfloat16, device=device, block_mask=bm, causal=True)
    assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, causal=True, softcap=20.0)
    if ahead is not None:
        monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", ahead)
        assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, causal=True)
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", steps)  # with the walks of 3 blocks split into part programs
    monkeypatch.setattr(_flash_split, "SPLIT_UNITS", 1)
    assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, causal=False)
    assert any(s is not None for s in bm.splits.values())
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", bad)
    q, k, v = (torch.randn(2, n, h, 32, device=device, requires_grad=True) for n, h in ((70, 4), (90, 2), (90, 2)))
    with pytest.raises(ValueError, match=message):
        effattn.flash_attention(q, k, v, block_mask=bm).sum().backward()


def global_and_band(b, h, q_idx, kv_idx):
    """Longformer-like per-head pattern: global rows (every key) and global keys (every row) make a few
    walks several times longer than the band's."""
    return (q_idx < 5 + 6 * h) | (kv_idx < 3) | ((q_idx - kv_idx).abs() < 8 + 4 * h)


def test_work_split_plan(monkeypatch):
    """Walks longer than twice the part length are cut into contiguous unit ranges that cover them; the
    others keep their ordinary program. dK/dV's programs walk a GQA group's heads: their work adds up, and each
    part's range runs over the longest head's list."""
    from effattn.hardware import _flash_split
    from effattn.hardware._flash_split import plan_split

    num = torch.tensor([[[1, 7, 2, 0], [3, 3, 0, 9]]], dtype=torch.int32)  # [1, H = 2, 4 blocks]
    full = torch.tensor([[[0, 2, 0, 0], [1, 0, 0, 0]]], dtype=torch.int32)  # walks [1, 9, 2, 0], [4, 3, 0, 9]
    monkeypatch.setattr(_flash_split, "SPLIT_UNITS", 3)  # split walks of more than 6 units
    split = plan_split(num, full, 2, 2, 1)
    assert split.flags.view(2, 2, 4).tolist() == [[[0, 1, 0, 0], [0, 0, 0, 1]]] * 2
    assert split.groups.tolist() == [[0, 0, 1, 0, 3], [0, 1, 3, 3, 3], [1, 0, 1, 6, 3], [1, 1, 3, 9, 3]]
    assert split.parts[:6].tolist() == [[0, 0, 1, 0, 3], [0, 0, 1, 3, 6], [0, 0, 1, 6, 9],
                                        [0, 1, 3, 0, 3], [0, 1, 3, 3, 6], [0, 1, 3, 6, 9]]
    grouped = plan_split(num, full, 1, 1, 2)  # one KV head over both: work [5, 12, 2, 9], spans [4, 9, 2, 9]
    assert grouped.flags.tolist() == [0, 1, 0, 1]
    assert grouped.parts[:, 3:].tolist() == [[0, 2], [2, 4], [4, 6], [6, 9], [0, 3], [3, 6], [6, 9]]
    monkeypatch.setattr(_flash_split, "SPLIT_UNITS", 5)
    assert plan_split(num, full, 2, 2, 1) is None


@pytest.mark.parametrize("options", [dict(causal=False, return_lse=True), dict(causal=True, softcap=8.0)], ids=str)
def test_long_walks_split_over_part_programs(options, monkeypatch, device):
    """Global rows' and global keys' walks cut into parts (two listed blocks each here), each a program of its
    own past the ordinary grid, whose float32 results the launcher merges: the forward's by their LSE, dQ / dK /
    dV by a sum; outputs poisoned, so a split row the merge missed fails. Run twice: the second call reuses the
    splits cached on the mask."""
    from effattn.hardware import _flash_split

    monkeypatch.setattr(_flash_split, "SPLIT_UNITS", 2)  # walks of 5 or more listed blocks (of 3 to 6, 3 to 10)
    bm = block_mask(global_and_band, 1, 4, 70, 90, block=(16, 16), device=device)
    shape = Shape(batch=2, seq_q=70, seq_k=90, heads=4, kv_heads=2, head_dim=32)
    for _ in range(2):
        assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, **options)
    splits = [s for s in bm.splits.values() if s is not None]
    assert len(splits) == 2  # the query blocks' walks (forward, dQ) and the key blocks' (dK/dV)
    for s in splits:
        flags = s.flags.cpu()
        assert 0 < int(flags.sum()) < flags.numel()  # split and ordinary programs side by side
        assert s.n_parts > s.n_groups
    assert_matches_reference(FLASH, shape=shape, dtype=torch.bfloat16, device=device, block_mask=bm, **options)


def test_selection_masks_do_not_split():
    """Per-call block selections (MoBA, NSA, Quest) promise no host synchronisation: no split is planned."""
    from effattn.hardware._flash_split import mask_split

    selected = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    bm = block_mask_from_blocks(selected, 70, 90, block=(16, 16))
    assert not bm.balance and mask_split(bm, False, 1, 1, 1) is None and not bm.splits
    assert not bm.to("cpu").splits


def test_only_imbalanced_walks_split():
    """Without a forced part length, a walk is split only when it is both long against a program slot's share
    and several times the mean walk: equal walks on a short grid keep one program each."""
    from effattn.hardware._flash_split import plan_split

    even = torch.full((1, 16, 8), 64, dtype=torch.int32)
    assert plan_split(even, torch.zeros_like(even), 1, 16, 1) is None
    skewed = torch.full((1, 16, 64), 10, dtype=torch.int32)
    skewed[:, :, 0] = 64  # BigBird's global row at 8k (128 x 64 tiles): 64 blocks against 10
    split = plan_split(skewed, torch.zeros_like(skewed), 1, 16, 1)
    assert split.flags.view(16, 64)[:, 0].all() and int(split.flags.sum()) == 16
    assert split.n_parts == 16 * 6  # parts of 11 = max(8, 16 * 694 / (4 * 264)) blocks
    assert split.parts[:6, 3:].tolist() == [[0, 10], [10, 21], [21, 32], [32, 42], [42, 53], [53, 64]]


def test_block_sparse_launch_plans_are_reused_across_masks(monkeypatch, device):
    """Block-sparse launches are cached by the mask's geometry, not its contents: a second mask of the same
    shapes reuses the plans with its own index lists (and its own split), outputs poisoned each time."""
    from effattn.hardware import _flash_split, flash_bwd, flash_fwd

    monkeypatch.setattr(_flash_split, "SPLIT_UNITS", 2)
    monkeypatch.setattr(flash_fwd, "_PLANS", {})
    monkeypatch.setattr(flash_bwd, "_PLANS", {})
    shape = Shape(batch=2, seq_q=70, seq_k=90, heads=4, kv_heads=2, head_dim=32)
    first = block_mask(global_and_band, 1, 4, 70, 90, block=(16, 16), device=device)
    other = block_mask(lambda b, h, q, k: global_and_band(b, 3 - h, q, k), 1, 4, 70, 90, block=(16, 16), device=device)
    for bm in (first, other, other):
        assert_matches_reference(FLASH, shape=shape, device=device, block_mask=bm, causal=False)
    assert len(flash_fwd._PLANS) == len(flash_bwd._PLANS) == 1  # (the heads permuted: the same part counts)
