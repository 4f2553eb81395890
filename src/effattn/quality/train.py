"""One training recipe for every method: AdamW, linear warm-up then cosine decay, fresh data each step.

The loss and the accuracy look only at supervised positions (targets != -100), and the head is applied
only there, so a large vocabulary (MQAR's 8k) costs little.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..models import TinyLM
from .tasks import IGNORE

Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    steps: int = 400
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 40
    grad_clip: float = 1.0
    time_limit_s: float | None = None  # stop early (recorded) when a run would blow the budget


class Progress:
    """A one-line text progress bar on stderr (no dependency): `label [#####.....] 50/100 3.2s loss 1.23`."""

    def __init__(self, total: int, label: str, stream=None, width: int = 24) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = sys.stderr if stream is None else stream
        self.start, self.last = time.perf_counter(), -1.0

    def update(self, done: int, note="", force: bool = False) -> None:
        """Redraw (at most twice a second unless forced or done); `note` a string or a function giving one,
        called only when the bar is drawn."""
        now = time.perf_counter()
        if not force and now - self.last < 0.5 and done < self.total:
            return
        self.last = now
        note = note() if callable(note) else note
        fill = int(self.width * done / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        end = "\n" if done >= self.total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {now - self.start:.1f}s {note}   {end}")
        self.stream.flush()


def supervised_loss(model: TinyLM, inputs: torch.Tensor, targets: torch.Tensor, asked: torch.Tensor | None = None):
    """(mean cross-entropy, logits `[n, vocab]`, their targets `[n]`) over positions with a target;
    `asked`: those positions' flat indices into `[B * T]` (given on the device, indexing waits for nothing;
    found from `targets` otherwise, which waits for the device)."""
    h = model.hidden(inputs)
    if asked is None:
        asked = (targets != IGNORE).flatten().nonzero().squeeze(1)
    logits = model.logits(h.flatten(0, 1)[asked]).float()
    wanted = targets.flatten()[asked]
    return F.cross_entropy(logits, wanted), logits, wanted


@torch.no_grad()
def evaluate(model: TinyLM, inputs: torch.Tensor, targets: torch.Tensor, batch: int, device) -> dict:
    """Accuracy and mean loss (nats) over a fixed evaluation set."""
    model.eval()
    total_loss, correct, asked = 0.0, 0, 0
    for s in range(0, inputs.shape[0], batch):
        x, y = inputs[s:s + batch].to(device), targets[s:s + batch].to(device)
        loss, logits, wanted = supervised_loss(model, x, y)
        a = wanted.numel()
        total_loss, asked = total_loss + loss.item() * a, asked + a
        correct += int((logits.argmax(-1) == wanted).sum())
    model.train()
    return {"accuracy": correct / max(asked, 1), "loss": total_loss / max(asked, 1)}


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train(model: TinyLM, sample: Sampler, recipe: Recipe, *, seed: int, device, label: str = "train",
          progress: bool = True) -> dict:
    """Train on `sample(batch, generator)` for recipe.steps (or until recipe.time_limit_s); returns a log."""
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    bar = Progress(recipe.steps, label) if progress else None
    start, losses, step = time.perf_counter(), [], 0
    for step in range(recipe.steps):
        if recipe.time_limit_s is not None and time.perf_counter() - start > recipe.time_limit_s:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        x, y = sample(recipe.batch, gen)
        # the supervised positions found on the host: on a GPU the step then never waits for the device
        # (a loss read back per step would serialise the host's launches with the device's work)
        asked = (y != IGNORE).flatten().nonzero().squeeze(1).to(device, non_blocking=True)
        loss, _, _ = supervised_loss(model, x.to(device), y.to(device), asked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.detach())
        if bar:
            bar.update(step + 1, lambda: f"loss {losses[-1].item():.3f}")  # read back only when drawn
    else:
        step = recipe.steps
    if bar and step < recipe.steps:  # a finished run has drawn its full bar already
        bar.update(bar.total, f"stopped at step {step} (time limit)", force=True)
    if torch.device(device).type == "cuda":  # the host ran ahead: the time is the device's
        torch.cuda.synchronize(device)
    return {"steps_done": step, "truncated": step < recipe.steps, "seconds": time.perf_counter() - start,
            "final_loss": float(torch.stack(losses[-10:]).mean()) if losses else 0.0, "recipe": asdict(recipe)}
