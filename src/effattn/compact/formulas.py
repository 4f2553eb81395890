"""KV cache per token and attention parameters of the compact methods: the survey's Table 3 as functions.

Notation of the survey (Sec. 5): model width Dm, h query heads of dim d, hkv key/value heads (GQA),
MLA ranks r_q, r_kv with decoupled RoPE dim d_R and NoPE dim d_N (value heads of dim d), TPA ranks
r_q, r_k, r_v. Cache sizes count numbers stored per token per layer; parameters count every weight of the
attention layer (no biases, no norms: the table leaves MLA's latent RMSNorm gains out, and so do our layers).

Registry records get their per-method dims from a `Shape` (heads, kv_heads, head_dim) through the
`*_dims` functions below, with the ratios of the papers' reference models: DeepSeek-V2 for MLA
(d_N = d, d_R = d / 2, r_kv = 4 d, r_q = 12 d; 128 / 64 / 512 / 1536 at d = 128) and T6 for TPA
(r_q = 6, r_k = r_v = 2). The layers take the same dims, so a layer built from `mla_dims(shape)` holds
exactly `mla_cache(...)` numbers per token and `mla_params(...)` weights (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Shape


# --- per-method dims derived from a Shape ---------------------------------------------------------------

@dataclass(frozen=True)
class MLADims:
    q_rank: int  # r_q
    kv_rank: int  # r_kv
    d_nope: int  # d_N
    d_rope: int  # d_R
    d_v: int  # value head dim d


@dataclass(frozen=True)
class TPADims:
    q_rank: int
    k_rank: int
    v_rank: int


def mla_dims(shape: Shape) -> MLADims:
    d = shape.head_dim
    return MLADims(q_rank=12 * d, kv_rank=4 * d, d_nope=d, d_rope=max(2, (d // 2) // 2 * 2), d_v=shape.Dv)


def tpa_dims(shape: Shape) -> TPADims:
    return TPADims(q_rank=6, k_rank=2, v_rank=2)


def gqa_kv_heads(shape: Shape) -> int:
    """GQA's group count: the shape's kv_heads when given, else half the query heads."""
    return shape.Hkv if shape.kv_heads is not None else max(1, shape.heads // 2)


# --- Table 3, KV cache numbers per token (one layer) ------------------------------------------------------

def mha_cache(h: int, d: int) -> int:
    return 2 * h * d


def gqa_cache(h_kv: int, d: int) -> int:
    return 2 * h_kv * d


def mqa_cache(d: int) -> int:
    return 2 * d


def mla_cache(kv_rank: int, d_rope: int) -> int:
    return kv_rank + d_rope


def mfa_cache(d: int) -> int:
    return 2 * d


def tpa_cache(k_rank: int, v_rank: int, h: int, d: int) -> int:
    return (k_rank + v_rank) * (h + d)


# --- Table 3, attention parameters -----------------------------------------------------------------------

def mha_params(d_model: int, h: int, d: int) -> int:
    return 4 * d_model * h * d


def gqa_params(d_model: int, h: int, h_kv: int, d: int) -> int:
    return 2 * d_model * h * d + 2 * d_model * h_kv * d


def mqa_params(d_model: int, h: int, d: int) -> int:
    return 2 * d_model * h * d + 2 * d_model * d


def mla_params(d_model: int, h: int, dims: MLADims) -> int:
    r_q, r_kv, d_n, d_r, d = dims.q_rank, dims.kv_rank, dims.d_nope, dims.d_rope, dims.d_v
    return d_model * (r_q + r_kv + d_r + h * d) + r_q * h * (d_n + d_r) + r_kv * h * (d_n + d)


def mfa_params(d_model: int, h: int, d: int) -> int:
    return d_model * (3 * d + h * d) + h * d * d


def tpa_params(d_model: int, h: int, d: int, dims: TPADims) -> int:
    return d_model * (dims.q_rank + dims.k_rank + dims.v_rank) * (h + d) + d_model * h * d


# --- the same, as functions of a Shape (what the registry records hold) ----------------------------------

CACHE = {
    "mha": ("2 h d", lambda s: mha_cache(s.heads, s.head_dim)),
    "gqa": ("2 hkv d", lambda s: gqa_cache(gqa_kv_heads(s), s.head_dim)),
    "mqa": ("2 d", lambda s: mqa_cache(s.head_dim)),
    "mla": ("r_kv + d_R", lambda s: mla_cache(mla_dims(s).kv_rank, mla_dims(s).d_rope)),
    "mfa": ("2 d", lambda s: mfa_cache(s.head_dim)),
    "tpa": ("(r_k + r_v)(h + d)", lambda s: tpa_cache(tpa_dims(s).k_rank, tpa_dims(s).v_rank, s.heads, s.head_dim)),
}

PARAMS = {
    "mha": lambda s, dm: mha_params(dm, s.heads, s.head_dim),
    "gqa": lambda s, dm: gqa_params(dm, s.heads, gqa_kv_heads(s), s.head_dim),
    "mqa": lambda s, dm: mqa_params(dm, s.heads, s.head_dim),
    "mla": lambda s, dm: mla_params(dm, s.heads, mla_dims(s)),
    "mfa": lambda s, dm: mfa_params(dm, s.heads, s.head_dim),
    "tpa": lambda s, dm: tpa_params(dm, s.heads, s.head_dim, tpa_dims(s)),
}


def state_or_cache(name: str):
    """The registry's StateOrCache for compact method `name` (numbers per token per layer)."""
    from ..registry import StateOrCache

    formula, elements = CACHE[name]
    return StateOrCache(formula, True, elements)


SEVEN_B = Shape(batch=1, seq_q=1, heads=32, kv_heads=8, head_dim=128)  # d_model 4096: a LLaMA-2-7B-like layer


def comparison_table(shape: Shape = SEVEN_B, d_model: int = 4096, bytes_per_element: int = 2) -> str:
    """Markdown table of every compact record's KV cache per token and attention parameters at `shape`
    (the README's table)."""
    from ..registry import REGISTRY

    mha = REGISTRY.get("mha").state_or_cache.elements(shape)
    lines = ["| method | KV cache / token / layer | numbers | bytes (16-bit) | MHA cache / this | attention params |",
             "|---|---|---|---|---|---|"]
    for m in REGISTRY:
        if m.family == "compact" and m.params is not None:
            n = m.state_or_cache.elements(shape)
            lines.append(f"| {m.name} | {m.state_or_cache.formula} | {n:,} | {n * bytes_per_element:,} | "
                         f"{mha / n:.1f} | {m.params(shape, d_model) / 1e6:.1f}M |")
    return "\n".join(lines)

