"""Performer (Choromanski et al., 2021; survey Table 5, kernelised linear attention): FAVOR+.

softmax(q k^T) ~ phi(q) phi(k)^T with positive orthogonal random features

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(M),   W `[M, D]`: rows orthogonal within blocks of D, row norms
                                                 chi(D)-distributed (as for Gaussian rows), x scaled by
                                                 sqrt(scale) so that q . k carries the usual 1/sqrt(D)

and the causal output o_t = phi(q_t) S_t / (phi(q_t) z_t), S_t = S_{t-1} + phi(k_t)^T v_t,
z_t = z_{t-1} + phi(k_t)^T: the ungated recurrence on the feature-mapped q, k with linear_transformer's
normaliser (v augmented by a column of ones; state `[B, H, M, Dv + 1]`).
"""
from __future__ import annotations

import functools
import math

import torch

from ..reference import linear_recurrent
from ..validate import check_choice, check_positive_int, check_qkv, check_scale, check_tensor
from .engine import chunk_gated_linear_attn
from .feature_maps import normalized_linear_attn

FORMS = ("chunk", "recurrent")


def orthogonal_random_features(num_features: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """W `[num_features, head_dim]` float64: stacked D x D orthogonal blocks (QR of Gaussian matrices), row i
    rescaled to the norm of an independent Gaussian vector (FAVOR+'s unbiased orthogonal features)."""
    check_positive_int("num_features", num_features)
    check_positive_int("head_dim", head_dim)
    gen = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        qmat, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
        blocks.append(qmat.T)  # rows orthonormal
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=gen, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return w * norms


class FavorProjection:
    """Performer's feature redrawing: call it once per step for the projection to use; a fresh one is drawn
    (seed + number of draws so far) every `redraw_every` calls, never when `redraw_every` is None. `draw`
    (num_features, head_dim, seed) -> `[M, D]` makes the projections (RFA passes its Gaussian one)."""

    def __init__(self, num_features: int, head_dim: int, seed: int = 0, redraw_every: int | None = None,
                 draw=None):
        if redraw_every is not None:
            check_positive_int("redraw_every", redraw_every)
        self.num_features, self.head_dim, self.seed, self.redraw_every = num_features, head_dim, int(seed), redraw_every
        self.draw = orthogonal_random_features if draw is None else draw
        self.draws, self.calls = 0, 0
        self.weight = self.draw(num_features, head_dim, self.seed)

    def __call__(self) -> torch.Tensor:
        if self.redraw_every is not None and self.calls > 0 and self.calls % self.redraw_every == 0:
            self.draws += 1
            self.weight = self.draw(self.num_features, self.head_dim, self.seed + self.draws)
        self.calls += 1
        return self.weight


def _features(x, w, scale, stabilize: bool):
    """phi(x) `[B, T, H, M]` in float32 (float64 stays float64). With `stabilize` the per-token max of the
    exponent is subtracted: a factor per query that cancels exactly in the normalised output. Keys get no
    such shift: a data-dependent factor on phi(k) would change the scale of the carried state between calls
    (decode, initial_state); their exponent W x - |x|^2/2 <= |w_i|^2/2 stays bounded anyway."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(acc) * math.sqrt(scale)
    logits = x @ w.to(device=x.device, dtype=acc).T - 0.5 * (x * x).sum(-1, keepdim=True)
    if stabilize:
        logits = logits - logits.amax(-1, keepdim=True).detach()
    return torch.exp(logits) / math.sqrt(w.shape[0])


@functools.lru_cache(maxsize=16)
def _drawn(draw, num_features: int, head_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """`draw(num_features, head_dim, seed)` on `device`, drawn once: drawing on the host (a QR per block) and
    copying the result from pageable memory on every call synchronised the host with the GPU each call."""
    with torch.inference_mode(False):  # a tensor first drawn under inference_mode could not join autograd later
        return draw(num_features, head_dim, seed).to(device)


def _projection(q, projection, num_features, seed, draw=orthogonal_random_features):
    """The given projection `[M, D]` (checked) or the default `draw(num_features or D, D, seed)` on q's device
    (float64; cached per arguments and device, so treat it as read-only)."""
    D = q.shape[-1]
    if projection is None:
        return _drawn(draw, D if num_features is None else num_features, D, int(seed), q.device)
    check_tensor("projection", projection, ndim=2, layout="[M, D]")
    if projection.shape[1] != D:
        raise ValueError(f"projection must be [M, D={D}], got {tuple(projection.shape)}")
    return projection


def performer(q, k, v, *, projection=None, num_features=None, seed=0, scale=None, eps=1e-6, form="chunk",
              initial_state=None, output_final_state=False):
    """Causal FAVOR+ attention.

    q, k: `[B, T, H, D]`, v: `[B, T, H, Dv]`; projection: `[M, D]` random features (default
    `orthogonal_random_features(num_features or D, D, seed)`; redraw by passing a new one, e.g. from
    `FavorProjection`); initial_state `[B, H, M, Dv + 1]` (last column: the normaliser). scale: softmax
    temperature (default D^-0.5). Returns o `[B, T, H, Dv]` (and the final state with `output_final_state`).
    O(T M Dv) time, O(M Dv) state per head. `form`: "chunk" (Triton engine) or "recurrent".
    """
    check_qkv(q, k, v, same_length=True)
    check_scale(scale)
    check_choice("form", form, FORMS)
    if num_features is not None:
        check_positive_int("num_features", num_features)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"performer needs as many key heads as query heads, got H={q.shape[2]}, Hkv={k.shape[2]}")
    w = _projection(q, projection, num_features, seed)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    fq, fk = (_features(x, w, scale, stabilize=s).to(q.dtype) for x, s in ((q, True), (k, False)))
    form_fn = chunk_gated_linear_attn if form == "chunk" else linear_recurrent
    return normalized_linear_attn(fq, fk, v, form_fn, scale=1.0, normalize=True, eps=eps,
                                  initial_state=initial_state, output_final_state=output_final_state)


def performer_reference(q, k, v, *, projection=None, num_features=None, seed=0, scale=None, eps=1e-6,
                        initial_state=None, output_final_state=False, **_ignored):
    """The paper's features and the recurrence token by token, in the inputs' dtype. Queries get the
    per-token shift of the paper's code (exp(Wx - |x|^2/2 - max)): it cancels in the ratio, and applying it
    here too keeps `eps` meaning the same thing on both sides."""
    w = _projection(q, projection, num_features, seed).to(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def phi(x, shift):
        logits = math.sqrt(scale) * x @ w.T - 0.5 * scale * (x * x).sum(-1, keepdim=True)
        if shift:
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) / math.sqrt(w.shape[0])

    return normalized_linear_attn(phi(q, True), phi(k, False), v, linear_recurrent, scale=1.0, normalize=True, eps=eps,
                                  initial_state=initial_state, output_final_state=output_final_state)


def performer_inputs(shape, dtype, device, generator, **options):
    """linear_inputs with a state of M = D features and a positive normaliser column (a real z is a sum of
    positive features; a random sign would put the denominator phi(q) z near 0)."""
    from ..inputs import linear_inputs

    out = linear_inputs(shape, dtype, device, generator, state_cols_extra=1, **options)
    out["initial_state"][..., -1] = out["initial_state"][..., -1].abs() + 0.5
    return out


def _register() -> None:
    from functools import partial

    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="performer", family="linear",
        cite="Choromanski et al. 2021, Performer / FAVOR+ (survey Table 5, kernelised linear attention)",
        fn=performer, reference=performer_reference,
        make_inputs=partial(performer_inputs, output_final_state=True),
        complexity=Complexity("O(N M d)", "O(N d + M d)", 1.0, 1.0),
        state_or_cache=StateOrCache("H M (d + 1)", False, lambda s: s.heads * s.head_dim * (s.Dv + 1)),
        forms=FORMS, options={"projection": None, "num_features": None, "seed": 0, "scale": None, "eps": 1e-6,
                              "form": "chunk", "initial_state": None, "output_final_state": False},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("q", "k", "v", "initial_state"),
        description="positive orthogonal random features exp(Wx - |x|^2/2), running sums with a normaliser"))


_register()
