"""Table 3 of the survey: KV cache per token and parameters, as the registry states them and as the layers
really hold them."""
import pytest
import torch

from effattn.compact import build_layer
from effattn.compact.build import LAYERS
from effattn.registry import REGISTRY, Shape

D_MODEL = 4096
SEVEN_B = Shape(batch=1, seq_q=1, heads=32, kv_heads=8, head_dim=128)

# Table 3 evaluated by hand at Dm = 4096, h = 32, d = 128, hkv = 8; MLA r_q = 1536, r_kv = 512, d_N = 128,
# d_R = 64 (DeepSeek-V2); TPA r_q = 6, r_k = r_v = 2 (T6).
TABLE3_7B = {
    "mha": (2 * 32 * 128, 4 * 4096 * 32 * 128),
    "gqa": (2 * 8 * 128, 2 * 4096 * 32 * 128 + 2 * 4096 * 8 * 128),
    "mqa": (2 * 128, 2 * 4096 * 32 * 128 + 2 * 4096 * 128),
    "mla": (512 + 64, 4096 * (1536 + 512 + 64 + 32 * 128) + 1536 * 32 * (128 + 64) + 512 * 32 * (128 + 128)),
    "mfa": (2 * 128, 4096 * (3 * 128 + 32 * 128) + 32 * 128 * 128),
    "tpa": ((2 + 2) * (32 + 128), 4096 * (6 + 2 + 2) * (32 + 128) + 4096 * 32 * 128),
}


@pytest.mark.parametrize("name", LAYERS)
def test_registry_formulas_match_table3(name):
    cache, params = TABLE3_7B[name]
    record = REGISTRY.get(name)
    assert record.family == "compact"
    assert record.state_or_cache.per_token
    assert record.state_or_cache.elements(SEVEN_B) == cache
    assert record.params(SEVEN_B, D_MODEL) == params


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape,d_model", [(SEVEN_B, D_MODEL), (Shape(heads=6, kv_heads=3, head_dim=20), 72)],
                         ids=["7B", "small"])
def test_layers_hold_what_the_registry_claims(name, shape, d_model):
    """Parameters counted on the layer and bytes held by its cache equal the record's formulas (meta device:
    nothing is allocated)."""
    record = REGISTRY.get(name)
    layer = build_layer(name, shape, d_model, device="meta")
    assert sum(p.numel() for p in layer.parameters()) == record.params(shape, d_model)
    cache = layer.new_cache(batch=2, capacity=7, dtype=torch.bfloat16)
    assert cache.nbytes == 2 * 7 * record.state_or_cache.bytes(shape, bytes_per_element=2)


def test_compact_records_shrink_the_cache():
    sizes = {n: REGISTRY.get(n).state_or_cache.elements(SEVEN_B) for n in LAYERS}
    assert sizes["mha"] > sizes["gqa"] > sizes["tpa"] > sizes["mla"] > sizes["mqa"] == sizes["mfa"]


def test_readme_table_is_generated_from_the_registry():
    from pathlib import Path

    from effattn.compact.formulas import comparison_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert comparison_table(SEVEN_B, D_MODEL) in readme


def test_benchmark_runs_quick(tmp_path):
    """benchmarks/compact.py --quick: tiny CPU run, every decode step checked against the reference path."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compact.py"
    spec = importlib.util.spec_from_file_location("compact_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--contexts", "40", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compact_decode.json").read_text())["rows"]
    assert len(rows) == 7 and all(r["tokens_per_s"] > 0 and r["rel_err_vs_reference"] < 1e-4 for r in rows)
    assert (tmp_path / "compact_decode.md").read_text().startswith("# Compact attention decode")
