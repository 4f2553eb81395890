"""The benchmark harness behind `effattn bench` and `effattn advise`.

It iterates the registry like a user would (records' `make_inputs`, `effattn.attention`), measures every
method beside the anchors (SDPA backends, FlexAttention, flash-attn, FLA, SageAttention) on the same inputs,
fits the complexity slopes and writes results.json plus terminal, Markdown and HTML reports.
"""
from .advise import advise
from .config import BenchConfig, default_config
from .fit import fit_records, slope
from .harness import run_bench
from .report import write_reports
from .results import load, validate

__all__ = ["BenchConfig", "default_config", "run_bench", "write_reports", "load", "validate", "advise",
           "fit_records", "slope"]
