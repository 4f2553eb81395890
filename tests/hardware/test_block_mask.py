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
    exponentials."""
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
    monkeypatch.setenv("EFFATTN_FLASH_CONFIGS", bad)
    q, k, v = (torch.randn(2, n, h, 32, device=device, requires_grad=True) for n, h in ((70, 4), (90, 2), (90, 2)))
    with pytest.raises(ValueError, match=message):
        effattn.flash_attention(q, k, v, block_mask=bm).sum().backward()
