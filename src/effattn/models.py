"""`TinyLM`: a small decoder-only language model whose token mixer is any layer or registered method.

    h = embed(tokens)
    for each block:  h = h + mixer(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    logits = RMSNorm(h) @ embed.weight^T          (tied head)

Used by the quality harness (`effattn.quality`) and for generation. The mixer is built by
`effattn.nn.make_mixer(method, dim, heads, **options)`, so a newly registered method is a valid `method`.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import RMSNorm, SwiGLU, make_mixer
from .validate import check_positive_int, check_tensor


class Block(nn.Module):
    """Pre-norm residual block: token mixer then MLP."""

    def __init__(self, dim: int, heads: int, method: str | None, mlp_ratio: int, **options) -> None:
        super().__init__()
        self.mix_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.mixer = make_mixer(method, dim, heads, **options)
        self.mlp = SwiGLU(dim, mlp_ratio * dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.mix_norm(h))
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, dict]:
        y, cache = self.mixer.step(self.mix_norm(h), cache)
        h = h + y
        return h + self.mlp(self.mlp_norm(h)), cache


class TinyLM(nn.Module):
    """Decoder-only LM: vocab, width `dim`, `layers` blocks of (method, heads) mixers, tied embeddings.

    `forward(tokens)`: tokens `[B, T]` (int64) -> logits `[B, T, vocab]`. `hidden(tokens)` stops before the
    head (the harness projects only supervised positions). `generate(prompt, max_new_tokens)` decodes with
    the mixers' `step` caches. `options` go to every mixer (e.g. `window=...`, `head_dim=...`).
    """

    def __init__(self, vocab: int, dim: int, layers: int, method: str | None = None, *, heads: int = 2,
                 mlp_ratio: int = 2, **options) -> None:
        super().__init__()
        self.vocab = check_positive_int("vocab", vocab)
        check_positive_int("layers", layers)
        check_positive_int("mlp_ratio", mlp_ratio)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, method, mlp_ratio, **options) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _check_tokens(self, tokens) -> torch.Tensor:
        check_tensor("tokens", tokens, ndim=2, dtypes=(torch.int64, torch.int32), layout="[B, T]")
        if tokens.numel():
            low, high = (int(x) for x in torch.aminmax(tokens))  # one read-back from the device, not two
            if low < 0 or high >= self.vocab:
                raise ValueError(f"tokens must lie in [0, {self.vocab}), got range [{low}, {high}]")
        return tokens

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states `[B, T, dim]`."""
        h = self.embed(self._check_tokens(tokens))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.embed.weight.t()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(tokens))

    def step(self, tokens: torch.Tensor, caches: list | None = None) -> tuple[torch.Tensor, list]:
        """Continue the sequences in `caches` by tokens `[B, T]`; returns (logits `[B, T, vocab]`, caches)."""
        h = self.embed(self._check_tokens(tokens))
        caches = [None] * len(self.blocks) if caches is None else caches
        new = []
        for block, cache in zip(self.blocks, caches):
            h, cache = block.step(h, cache)
            new.append(cache)
        return self.logits(self.norm(h)), new

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` to prompt `[B, T]`: greedy when temperature == 0, else sampled.
        The prompt is prefilled in one chunk, then one token per step through the caches."""
        check_positive_int("max_new_tokens", max_new_tokens, minimum=0)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        logits, caches = self.step(prompt)
        out = [prompt]
        for i in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            out.append(nxt.to(prompt.dtype))
            if i + 1 < max_new_tokens:
                logits, caches = self.step(out[-1], caches)
        return torch.cat(out, dim=1)

    def cache_elements(self, tokens: torch.Tensor) -> int:
        """Numbers kept per sequence (all layers) after reading tokens `[1, T]`: the KV cache or the state."""
        with torch.no_grad():
            _, caches = self.step(tokens)
        return sum(t[0].numel() for c in caches for t in c.values() if isinstance(t, torch.Tensor))  # batch row 0
