import pytest

from effattn.bench.config import BenchConfig


def tiny_config(**overrides) -> BenchConfig:
    """The smallest run that still goes through every code path: single timed calls, no warm-up blocks."""
    cfg = BenchConfig(device="cpu", seq_lens=(16,), heads=1, head_dim=16, min_run_time=0.0, min_samples=1,
                      time_limit=60.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny():
    return tiny_config
