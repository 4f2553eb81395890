"""RWKV-4 WKV (Peng et al., 2023, "RWKV: Reinventing RNNs for the Transformer Era"; survey Table 6, forget
gate, and Sec. "RWKV Series"): a per-channel vector state, time decay w and bonus u for the current token,

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t})

elementwise per channel (the paper writes the decay as e^{-w}, w >= 0; here w is the log decay <= 0 like the
other RWKV operators). The receptance gate sigmoid(r) * wkv belongs to the layer.

Numerically stable in log space: the state is kept as (m, l), m the weighted mean of the past values and
l = log of their total weight (the numerator and denominator above are e^l m and e^l), so no exponential is
ever taken of an unbounded number: each step is a softmax over a few items (RWKV's running-max trick).
    o_t = sigmoid(l - u - k_t) m + (1 - sigmoid(l - u - k_t)) v_t
    l' = logaddexp(l + w, k_t),   m' = sigmoid(l + w - k_t) m + (1 - sigmoid(l + w - k_t)) v_t
The state `[B, H, 2, D]` stacks (m, l); no initial state means the empty one (l = -inf).

"chunk" form: inside a chunk of C tokens every output is one softmax over C + 1 items (the state before the
chunk, the chunk's earlier tokens, the bonus term), all chunks at once; the state passes between chunks by
one log-space merge per chunk. Sequences are padded at the start with masked tokens, so the last chunk ends
on the last token.

"fused" form (the default; rwkv4_fused.py): one Triton kernel per direction, a program per (batch, head, 32
channels) walking the tokens with (m, l) in registers: O(T D) time like the recurrence, no `[.., C, C, ..]`
intermediates, and for the backward float32 state checkpoints every 16 tokens (0.5 bytes per token and channel).
Tested with Triton's interpreter only so far (not yet run on a GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton_mode import require_triton
from ..validate import FLOAT_DTYPES, check_choice, check_positive_int, check_same, check_tensor
from .rwkv4_fused import fused_rwkv4

FORMS = ("fused", "chunk", "recurrent")


def _check(k, v, w, u, initial_state):
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, layout="[B, T, H, D]")
    check_tensor("v", v, ndim=4, dtypes=(k.dtype,), layout="[B, T, H, D]")
    if v.shape != k.shape:
        raise ValueError(f"v must be [B, T, H, D] = {tuple(k.shape)} like k, got {tuple(v.shape)}")
    B, _, H, D = k.shape
    for name, t in (("w", w), ("u", u)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, layout="[H, D]")
        check_same("k", k, name, t, dtype=False)
        if t.shape != (H, D):
            raise ValueError(f"{name} must be [H, D] = {(H, D)}, got {tuple(t.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, dtypes=FLOAT_DTYPES, layout="[B, H, 2, D]")
        check_same("k", k, "initial_state", initial_state, dtype=False)
        if initial_state.shape != (B, H, 2, D):
            raise ValueError(f"initial_state must be [B, H, 2, D] = {(B, H, 2, D)}, got {tuple(initial_state.shape)}")


def _state(initial_state, B, H, D, acc, device):
    if initial_state is None:
        return torch.zeros(B, H, D, dtype=acc, device=device), torch.full((B, H, D), -float("inf"), dtype=acc,
                                                                         device=device)
    return initial_state[:, :, 0].to(acc), initial_state[:, :, 1].to(acc)


def _chunk(k, v, w, u, initial_state, C):
    B, T, H, D = k.shape
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    pad = (-T) % C
    N = (T + pad) // C
    k, v = (F.pad(x.to(acc), (0, 0, 0, 0, pad, 0)).view(B, N, C, H, D) for x in (k, v))
    w, u = w.to(acc), u.to(acc)
    valid = (torch.arange(N * C, device=k.device) >= pad).view(1, N, C, 1, 1)
    i = torch.arange(C, device=k.device, dtype=acc)
    # score[i, j] = k_j + (i - 1 - j) w for earlier tokens j < i, u + k_i for j = i (the bonus), else masked
    lag = (i.view(C, 1) - 1 - i.view(1, C)).view(1, 1, C, C, 1, 1)
    past = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1).view(1, 1, C, C, 1, 1)
    score = k.unsqueeze(2) + lag * w
    score = torch.where(past & valid.unsqueeze(2), score, -float("inf"))
    diag = torch.eye(C, dtype=torch.bool, device=k.device).view(1, 1, C, C, 1, 1)
    score = torch.where(diag, (u + k).unsqueeze(3).expand_as(score), score)  # [B, N, C(i), C(j), H, D]
    # the chunk's own contribution to the state after its last token: weights e^{k_j + (C - 1 - j) w}
    own = torch.where(valid, k + (C - 1 - i).view(1, 1, C, 1, 1) * w, -float("inf"))  # [B, N, C, H, D]
    own_l = torch.logsumexp(own, dim=2)  # [B, N, H, D]
    own_m = (torch.softmax(own, dim=2) * v).sum(2)
    m, l = _state(initial_state, B, H, D, acc, k.device)
    l = l - pad * w  # the state before the padding decays over it back to the given one
    starts = []
    for n in range(N):  # one log-space merge per chunk: (m, l) decayed by C steps, plus the chunk's own
        starts.append((m, l))
        ld = l + C * w
        l_new = torch.logaddexp(ld, own_l[:, n])
        keep = torch.exp(ld - l_new)
        m = keep * m + (1 - keep) * own_m[:, n]
        l = l_new
    m0 = torch.stack([s[0] for s in starts], 1)  # [B, N, H, D]
    l0 = torch.stack([s[1] for s in starts], 1)
    prev = (l0.unsqueeze(2) + i.view(1, 1, C, 1, 1) * w).unsqueeze(3)  # the state before the chunk, i steps on
    p = torch.softmax(torch.cat([prev, score], dim=3), dim=3)  # [B, N, C, 1 + C, H, D]
    o = p[:, :, :, 0] * m0.unsqueeze(2) + (p[:, :, :, 1:] * v.unsqueeze(2)).sum(3)
    o = o.reshape(B, N * C, H, D)[:, pad:]
    return o, torch.stack([m, l], dim=2)


def _recurrent(k, v, w, u, initial_state):
    """The decode step, token by token in (m, l) (module docstring)."""
    B, T, H, D = k.shape
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    k, v, w, u = (x.to(acc) for x in (k, v, w, u))
    m, l = _state(initial_state, B, H, D, acc, k.device)
    outs = []
    for t in range(T):
        lam = torch.sigmoid(l - u - k[:, t])  # weight of the past against the bonus term
        outs.append(lam * m + (1 - lam) * v[:, t])
        keep = torch.sigmoid(l + w - k[:, t])
        l = torch.logaddexp(l + w, k[:, t])
        m = keep * m + (1 - keep) * v[:, t]
    return torch.stack(outs, 1), torch.stack([m, l], dim=2)


def rwkv4(k, v, w, u, *, initial_state=None, output_final_state=False, form="fused", chunk_size=32):
    """RWKV-4's WKV operator.

    k, v: `[B, T, H, D]` (channels grouped as H x D; RWKV-4 has no heads, H = 1 works), w: log decay `[H, D]`
    (<= 0), u: bonus `[H, D]`; initial_state `[B, H, 2, D]` = (weighted mean of past values, log of their
    total weight). Returns wkv `[B, T, H, D]` in v's dtype (and the final state, float32 / float64, with
    `output_final_state`). `form`: "fused" (Triton, O(T D) time, float16 / bfloat16 / float32 k and v; CUDA
    tensors, or CPU ones through Triton's interpreter), "chunk" (PyTorch, O(T C D) time and memory, chunks in
    parallel; `chunk_size` C) or "recurrent" (PyTorch, the decode step, O(D) state).
    """
    check_choice("form", form, FORMS)
    check_positive_int("chunk_size", chunk_size)
    check_choice("output_final_state", output_final_state, (True, False))
    _check(k, v, w, u, initial_state)
    if form == "fused":
        require_triton("rwkv4(form='fused')", k)
        if k.dtype == torch.float64:
            raise TypeError("rwkv4(form='fused') takes float16, bfloat16 or float32 k and v, got float64 (the "
                            "'chunk' and 'recurrent' forms take float64)")
        o, state = fused_rwkv4(k, v, w, u, initial_state)
        return (o, state) if output_final_state else o
    o, state = (_chunk(k, v, w, u, initial_state, chunk_size) if form == "chunk"
                else _recurrent(k, v, w, u, initial_state))
    o = o.to(v.dtype)
    return (o, state) if output_final_state else o


def rwkv4_reference(k, v, w, u, *, initial_state=None, output_final_state=False, **_ignored):
    """The paper's fraction with plain exponentials, all pairs (quadratic in T), in the inputs' dtype (float64
    for ground truth; values of k, w must keep e^{...} in range). The initial state (m, l) adds e^{l + t w} m to
    the numerator and e^{l + t w} to the denominator at step t."""
    T = k.shape[1]
    t = torch.arange(T, dtype=k.dtype, device=k.device)
    lag = (t.view(T, 1) - 1 - t.view(1, T)).view(T, T, 1, 1)
    weight = torch.exp(lag * w + k.unsqueeze(1)) * (lag >= 0)  # [B, T(t), T(i), H, D]
    weight = torch.where(torch.eye(T, dtype=torch.bool, device=k.device).view(T, T, 1, 1),
                         torch.exp(u + k).unsqueeze(1), weight)
    num, den = (weight * v.unsqueeze(1)).sum(2), weight.sum(2)
    end = torch.exp((T - 1 - t).view(T, 1, 1) * w + k)  # weights in the final state
    fnum, fden = (end * v).sum(1), end.sum(1)
    if initial_state is not None:
        m0, l0 = initial_state[:, :, 0].to(k.dtype), initial_state[:, :, 1].to(k.dtype)
        prior = torch.exp(l0.unsqueeze(1) + t.view(1, T, 1, 1) * w)
        num, den = num + prior * m0.unsqueeze(1), den + prior
        prior_end = torch.exp(l0 + T * w)
        fnum, fden = fnum + prior_end * m0, fden + prior_end
    o = num / den
    return (o, torch.stack([fnum / fden, torch.log(fden)], dim=2)) if output_final_state else o


def rwkv4_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """k, v `[B, T, H, D]`, w = -exp(x) `[H, D]`, x ~ N(-1, 1), u `[H, D]`, a state (m, l)."""
    from ..inputs import randn

    B, T, H, D = shape.batch, shape.seq_q, shape.heads, shape.head_dim
    w = -torch.exp(torch.randn((H, D), generator=generator) - 1.0)
    out = {"k": randn((B, T, H, D), dtype, device, generator), "v": randn((B, T, H, D), dtype, device, generator),
           "w": w.to(device=device, dtype=dtype), "u": randn((H, D), dtype, device, generator, std=0.5)}
    if initial_state:
        out["initial_state"] = randn((B, H, 2, D), torch.float32, device, generator)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="rwkv4", family="linear",
        cite="Peng et al. 2023, RWKV: Reinventing RNNs for the Transformer Era (survey Table 6, forget gate)",
        fn=rwkv4, reference=rwkv4_reference,
        make_inputs=partial(with_test_options, partial(rwkv4_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=Complexity("O(N d)", "O(N d)", 1.0, 1.0),  # fused; chunk: O(N C d)
        state_or_cache=StateOrCache("2 H d", False, lambda s: 2 * s.heads * s.head_dim),
        forms=FORMS, options={"initial_state": None, "output_final_state": False, "form": "fused", "chunk_size": 32},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("k", "v", "w", "u", "initial_state"),
        description="per-channel vector state with time decay w and bonus u, kept in log space (mean, log weight)"))


_register()
