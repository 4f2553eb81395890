"""The method registry: one `Method` record per attention method of the survey.

Tests, `effattn check`, `effattn list` and `effattn bench` iterate over `REGISTRY`, so a method added
here is checked and benchmarked without touching any of them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

FAMILIES = ("baseline", "hardware", "compact", "sparse", "linear")
SUPPORT_FLAGS = frozenset({"causal", "noncausal", "backward", "gqa", "varlen", "decode", "state"})


@dataclass(frozen=True)
class Shape:
    """Problem size used to draw inputs: q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`."""

    batch: int = 2
    seq_q: int = 37
    seq_k: int | None = None
    heads: int = 4
    kv_heads: int | None = None
    head_dim: int = 32
    head_dim_v: int | None = None

    @property
    def S(self) -> int:
        return self.seq_q if self.seq_k is None else self.seq_k

    @property
    def Hkv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def Dv(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v


@dataclass(frozen=True)
class Complexity:
    """Asymptotic cost as the survey states it, for sequence length N, head dim d, chunk C, window w."""

    time: str
    memory: str
    time_exponent: float  # expected slope of log(time) vs log(N) at fixed everything else
    memory_exponent: float


@dataclass(frozen=True)
class StateOrCache:
    """What a method keeps between decoding steps.

    `per_token=True`: a KV cache growing by `elements(shape)` numbers per token (all heads of one layer).
    `per_token=False`: a constant-size recurrent state of `elements(shape)` numbers per sequence.
    """

    formula: str
    per_token: bool
    elements: Callable[[Shape], int]

    def bytes(self, shape: Shape, bytes_per_element: int = 2) -> int:
        return self.elements(shape) * bytes_per_element

    def describe(self) -> str:
        return f"{self.formula} /token" if self.per_token else f"{self.formula} (fixed)"


# Record pieces many methods share.
KV_CACHE = StateOrCache("2 Hkv d", True, lambda s: 2 * s.Hkv * s.head_dim)  # every token's K and V, all heads
MATRIX_STATE = StateOrCache("H d_k d_v", False, lambda s: s.heads * s.head_dim * s.Dv)  # one S per head
CHUNKWISE = Complexity("O(N C d + N d^2)", "O(N d + N/C d^2)", 1.0, 1.0)  # the linear engine's chunk form

InputMaker = Callable[..., dict]


@dataclass(frozen=True)
class Method:
    """One registered method.

    fn(**inputs, **options) is the fast path; reference(**inputs, **options) is the readable float64
    ground truth with the same signature (options a reference does not need are accepted and ignored).
    `make_inputs(shape, dtype, device, generator)` draws a valid input dict (tensors and options) for
    `fn`/`reference`; `grad_inputs` names the tensors that get gradients in training. `params(shape,
    d_model)`, where known, counts the attention layer's parameters at model width d_model (Table 3).
    """

    name: str
    family: str
    cite: str
    fn: Callable[..., Any]
    reference: Callable[..., Any]
    make_inputs: InputMaker
    complexity: Complexity
    state_or_cache: StateOrCache
    forms: tuple[str, ...] = ("default",)
    options: Mapping[str, Any] = field(default_factory=dict)
    supports: frozenset[str] = frozenset()
    grad_inputs: tuple[str, ...] = ("q", "k", "v")
    approximates_softmax: bool = False
    description: str = ""
    params: Callable[[Shape, int], int] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Method {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        unknown = set(self.supports) - SUPPORT_FLAGS
        if unknown:
            raise ValueError(f"Method {self.name!r}: unknown supports flags {sorted(unknown)}")
        if len(self.forms) > 1 and "form" not in self.options:
            raise ValueError(f"Method {self.name!r} has several forms but no 'form' option")

    @property
    def trains(self) -> bool:
        return "backward" in self.supports


class Registry:
    """An ordered name -> Method map with helpful lookup errors."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def add(self, method: Method) -> Method:
        if method.name in self._methods:
            raise ValueError(f"method {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def get(self, name: str) -> Method:
        if not isinstance(name, str):
            raise TypeError(f"method must be a str naming a registered method, got {type(name).__name__}")
        try:
            return self._methods[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._methods), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"unknown method {name!r}{hint} (known: {', '.join(sorted(self._methods))})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(list(self._methods.values()))

    def __len__(self) -> int:
        return len(self._methods)

    def names(self) -> list[str]:
        return list(self._methods)


REGISTRY = Registry()


def register(method: Method) -> Method:
    """Add `method` to the global registry (called once per method, at import of its module)."""
    return REGISTRY.add(method)


def methods(family: str | None = None) -> list[Method]:
    """All registered methods, optionally only those of one survey class."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return [m for m in REGISTRY if family is None or m.family == family]
