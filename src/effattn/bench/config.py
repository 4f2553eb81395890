"""What one benchmark run measures: sizes, modes, limits, and the plan of cells.

A cell is one (subject, form, mode, N) measurement, where a subject is a registered method or an anchor.
Defaults differ by device: on the CPU, tiny sizes that finish for every registered method in a few
minutes on 2 cores (some run Triton kernels through its interpreter); on CUDA, the sizes of ANCHORS.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MODES = ("fwd", "fwdbwd", "decode")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# ANCHORS.md: H=16, D=128, bf16, N from 1k to 64k with B*N = 16k tokens while N <= 16k.
CUDA_SEQ_LENS = (1024, 4096, 16384, 65536)
CUDA_TOKENS = 16384
CPU_SEQ_LENS = (64, 128, 256)
QUICK_SEQ_LENS = (32, 64)


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: str = "float32"
    seq_lens: tuple[int, ...] = CPU_SEQ_LENS
    batch: int | None = 1  # None: B = max(1, tokens // N) (ANCHORS.md's schedule)
    tokens: int = CUDA_TOKENS
    heads: int = 2
    head_dim: int = 32
    modes: tuple[str, ...] = MODES
    methods: tuple[str, ...] | None = None  # None: every registered method
    anchors: str = "auto"  # auto | none | comma-separated anchor names
    time_limit: float = 10.0  # seconds per cell (warm-up, timing, memory, accuracy)
    min_run_time: float = 0.05  # seconds of timed calls per cell on the CPU (torch.utils.benchmark)
    min_samples: int = 5  # timed samples at least (CPU), while they fit in `sample_seconds`
    sample_seconds: float = 1.0
    # seconds for the whole run; cells left when it is used up are recorded and `--resume` runs them.
    # CUDA: 420 s (+ one cell of at most time_limit) keeps a call inside a 10-minute job; --budget 0 lifts it.
    budget: float | None = 240.0
    warmup_ms: float = 25.0  # triton.testing.do_bench on CUDA
    rep_ms: float = 100.0
    seed: int = 0
    threads: int | None = 1  # torch CPU threads: 1 keeps tiny sizes stable on a shared machine; None: torch's
    compile_jobs: int = 0  # worker processes compiling every cell's kernels before the timed run (warm.py); 0: none
    # time the token-by-token "recurrent" form of a method that has another form in fwd and fwdbwd too (quick
    # runs: only in decode, the one step it exists for; a PyTorch step loop took 0.15-0.8 s a call at N = 1024 on
    # the H100, benchmarks/results/bench_h100_2026-12-07)
    step_forms_in_prefill: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def batch_for(self, n: int) -> int:
        return self.batch if self.batch is not None else max(1, self.tokens // n)

    def to_json(self) -> dict:
        d = asdict(self)
        d["seq_lens"], d["modes"] = list(self.seq_lens), list(self.modes)
        d["methods"] = None if self.methods is None else list(self.methods)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "BenchConfig":
        d = dict(d)
        d["seq_lens"], d["modes"] = tuple(d["seq_lens"]), tuple(d["modes"])
        if d.get("methods") is not None:
            d["methods"] = tuple(d["methods"])
        return cls(**d)


def default_config(device: str, quick: bool = False, **overrides) -> BenchConfig:
    """The defaults for `device`, then every override that is not None."""
    from .warm import default_jobs

    if device == "cuda":
        cfg = BenchConfig(device="cuda", dtype="bfloat16", seq_lens=CUDA_SEQ_LENS, batch=None, heads=16,
                          head_dim=128, time_limit=180.0, threads=None, budget=420.0,
                          compile_jobs=default_jobs("cuda"))
        if quick:
            cfg.seq_lens = (1024, 4096)
    else:
        cfg = BenchConfig()
        if quick:
            cfg.seq_lens, cfg.heads, cfg.head_dim, cfg.budget = QUICK_SEQ_LENS, 1, 16, 120.0
            cfg.min_run_time = 0.02
    cfg.step_forms_in_prefill = not quick
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(cfg, key):
                raise TypeError(f"unknown bench setting {key!r}")
            setattr(cfg, key, value)
    validate_config(cfg)
    return cfg


def validate_config(cfg: BenchConfig) -> None:
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if not cfg.seq_lens or any(not isinstance(n, int) or n < 2 for n in cfg.seq_lens):
        raise ValueError(f"seq_lens must be integers >= 2, got {cfg.seq_lens!r}")
    for name in ("heads", "head_dim", "tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.compile_jobs < 0:
        raise ValueError(f"compile_jobs must be >= 0, got {cfg.compile_jobs}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    if cfg.batch is not None and cfg.batch < 1:
        raise ValueError(f"batch must be >= 1, got {cfg.batch}")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {cfg.modes!r}")
    if cfg.budget is not None and cfg.budget <= 0:
        cfg.budget = None  # --budget 0: no limit
    if cfg.time_limit <= 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {cfg.time_limit}")
    cfg.seq_lens = tuple(sorted(set(cfg.seq_lens)))


@dataclass(frozen=True)
class Cell:
    kind: str  # "method" or "anchor"
    name: str
    form: str
    mode: str
    n: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}:{self.form}:{self.mode}:{self.n}"

    @property
    def label(self) -> str:
        return self.name if self.form == "default" else f"{self.name}[{self.form}]"
