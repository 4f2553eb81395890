"""Greedy generation with every KV cache, and how far each one drifts from exact decoding.

`TinyDecoder` is a small decoder-only transformer (pre-norm, GQA attention with RoPE, GELU MLP; random
init is enough to compare caches). Prefill runs `effattn.attention(..., causal=True)` and fills the cache;
every later token runs `effattn.decode` against it. The exact reference recomputes the whole sequence
without a cache at every step. `compare_with_exact` reports, per cache, the free-running token agreement
and, teacher-forced on the exact tokens, the largest logit error and the top-1 agreement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..api import attention
from ..hardware.decode_api import decode
from ..nn.rotary import RotaryEmbedding
from .contiguous import ContiguousKVCache
from .eviction import H2O, StreamingLLM
from .paged import PagedKVCache
from .quantized import int8_cache, kivi_cache, kvquant_cache


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 97
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mlp: int = 128


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.q = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp), nn.GELU(), nn.Linear(cfg.mlp, cfg.dim))
        self.rope = RotaryEmbedding(cfg.head_dim)

    def forward(self, x: torch.Tensor, pos: int, cache=None, policy=None) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.cfg
        h = self.norm1(x)
        q = self.rope(self.q(h).view(B, T, c.heads, c.head_dim), pos)
        k_pre, v = self.kv(h).view(B, T, 2, c.kv_heads, c.head_dim).unbind(2)
        k_pre, v = k_pre.contiguous(), v.contiguous()
        k = self.rope(k_pre, pos)
        if cache is None or T > 1:  # exact attention over the T new tokens (no cache, or prefill)
            a = attention(q, k, v, causal=True)
        if cache is not None:
            cache.append(k_pre if getattr(cache, "pre_rope", False) else k, v)  # KVQuant rotates in-kernel
            if T == 1:
                a = decode(q, cache)
            if policy is not None:
                policy.observe(q, cache)
                policy.evict(cache)
        x = x + self.o(a.reshape(B, T, -1))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyConfig = TinyConfig(), seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(cfg.vocab, cfg.dim)
            self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
            self.norm = nn.RMSNorm(cfg.dim)
            self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, pos: int = 0, caches=None, policies=None) -> torch.Tensor:
        """tokens `[B, T]` at positions pos .. pos + T - 1 -> logits `[B, T, vocab]`; with `caches` (one
        per layer) the earlier tokens come from the caches."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, None if caches is None else caches[i], None if policies is None else policies[i])
        return self.head(self.norm(x))


CACHE_KINDS = ("contiguous", "paged", "kivi4", "kivi2", "kvquant", "int8", "streaming_llm", "h2o")


def make_caches(kind: str, model: TinyDecoder, batch: int, max_len: int, *, device="cpu", dtype=torch.float32,
                budget: int = 16):
    """One cache per layer of `model` (and one eviction policy per layer for the evicting kinds)."""
    c = model.cfg
    args = (batch, max_len, c.kv_heads, c.head_dim)
    kw = dict(dtype=dtype, device=device)

    def one():
        if kind in ("contiguous", "streaming_llm", "h2o"):
            return ContiguousKVCache(*args, **kw)
        if kind == "paged":
            cache = PagedKVCache(batch * -(-max_len // 8), 8, c.kv_heads, c.head_dim, **kw)
            for _ in range(batch):
                cache.add_sequence()
            return cache
        if kind in ("kivi4", "kivi2"):
            return kivi_cache(*args, bits=int(kind[-1]), group=8, residual=8, **kw)
        if kind == "kvquant":
            return kvquant_cache(*args, bits=4, group=8, outliers=1, residual=8, **kw)
        if kind == "int8":
            return int8_cache(*args, **kw)
        raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind!r}")

    caches = [one() for _ in range(c.layers)]
    policies = None
    if kind == "streaming_llm":
        policies = [StreamingLLM(sinks=4, recent=budget - 4) for _ in range(c.layers)]
    elif kind == "h2o":
        policies = [H2O(heavy=budget // 2, recent=budget - budget // 2) for _ in range(c.layers)]
    return caches, policies


@torch.no_grad()
def generate(model: TinyDecoder, prompt: torch.Tensor, steps: int, kind: str | None = "contiguous",
             force: torch.Tensor | None = None, **cache_kw):
    """Greedy decoding of `steps` tokens after prompt `[B, T0]`. kind None: exact (no cache, full recompute
    each step). `force` `[B, steps]`: feed these tokens instead of the argmax (teacher forcing).
    Returns (tokens `[B, steps]`, logits `[B, steps, vocab]`)."""
    B, T0 = prompt.shape
    seq = prompt
    if kind is None:
        logits = []
        for i in range(steps):
            step = model(seq)[:, -1]
            logits.append(step)
            nxt = step.argmax(-1) if force is None else force[:, i]
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return seq[:, T0:], torch.stack(logits, 1)
    caches, policies = make_caches(kind, model, B, T0 + steps, device=prompt.device, **cache_kw)
    step = model(prompt, 0, caches, policies)[:, -1]
    logits, out = [step], []
    for i in range(steps):
        nxt = step.argmax(-1) if force is None else force[:, i]
        out.append(nxt)
        if i + 1 < steps:
            step = model(nxt[:, None], T0 + i, caches, policies)[:, -1]
            logits.append(step)
    return torch.stack(out, 1), torch.stack(logits, 1)


def compare_with_exact(model: TinyDecoder, prompt: torch.Tensor, steps: int, kinds=CACHE_KINDS, **cache_kw) -> dict:
    """Per cache kind: free-running greedy tokens vs exact decoding (`token_agreement`, `first_mismatch`
    or None) and, teacher-forced on the exact tokens, `max_logit_error` and `top1_agreement`."""
    exact, exact_logits = generate(model, prompt, steps, kind=None)
    report = {}
    for kind in kinds:
        tokens, _ = generate(model, prompt, steps, kind, **cache_kw)
        _, forced = generate(model, prompt, steps, kind, force=exact, **cache_kw)
        same = tokens == exact
        mismatch = (~same).any(0).nonzero()
        report[kind] = {"tokens": tokens, "token_agreement": float(same.float().mean()),
                        "first_mismatch": int(mismatch[0]) if len(mismatch) else None,
                        "max_logit_error": float((forced - exact_logits).abs().max()),
                        "top1_agreement": float((forced.argmax(-1) == exact_logits.argmax(-1)).float().mean())}
    report["exact"] = {"tokens": exact}
    return report
