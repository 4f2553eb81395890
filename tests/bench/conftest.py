import io

import pytest

from effattn.bench.config import BenchConfig


def tiny_config(**overrides) -> BenchConfig:
    """The smallest run that still goes through every code path: single timed calls, no warm-up blocks."""
    cfg = BenchConfig(device="cpu", seq_lens=(16,), heads=2, head_dim=16, min_run_time=0.0, min_samples=1,
                      time_limit=60.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """One run through every registered method and form, every mode, with the CPU anchors; shared by the
    report, schema, HTML and advise tests."""
    from effattn.bench import run_bench

    out = tmp_path_factory.mktemp("bench-smoke")
    log = io.StringIO()
    data = run_bench(tiny_config(), out, command="pytest smoke", stream=log)
    return data, out, log.getvalue()
