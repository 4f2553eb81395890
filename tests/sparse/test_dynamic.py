"""Dynamic selections (fast vs dense definition), limits where a method equals full attention, variants of
LSH / differential attention, and error paths."""
import pytest
import torch

import effattn.sparse as sp
from effattn.reference import softmax_attention
from effattn.registry import REGISTRY
from effattn.sparse import dynamic as dyn
from effattn.sparse import lsh
from effattn.sparse.nsa import nsa_reference
from effattn.testing import assert_matches_reference, odd_shapes


def qkv(B=1, T=45, S=45, H=4, Hkv=2, D=32, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device, dtype) for shape in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D))]


@pytest.mark.parametrize("T,S", [(45, 45), (19, 64), (1, 50)])
def test_selections_match_dense_definitions(T, S):
    q, k, _ = qkv(T=T, S=S)
    q64, k64 = q.double(), k.double()
    assert torch.equal(dyn.moba_select(q, k, 16, 1), dyn.moba_reference_select(q64, k64, 16, 1))
    assert torch.equal(dyn.quest_select(q, k, 16, 2), dyn.quest_reference_select(q64, k64, 16, 2))
    for kw in ({"threshold": 0.5}, {"budget": 0.4}):
        for causal in (True, False):
            fast = dyn.xattention_select(q, k, 16, 4, causal=causal, **kw)
            assert torch.equal(fast, dyn.xattention_reference_select(q64, k64, 16, 4, causal=causal, **kw))


def test_selections_are_sparse_and_causal():
    q, k, _ = qkv(T=96, S=96)
    sel = dyn.moba_select(q, k, 16, 2)
    assert torch.equal(sel.sum(-1).max(), torch.tensor(3))  # current + top 2
    assert not torch.triu(sel[0, 0], diagonal=1).any()  # no future blocks
    assert dyn.xattention_select(q, k, 16, 4, threshold=0.3).float().mean() < 0.5


def test_quest_bound_is_an_upper_bound():
    q, k, _ = qkv(T=3, S=40, Hkv=4)
    lo = torch.stack([k[:, p:p + 8].amin(1) for p in range(0, 40, 8)], 1)
    hi = torch.stack([k[:, p:p + 8].amax(1) for p in range(0, 40, 8)], 1)
    crit = torch.einsum("bthd,bphd->bhtp", q, (lo + hi) / 2) + torch.einsum("bthd,bphd->bhtp", q.abs(), (hi - lo) / 2)
    exact = torch.einsum("bthd,bshd->bhts", q, k).view(1, 4, 3, 5, 8).amax(-1)
    assert (crit >= exact - 1e-5).all()


def test_choose_blocks_rule():
    w = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    cand = torch.tensor([[True, True, True, False]])
    assert dyn.choose_blocks(w, cand, threshold=0.6).tolist() == [[False, True, True, False]]
    assert dyn.choose_blocks(w, cand, threshold=0.5).tolist() == [[False, True, False, False]]
    assert dyn.choose_blocks(w, cand, budget=0.5).tolist() == [[False, True, True, False]]


def test_full_budget_is_full_attention(device):
    q, k, v = qkv(T=40, S=40, device=device)
    full = softmax_attention(q, k, v, causal=True)
    for o in (sp.moba(q, k, v, block_size=16, top_k=8), sp.quest(q, k, v, page_size=16, top_k=8),
              sp.xattention(q, k, v, block_size=16, stride=4, threshold=1.0)):
        torch.testing.assert_close(o, full, atol=2e-5, rtol=1e-4)


def test_lsh_variants_and_decoding_quest(device):
    for opts in ({"causal": False}, {"shared_qk": False, "causal": False}, {"n_hashes": 3, "chunk_size": 5}):
        assert_matches_reference(REGISTRY.get("reformer_lsh"), shape=odd_shapes()[0], seed=2, device=device, **opts)
    assert_matches_reference(REGISTRY.get("differential"), shape=odd_shapes()[1], seed=1, device=device,
                             causal=False, layer=3)
    assert_matches_reference(REGISTRY.get("quest"), shape=odd_shapes()[1].__class__(batch=2, seq_q=1, seq_k=50),
                             seed=4, device=device, top_k=1)


def test_lsh_buckets_are_seeded():
    R1, R2 = lsh.rotations(8, 2, 4, seed=0), lsh.rotations(8, 2, 4, seed=0)
    assert torch.equal(R1, R2) and not torch.equal(R1, lsh.rotations(8, 2, 4, seed=1))
    q, k, v = qkv(T=20, S=20, Hkv=4)
    a = sp.lsh_attention(q, k, v, n_buckets=4, chunk_size=4, seed=3)
    assert torch.equal(a, sp.lsh_attention(q, k, v, n_buckets=4, chunk_size=4, seed=3))
    assert not torch.allclose(a, sp.lsh_attention(q, k, v, n_buckets=4, chunk_size=4, seed=4))


def test_errors():
    q, k, v = qkv(T=32, S=32)
    with pytest.raises(ValueError, match="power of two"):
        sp.moba(q, k, v, block_size=24)
    with pytest.raises(ValueError, match="neither"):
        sp.xattention(q, k, v, block_size=16, stride=4, threshold=None)
    with pytest.raises(ValueError, match="budget"):
        sp.xattention(q, k, v, block_size=16, stride=4, budget=0.0)
    with pytest.raises(ValueError, match="stride must divide"):
        sp.xattention(q, k, v, block_size=16, stride=3)
    with pytest.raises(ValueError, match="threshold"):
        sp.xattention(q, k, v, block_size=16, stride=4, threshold=1.5)
    with pytest.raises(ValueError, match="n_buckets must be even"):
        sp.lsh_attention(q, k, v, n_buckets=5)
    with pytest.raises(ValueError, match="same length"):
        sp.lsh_attention(q[:, :5], k, v)
    gates, w = torch.rand(1, 32, 4, 3), torch.ones(16) / 16
    with pytest.raises(ValueError, match="gates"):
        sp.nsa(q, k, v, gates[..., :2], w, w, block_size=16)
    with pytest.raises(ValueError, match="w_k"):
        sp.nsa(q, k, v, gates, w[:8], w, block_size=16)
    with pytest.raises(ValueError, match="selection must be one of"):
        sp.nsa(q, k, v, gates, w, w, block_size=16, selection="query")
    E = torch.randn(4, 31)
    with pytest.raises(ValueError, match=r"\[k, S\]"):
        sp.linformer(q, k, v, E, E)
    with pytest.raises(ValueError, match="must be even"):
        sp.differential_attention(q[..., :31], k[..., :31], v, *[torch.zeros(15)] * 4)
    with pytest.raises(ValueError, match="lambda_q1"):
        sp.differential_attention(q, k, v, *[torch.zeros(15)] * 4)


def test_through_the_public_api(device):
    import effattn
    q, k, v = qkv(T=40, S=40, device=device)
    g = torch.Generator().manual_seed(0)
    gates, w = torch.rand(1, 40, 4, 3, generator=g).to(device), torch.full((16,), 1 / 16, device=device)
    torch.testing.assert_close(effattn.attention(q, k, v, method="nsa", gates=gates, w_k=w, w_v=w, block_size=16,
                                                 top_n=1, window=8),
                               sp.nsa(q, k, v, gates, w, w, block_size=16, top_n=1, window=8))
    E = (torch.randn(8, 40, generator=g) / 40 ** 0.5).to(device)
    torch.testing.assert_close(effattn.attention(q, k, v, method="linformer", E=E, F=E), sp.linformer(q, k, v, E, E))
    with pytest.raises(TypeError, match="gates"):
        effattn.attention(q, k, v, method="nsa")


@pytest.mark.parametrize("selection,T,S", [("token", 37, 37), ("block", 37, 37), ("token", 5, 45), ("token", 9, 9)],
                         ids=["token", "block", "decode_chunk", "before_first_block"])
def test_nsa_selections_match_reference(selection, T, S):
    """Per-token (default) and per-block selection; a chunk continuing a sequence; S < block_size (no
    compressed token yet: o_cmp = 0)."""
    q, k, v = qkv(T=T, S=S, seed=4)
    g = torch.Generator().manual_seed(5)
    gates, w = torch.rand(1, T, 4, 3, generator=g), 1 / 16 + 0.1 * torch.randn(16, generator=g)
    opts = dict(block_size=16, top_n=1, window=6, selection=selection)
    o = sp.nsa(q, k, v, gates, w, w, **opts)
    ref = nsa_reference(*(t.double() for t in (q, k, v, gates, w, w)), **opts)
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
