"""benchmarks/sparse.py --isolate: each pattern row timed in a process of its own, the rows gathered as the
in-process sweep gathers them (CPU smoke sizes, Triton interpreter)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse.py"


def test_isolated_pattern_rows(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "patterns", "--patterns", "bigbird",
                          "longformer", "--isolate", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "sparse_patterns.json").read_text())["patterns"]
    assert [r["method"] for r in rows] == ["longformer", "bigbird"]  # the registry's order, one row each
    assert len({r["pid"] for r in rows}) == 2  # timed in two processes
    for r in rows:
        assert r["N"] == 128 and r["fwd_ms"] > 0 and r["max_abs_diff_vs_flex"] < 1e-4, r
        assert set(r["by_block"]) >= {"16x16", "16x32"}, r
        assert len(r["flex_fwd_rounds_ms"]) == 2 and r["flex_fwd_ms"] == min(r["flex_fwd_rounds_ms"]), r


def test_flex_block_mask_in_head_chunks():
    """The head-chunked FlexAttention BlockMask (one head per create_block_mask call here) equals the one-call
    mask of a per-head pattern: same tiles, same partial / full split, same dense mask."""
    import importlib.util

    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import effattn.sparse as sp
    spec = importlib.util.spec_from_file_location("sparse_bench", SCRIPT)
    bench = sys.modules["sparse_bench"] = importlib.util.module_from_spec(spec)  # (its dataclass looks it up)
    spec.loader.exec_module(bench)
    N, H = 1200, 3  # ten 128-token blocks (Flex's tiles), the last one partial
    pattern = sp.patterns.bigbird(N, N, block=128, n_random=2, seed=5, heads=H)
    assert pattern.per_head
    whole = create_block_mask(pattern, None, H, N, N, device="cpu")
    chunked = bench.flex_block_mask(pattern, H, N, "cpu", max_bytes=8 * N * N)  # one head per call
    assert chunked.kv_num_blocks.shape == whole.kv_num_blocks.shape == (1, H, 10)
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert torch.equal(chunked.to_dense(), whole.to_dense())
    assert torch.equal(chunked.to_dense(), bench.flex_block_mask(pattern, H, N, "cpu").to_dense())
    heads = torch.stack([chunked.to_dense()[0, h] for h in range(H)])
    assert not torch.equal(heads[0], heads[1])  # the heads' random blocks differ: the offsets reached the mask_mod
