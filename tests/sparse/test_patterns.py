"""Every pattern against its definition written as a loop over (query, key) pairs, plus combinators,
pictures, seeded randomness, block-mask builders and error paths."""
import math
import struct
import zlib

import pytest
import torch

from effattn.sparse import patterns as P

T, S = 12, 12


def loop_mask(rule, T=T, S=S):
    return torch.tensor([[bool(rule(i, j)) for j in range(S)] for i in range(T)])


def coords(i, grid):
    out = []
    for g in reversed(grid):
        out.append(i % g)
        i //= g
    return out[::-1]


def natten_rule(grid, kernel):
    def rule(i, j):
        ok = True
        for ci, cj, g, k in zip(coords(i, grid), coords(j, grid), grid, kernel):
            start = min(max(ci - k // 2, 0), g - k)
            ok &= start <= cj < start + k
        return ok
    return rule


def tile_rule(grid, tile, window):
    def rule(i, j):
        ok = True
        for ci, cj, g, t, w in zip(coords(i, grid), coords(j, grid), grid, tile, window):
            n = math.ceil(g / t)
            start = min(max(ci // t - w // 2, 0), n - w)
            ok &= start <= cj // t < start + w
        return ok
    return rule


def radial_rule(tpf, width):
    def rule(i, j):
        d = abs(i // tpf - j // tpf)
        return abs(i % tpf - j % tpf) <= width // 2 ** int(math.floor(math.log2(d + 1)))
    return rule


CASES = [
    (P.causal(), lambda i, j: j <= i, (T, S)),
    (P.full(), lambda i, j: True, (T, S)),
    (P.sliding_window(3), lambda i, j: i - 3 <= j <= i, (T, S)),
    (P.sliding_window(2, 1), lambda i, j: i - 2 <= j <= i + 1, (T, S)),
    (P.dilated_window(2, 3), lambda i, j: 0 <= i - j <= 6 and (i - j) % 3 == 0, (T, S)),
    (P.dilated_window(2, 2, causal=False), lambda i, j: abs(i - j) <= 4 and (i - j) % 2 == 0, (T, S)),
    (P.global_tokens([0, 5]), lambda i, j: i in (0, 5) or j in (0, 5), (T, S)),
    (P.block_window(4, 1), lambda i, j: abs(i // 4 - j // 4) <= 1, (T, S)),
    (P.strided(4), lambda i, j: j <= i and (i - j < 4 or (i - j) % 4 == 0), (T, S)),
    (P.fixed(4, 2), lambda i, j: j <= i and (i // 4 == j // 4 or j % 4 >= 2), (T, S)),
    (P.sinks_recent(2, 3), lambda i, j: j <= i and (j < 2 or i - j < 3), (T, S)),
    (P.a_shape(1, 4), lambda i, j: j <= i and (j < 1 or i - j < 4), (T, S)),
    (P.vertical_slash([1, 7], [0, 3]), lambda i, j: j <= i and (j in (1, 7) or i - j in (0, 3)), (T, S)),
    (P.prefix_lm(5), lambda i, j: j < 5 or j <= i, (T, S)),
    (P.document(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])) & P.causal(),
     lambda i, j: j <= i and [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3][i] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3][j], (T, S)),
    (P.neighborhood((4, 5), (3, 3)), natten_rule((4, 5), (3, 3)), (20, 20)),
    (P.neighborhood((3, 4, 4), (2, 3, 3)), natten_rule((3, 4, 4), (2, 3, 3)), (48, 48)),
    (P.sliding_tile((6, 6), (2, 3), (3, 1)), tile_rule((6, 6), (2, 3), (3, 1)), (36, 36)),
    (P.sliding_tile((2, 4, 4), (1, 2, 2), (1, 2, 2)), tile_rule((2, 4, 4), (1, 2, 2), (1, 2, 2)), (32, 32)),
    (P.radial(5, 4, 3), radial_rule(4, 3), (20, 20)),
]


@pytest.mark.parametrize("pattern,rule,size", CASES, ids=[c[0].__name__ for c in CASES])
def test_pattern_matches_definition(pattern, rule, size):
    got = pattern.dense(1, 1, *size)[0, 0]
    want = loop_mask(rule, *size)
    assert torch.equal(got, want), "\n" + P.draw(got, *size) + "\nexpected\n" + P.draw(want, *size)
    assert 0 < got.float().mean() <= 1


def test_combinators_names_and_shift():
    w, c = P.sliding_window(2, 2), P.causal()
    both, either, neg = w & c, w | P.global_tokens([0]), ~c
    assert both.__name__ == "(window(2,2) & causal)" and "|" in either.__name__ and neg.__name__ == "~causal"
    assert torch.equal(both.dense(1, 1, T, S), w.dense(1, 1, T, S) & c.dense(1, 1, T, S))
    assert torch.equal(either.dense(1, 1, T, S), w.dense(1, 1, T, S) | P.global_tokens([0]).dense(1, 1, T, S))
    assert torch.equal(neg.dense(1, 1, T, S), ~c.dense(1, 1, T, S))
    plain = P.as_pattern(lambda b, h, q, kv: kv <= q)  # a bare function combines too
    assert torch.equal((plain & w).dense(1, 1, T, S), both.dense(1, 1, T, S))
    # bottom-right alignment: 3 queries at the end of 7 keys
    assert torch.equal(c.shifted(4).dense(1, 1, 3, 7)[0, 0], loop_mask(lambda i, j: j <= i + 4, 3, 7))


def test_batch_and_head_dependence_flags():
    assert not (P.causal() | P.sliding_window(3)).per_head
    mixed = P.causal() & P.random_blocks(16, 16, 4, 1, heads=2)
    assert mixed.per_head and not mixed.per_batch
    assert P.prefix_lm(torch.tensor([1, 2])).per_batch
    assert P.as_pattern(lambda b, h, q, kv: kv <= q + h).per_head  # a bare function may use b and h
    bm = mixed.block_mask(3, 2, 16, 16, block=(16, 16))
    assert bm.to_dense().shape[:2] == (1, 2)


def test_per_batch_prefix_and_document_ids():
    p = P.prefix_lm(torch.tensor([2, 6]))
    m = p.dense(2, 1, 8, 8)
    for b, n in enumerate((2, 6)):
        assert torch.equal(m[b, 0], loop_mask(lambda i, j: j < n or j <= i, 8, 8))
    ids = P.document_ids(torch.tensor([0, 3, 3, 7], dtype=torch.int32))
    assert ids.tolist() == [0, 0, 0, 2, 2, 2, 2]


def test_random_blocks_are_seeded_and_counted():
    a = P.random_blocks(32, 40, 8, 2, seed=1, heads=3).dense(1, 3, 32, 40)
    b = P.random_blocks(32, 40, 8, 2, seed=1, heads=3).dense(1, 3, 32, 40)
    c = P.random_blocks(32, 40, 8, 2, seed=2, heads=3).dense(1, 3, 32, 40)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0, 0], a[0, 1])  # heads differ
    blocks = a[0, :, ::8, ::8]  # one element per (query block, key block)
    assert (blocks.sum(-1) == 2).all()
    bb = P.bigbird(32, 32, 8, 1, 1, 1, seed=4, heads=2)
    parts = (P.block_window(8, 1) | P.random_blocks(32, 32, 8, 1, 4, 2) | P.global_tokens(range(8)))
    assert torch.equal(bb.dense(1, 2, 32, 32), parts.dense(1, 2, 32, 32))


def test_draw_text_and_png(tmp_path):
    text = P.draw(P.causal(), 3, 4, path=str(tmp_path / "m.png"), pixel=2)
    assert text.splitlines()[1:] == ["#...", "##..", "###."]
    data = (tmp_path / "m.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (8, 6)
    idat = data.index(b"IDAT")
    raw = zlib.decompress(data[idat + 4: idat + 4 + struct.unpack(">I", data[idat - 4: idat])[0]])
    assert raw[1] == 0 and raw[-1] == 255  # top-left attends (black), bottom-right does not (white)


@pytest.mark.parametrize("pattern,size", [(P.sliding_window(5) & P.causal(), (37, 37)),
                                          (P.bigbird(45, 45, 8, seed=0, heads=2), (45, 45)),
                                          (P.causal().shifted(26), (19, 45))])
def test_block_mask_builder(pattern, size):
    H = 2
    bm = pattern.block_mask(1, H, *size, block=(16, 16))
    assert torch.equal(bm.to_dense().expand(1, H, *size), pattern.dense(1, H, *size))
    assert 0 < bm.density() <= 1


def test_errors():
    with pytest.raises(ValueError, match="left"):
        P.sliding_window(-1)
    with pytest.raises(ValueError, match="dilation"):
        P.dilated_window(2, 0)
    with pytest.raises(TypeError, match="stride"):
        P.strided(2.5)
    with pytest.raises(ValueError, match="positions"):
        P.global_tokens([-1])
    with pytest.raises(TypeError, match="mask function"):
        P.causal() & 3
    with pytest.raises(TypeError, match="doc_ids"):
        P.document([0, 0, 1])
    with pytest.raises(TypeError, match="grid"):
        P.neighborhood((4,), (3,))
    with pytest.raises(TypeError, match="kernel"):
        P.neighborhood((4, 4), (3, 3, 3))
    with pytest.raises(ValueError, match="fit"):
        P.neighborhood((4, 4), (5, 3))
    with pytest.raises(ValueError, match="window_tiles"):
        P.sliding_tile((4, 4), (2, 2), (3, 1))


@pytest.mark.parametrize("left,right,T,S", [(5, 0, 37, 37), (4, 3, 37, 37), (6, 0, 9, 40)],
                         ids=["causal", "two_sided", "bottom_right"])
def test_window_pattern_runs_the_kernel_window_path(left, right, T, S):
    """A plain sliding window skips the block mask (pattern.window): same output as the block-mask path
    and the float64 reference; a derived pattern does not keep the window."""
    from effattn.sparse.pattern_methods import pattern_attention, pattern_reference

    p = P.sliding_window(left, right)
    assert p.window == (left, right) and (p & P.causal()).window is None and p.shifted(2).window is None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) for n in (T, S, S))
    fast = pattern_attention(q, k, v, p)
    torch.testing.assert_close(fast, pattern_attention(q, k, v, p, block=(16, 16)), rtol=1e-5, atol=1e-5)
    ref = pattern_reference(*(t.double() for t in (q, k, v)), p)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", [P.sinks_recent(3, 6), P.a_shape(40, 5)], ids=lambda p: p.__name__)
def test_sinks_pattern_runs_the_kernel_window_path(pattern, monkeypatch):
    """StreamingLLM's sinks + recent window also skips the block mask (pattern.sinks): the same output as the
    block-mask path and the float64 reference, at T != S (bottom-right aligned)."""
    from effattn.sparse import pattern_methods
    from effattn.sparse.pattern_methods import pattern_attention, pattern_reference

    assert pattern.sinks > 0 and pattern.window[1] == 0 and (pattern | P.causal()).sinks == 0
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) for n in (70, 81, 81))
    calls = []
    real = pattern_methods.flash_attention
    monkeypatch.setattr(pattern_methods, "flash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    fast = pattern_attention(q, k, v, pattern)
    assert calls[0]["sink_tokens"] == pattern.sinks and calls[0].get("block_mask") is None
    torch.testing.assert_close(fast, pattern_attention(q, k, v, pattern, block=(16, 16)), rtol=1e-5, atol=1e-5)
    ref = pattern_reference(*(t.double() for t in (q, k, v)), pattern)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal,T,S", [(False, 45, 45), (True, 45, 45), (False, 30, 45)],
                         ids=["two_sided", "causal", "cross_blockmask"])
def test_longformer_prefix_globals_run_natively(causal, T, S, monkeypatch):
    """Longformer with global tokens at a prefix runs as window + sinks (+ the global rows over every key,
    split-KV, non-causal): no block mask; output and gradients equal the float64 reference. At T != S it
    keeps the block mask."""
    from effattn.sparse import pattern_methods
    from effattn.sparse.pattern_methods import longformer_pattern, pattern_attention, pattern_reference

    p = longformer_pattern(T, S, 2, window=4, global_tokens=(2, 0, 1), causal=causal)
    assert p.window == (4, 0 if causal else 4) and p.sinks == 3 and p.global_rows == (0 if causal else 3)
    assert longformer_pattern(T, S, 2, window=4, global_tokens=(0, 2)).window is None  # not a prefix
    calls, real, every = [], pattern_methods.flash_attention, pattern_methods._every_key
    monkeypatch.setattr(pattern_methods, "flash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(pattern_methods, "_every_key", lambda *a: every(*a, part_keys=8))  # 45 keys: 5 parts
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(2, n, 4, 16, generator=g, requires_grad=True) for n in (T, S, S)]
    fast = pattern_attention(x[0], x[1][:, :, :2], x[2][:, :, :2], p)  # GQA 4:2
    assert all(c.get("block_mask") is None for c in calls) == (T == S)
    if T == S and not causal:
        assert [c.get("return_lse", False) for c in calls] == [False, True]  # the band, the split-KV rows
    dout = torch.randn(fast.shape, generator=g)
    grads = torch.autograd.grad(fast, x, dout)
    x64 = [t.detach().double().requires_grad_() for t in x]
    ref = pattern_reference(x64[0], x64[1][:, :, :2], x64[2][:, :, :2], p)
    torch.testing.assert_close(fast.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, torch.autograd.grad(ref, x64, dout.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_every_key_covers_all_rows_global_and_rejects_causal_global_rows():
    from effattn.sparse.pattern_methods import longformer_pattern, pattern_attention, pattern_reference

    p = longformer_pattern(6, 6, 1, window=1, global_tokens=range(8))  # more globals than rows: dense
    q, k, v = (torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(3)) for _ in range(3))
    torch.testing.assert_close(pattern_attention(q, k, v, p).double(),
                               pattern_reference(q.double(), k.double(), v.double(), p), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"global_rows needs a non-causal window \(right > 0\), got window=\(3, 0\)"):
        P.Pattern(lambda b, h, q, kv: kv <= q, "x", window=(3, 0), global_rows=2)


@pytest.mark.parametrize("grid,tile", [((4, 6), (2, 3)), ((2, 4, 6), (1, 2, 3)), ((8, 8), (4, 8))], ids=str)
def test_tile_order(grid, tile):
    """Tile order: the grid's tiles in raster order, each one's tokens in raster order; the inverse undoes it."""
    N = math.prod(grid)
    x = torch.randn(2, N, 3, 5)
    y = P.to_tile_order(x, grid, tile)
    assert torch.equal(P.from_tile_order(y, grid, tile), x)
    order = P.tile_order(grid, tile)
    assert torch.equal(y, x[:, order])
    tiles = [tuple(c // t for c, t in zip(coords(int(i), grid), tile)) for i in order]
    assert tiles == sorted(tiles)  # tile by tile, tiles in raster order
    for a in range(0, N, math.prod(tile)):  # each tile's tokens in raster order, all in one tile
        assert order[a:a + math.prod(tile)].tolist() == sorted(order[a:a + math.prod(tile)].tolist())
        assert len(set(tiles[a:a + math.prod(tile)])) == 1
    with pytest.raises(ValueError, match="does not cut the grid"):
        P.neighborhood(grid, (1,) * len(grid)).in_tile_order(tuple(g + 1 for g in grid))


def test_grid_plan_takes_the_tile_order_that_visits_fewest_blocks():
    """NATTEN 2D over a 64 x 128 grid with a 13 x 13 kernel: raster order visits 20% of the 128 x 64 tiles,
    8 x 8 tiles 8%; with a 3 x 3 kernel over 32 x 32 raster order wins (23% against 47%)."""
    from effattn.sparse.pattern_methods import grid_plan

    tile, bm = grid_plan(P.neighborhood((64, 128), (13, 13)), 1, 4, 8192)
    assert tile == (8, 8) and bm.density() == pytest.approx(0.0806, abs=1e-3)
    tile, bm = grid_plan(P.neighborhood((32, 32), (3, 3)), 1, 4, 1024)
    assert tile is None and bm.density() == pytest.approx(0.2344, abs=1e-3)
    assert P.neighborhood((16, 20), (3, 3)).tiles == ((16, 4),)  # of (8, 8), (4, 16), (16, 4): those that cut it


@pytest.mark.parametrize("pattern", [P.neighborhood((16, 16), (5, 3)), P.neighborhood((4, 8, 8), (3, 3, 5)),
                                     P.sliding_tile((16, 16), (4, 8), (3, 1))], ids=lambda p: p.__name__)
def test_grid_pattern_in_tile_order_matches_the_reference(pattern, monkeypatch):
    """A grid pattern run in tile order (TILE_ORDER_GAIN 0: the best tile is always taken): output and the
    gradients of q, k, v equal the float64 reference in raster order; GQA, every output poisoned."""
    from effattn.sparse import pattern_methods
    from effattn.sparse.pattern_methods import pattern_attention, pattern_reference
    from effattn.testing import poisoned_outputs

    monkeypatch.setattr(pattern_methods, "TILE_ORDER_GAIN", 0.0)
    monkeypatch.setattr(pattern_methods, "_GRID_PLANS", {})
    N = math.prod(pattern.grid)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, N, 4, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, N, 2, 16, generator=g, requires_grad=True) for _ in range(2))
    do = torch.randn(1, N, 4, 16, generator=g)
    with poisoned_outputs():
        o = pattern_attention(q, k, v, pattern, block=(32, 16))
        o.backward(do)
    tile = pattern_methods.grid_plan(pattern, 1, 4, N, (32, 16))[0]
    assert tile is not None
    x = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = pattern_reference(*x, pattern)
    ref.backward(do.double())
    torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-4)
    for a, b in zip((q, k, v), x):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)


def test_registered_methods_keep_their_block_masks(monkeypatch):
    """A registered pattern method builds its pattern and block mask once per shapes and options (a build
    evaluates the mask over T x S), then reuses them: fresh inputs, same outputs as a fresh build."""
    from effattn.sparse import pattern_methods, patterns

    builds = []
    real = patterns.block_mask
    monkeypatch.setattr(patterns, "block_mask", lambda *a, **kw: builds.append(a[1:5]) or real(*a, **kw))
    monkeypatch.setattr(pattern_methods, "_PATTERNS", {})
    fn = pattern_methods.FUNCTIONS["bigbird"][0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    opts = dict(block_size=8, random_blocks=1, seed=3)
    first = fn(q, k, v, **opts)
    assert fn(q, k, v, **opts).equal(first) and len(builds) == 1
    fn(q, k[:, :32], v[:, :32], **opts)  # T != S: the shifted pattern keeps its own
    fn(q, k[:, :32], v[:, :32], **opts)
    fn(q, k, v, **dict(opts, seed=4))  # other options: another pattern
    assert len(builds) == 3
    fresh = pattern_methods.pattern_attention(q, k, v, pattern_methods.bigbird_pattern(40, 40, 2, **opts))
    assert fresh.equal(first)
