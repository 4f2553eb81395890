"""mLSTM, xLSTM's matrix LSTM (Beck et al., 2024, "xLSTM: Extended Long Short-Term Memory", Sec. 2.3 and
App. A.3; survey Table 5, forget + select). Per head, with input gate pre-activation i~_t, forget gate
pre-activation f~_t (log f_t = logsigmoid(f~_t), or f~_t itself for the exponential forget gate):

    m_t = max(log f_t + m_{t-1}, i~_t)                              (stabiliser)
    i'_t = exp(i~_t - m_t),   f'_t = exp(log f_t + m_{t-1} - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t^T v_t      (C `[Dk, Dv]`),   n_t = f'_t n_{t-1} + i'_t k_t   (n `[Dk]`)
    h_t = (q_t C_t) / max(|q_t n_t|, exp(-m_t))                     (q scaled by `scale`, default Dk^-1/2)

C_t, n_t are the paper's exp(i~) / f products stabilised by exp(-m_t), so h_t does not depend on the
stabiliser and never overflows. The output gate o_t and the projections are the layer's (nn/ssm_layers.py).

State layout (one tensor, like the engine's): `[B, H, Dk, Dv + 2]` = [C | n | m], the stabiliser m repeated
in every row of the last column (rows other than the first are ignored on input). No initial state means
C = n = 0 and m = -inf (the first token sets m_0 = i~_0).

Forms (all exact, the same m_t, so the same final state):
- "parallel": log D_ts = F_t - F_s + i~_s (F = cumsum log f), m_t = max_s log D_ts (the row max),
  h_t = sum_s exp(log D_ts - m_t) (q_t . k_s) v_s / max(|sum_s exp(log D_ts - m_t) q_t . k_s|, exp(-m_t)).
- "chunk": the parallel form inside chunks of C tokens, all chunks at once, the state (C, n, m) carried
  between chunks with its own stabiliser, 16 chunks a step, O(T C Dk + T Dk Dv): some 100 PyTorch ops up to
  16 chunks where the parallel form run chunk after chunk issued ~25 a chunk (76 ms on the H100 at B = 16,
  T = 1024, C = 16). On 2 CPU cores, fwd / fwd+bwd: 50 / 329 -> 35 / 101 ms at B = 2, T = 4096, H = 4, D = 64,
  137 / 737 -> 171 / 700 ms at B = 16, T = 1024, H = 16, D = 32 (memory-bound there: all chunks' L x L tiles
  at once are 67 MB each, one chunk's stayed in cache; GPU untimed). Not on the
  engine's Triton kernels: the engine's state has no per-chunk rescale, so exp(i~) would have to be folded
  into k against one global stabiliser, which underflows (numerator and normaliser both 0) once the input
  gates span more than ~88 nats.
- "recurrent": the equations above token by token (the decode step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import check_choice, check_positive_int, check_qkv, check_scale, check_tensor

FORMS = ("chunk", "parallel", "recurrent")
FORGET = ("sigmoid", "exp")


def _check(q, k, v, i, f, scale, forget, initial_state):
    B, T, _, H, Hkv, K, V = check_qkv(q, k, v, same_length=True)
    if Hkv != H:
        raise ValueError(f"k and v must have as many heads as q (H={H}), got Hkv={Hkv}")
    check_scale(scale)
    check_choice("forget", forget, FORGET)
    for name, t in (("i", i), ("f", f)):
        check_tensor(name, t, ndim=3, layout="[B, T, H]")
        if t.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got {tuple(t.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, layout="[B, H, Dk, Dv + 2]")
        if initial_state.shape != (B, H, K, V + 2):
            raise ValueError(f"initial_state must be [B, H, Dk, Dv + 2] = {(B, H, K, V + 2)} (C | n | m), got "
                             f"{tuple(initial_state.shape)}")


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(q, k, v, i, f, scale, forget, initial_state):
    """Accumulation-dtype tensors `[B, H, T, .]` / `[B, H, T]`, log forget gates, the initial (C, n, m)."""
    acc = _acc(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t.to(acc).transpose(1, 2) for t in (q, k, v))
    q = q * scale
    i, f = (t.to(acc).transpose(1, 2) for t in (i, f))
    logf = F.logsigmoid(f) if forget == "sigmoid" else f
    B, H, _, K = q.shape
    if initial_state is None:
        C, n = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K)
        m = q.new_full((B, H), float("-inf"))
    else:
        s = initial_state.to(acc)
        C, n, m = s[..., :-2], s[..., -2], s[..., 0, -1]
    return q, k, v, i, logf, (C, n, m)


def _state(C, n, m):
    return torch.cat([C, n.unsqueeze(-1), m[..., None, None].expand(*n.shape, 1)], dim=-1)


def _finish(h, state, q, output_final_state):
    h = h.transpose(1, 2).to(q.dtype)
    return (h, _state(*state)) if output_final_state else h


def mlstm_step(q, k, v, i, logf, state):
    """One token, `[B, H, .]` in the accumulation dtype (q already scaled); state (C, n, m). Returns (h, state)."""
    C, n, m = state
    m_new = torch.maximum(logf + m, i)
    i_, f_ = torch.exp(i - m_new), torch.exp(logf + m - m_new)
    C = f_[..., None, None] * C + i_[..., None, None] * k.unsqueeze(-1) * v.unsqueeze(-2)
    n = f_[..., None] * n + i_[..., None] * k
    num = torch.einsum("bhk,bhkv->bhv", q, C)
    den = torch.maximum((q * n).sum(-1).abs(), torch.exp(-m_new))
    return num / den[..., None], (C, n, m_new)


def _segsum(g: torch.Tensor) -> torch.Tensor:
    """`[..., p]` -> `[..., p, p]`: entry (c, c') = g_{c'+1} + ... + g_c for c' <= c (0 on the diagonal), -inf
    above it; summed segment by segment, never as a difference of two long running totals."""
    p = g.shape[-1]
    strict = torch.ones(p, p, dtype=torch.bool, device=g.device).tril(-1)
    seg = g.unsqueeze(-1).expand(*g.shape, p).masked_fill(~strict, 0).cumsum(-2)
    return seg.masked_fill(~torch.ones_like(strict).tril(), float("-inf"))


def _carry(a, g, inner, S, m, span: int = 16):
    """Every chunk's start state of the recurrence m_c = max(a_c, g_c + m_{c-1}), S_c = e^{g_c + m_{c-1} - m_c}
    S_{c-1} + e^{a_c - m_c} X_c (a, g `[B, H, nc]`, X = inner `[B, H, nc, K, V + 1]`) from (S, m) before the first.

    Unrolled over `span` chunks at a time: m_c = max(m + G_c, max_{c' <= c} a_{c'} + seg(c', c)) and S_c =
    e^{m + G_c - m_c} S + sum_{c' <= c} e^{a_{c'} + seg(c', c) - m_c} X_{c'} (G_c = seg(-1, c), `_segsum`), one
    batched product a span instead of a step a chunk. Returns (start states `[B, H, nc, K, V + 1]`, their
    stabilisers `[B, H, nc]`, the final S, the final m)."""
    starts, start_m = [], []
    for c0 in range(0, a.shape[-1], span):
        a_s, g_s, X = a[..., c0:c0 + span], g[..., c0:c0 + span], inner[:, :, c0:c0 + span]
        E = a_s.unsqueeze(-2) + _segsum(g_s)  # [B, H, c, c']: a_{c'} + seg(c', c)
        init = m.unsqueeze(-1) + g_s.cumsum(-1)  # m + G_c
        m_end = torch.maximum(E.amax(-1), init)
        S_end = (torch.exp(E - m_end.unsqueeze(-1)) @ X.flatten(-2)).view(X.shape)
        S_end = S_end + torch.exp(init - m_end)[..., None, None] * S.unsqueeze(2)
        starts.append(torch.cat([S.unsqueeze(2), S_end[:, :, :-1]], 2))
        start_m.append(torch.cat([m.unsqueeze(-1), m_end[..., :-1]], -1))
        S, m = S_end[:, :, -1], m_end[..., -1]
    return torch.cat(starts, 2), torch.cat(start_m, -1), S, m


def _chunked(q, k, v, i, logf, state, L: int):
    """The parallel form inside chunks of L tokens `[B, H, T, .]`, continuing `state`; returns (h, final state).

    Every chunk's own terms are computed at once ([B, H, chunks, L, L] scores); only the state (C | n, m) at each
    chunk's start is carried chunk by chunk, by elementwise updates: with g_c the chunk's total log forget gate and
    a_c = max_s (g_c - b_s + i~_s) (b the in-chunk cumulative log forget gate), m_c = max(a_c, g_c + m_{c-1}) and
    [C | n]_c = e^{g_c + m_{c-1} - m_c} [C | n]_{c-1} + e^{a_c - m_c} sum_s e^{g_c - b_s + i~_s - a_c} k_s^T [v_s | 1]
    (the last row of the chunk's parallel form; `_carry` runs that recurrence). A partial last chunk is padded
    with tokens that change nothing:
    log f = 0, zero q, k, v, input gates that are -inf in the state (0 in the padded rows' own scores, which only
    those rows see, so that their stabiliser stays finite) and a normaliser of 1 for the padded rows (q = 0 makes
    theirs 0, and e^{-m} can underflow)."""
    C0, n0, m0 = state
    B, H, T, K = q.shape
    V = v.shape[-1]
    L = min(L, T)
    nc = -(-T // L)
    pad = nc * L - T
    if pad:  # (without padding the chunks are views)
        q, k, v, i, logf = (F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad)) for x in (q, k, v, i, logf))
    q, k, v = (x.reshape(B, H, nc, L, x.shape[-1]) for x in (q, k, v))
    i = i.reshape(B, H, nc, L)
    b = logf.reshape(B, H, nc, L).cumsum(-1)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    logD = (b.unsqueeze(-1) - b.unsqueeze(-2) + i.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    g = b[..., -1]  # [B, H, nc]
    valid = (torch.arange(nc * L, device=q.device) < T).view(nc, L)
    w_end = (g.unsqueeze(-1) - b + i).masked_fill(~valid, float("-inf"))  # token s's log weight in the end state
    a = w_end.amax(-1)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # [v | 1]: n rides along as column V of the state
    inner = (k * torch.exp(w_end - a.unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2) @ v1  # [B, H, nc, K, V + 1]
    S0, M0, S, m = _carry(a, g, inner, torch.cat([C0, n0.unsqueeze(-1)], -1), m0)
    inter = b + M0.unsqueeze(-1)  # the carried state's log weight at each row
    m_row = torch.maximum(logD.amax(-1), inter)
    w0 = torch.exp(inter - m_row)
    Sqk = (q @ k.transpose(-1, -2)) * torch.exp(logD - m_row.unsqueeze(-1))
    qS = q @ S0  # [B, H, nc, L, V + 1]
    num = Sqk @ v + w0.unsqueeze(-1) * qS[..., :V]
    den = Sqk.sum(-1) + w0 * qS[..., V]
    h = num / torch.maximum(den.abs(), torch.exp(-m_row)).masked_fill(~valid, 1.0).unsqueeze(-1)
    return h.reshape(B, H, nc * L, V)[:, :, :T], (S[..., :V], S[..., V], m)


def mlstm(q, k, v, i, f, *, scale=None, forget="sigmoid", initial_state=None, output_final_state=False,
          form="chunk", chunk_size=64):
    """xLSTM's mLSTM cell (without the output gate).

    q, k: `[B, T, H, Dk]`, v: `[B, T, H, Dv]`; i, f: input / forget gate pre-activations `[B, T, H]`; `forget`:
    "sigmoid" (log f = logsigmoid(f)) or "exp" (log f = f); initial_state `[B, H, Dk, Dv + 2]` = [C | n | m].
    Returns h `[B, T, H, Dv]` (q's dtype) and with `output_final_state` the final [C | n | m] (float32, or
    float64 for float64 input). `form`: "chunk" (O(T C Dk + T Dk Dv)), "parallel" (O(T^2 Dk)) or
    "recurrent" (token by token: the decode step). All run in PyTorch (see the module docstring for why
    not the engine's kernels).
    """
    check_choice("form", form, FORMS)
    check_choice("output_final_state", output_final_state, (True, False))
    check_positive_int("chunk_size", chunk_size)
    _check(q, k, v, i, f, scale, forget, initial_state)
    qa, ka, va, ia, logf, state = _prepare(q, k, v, i, f, scale, forget, initial_state)
    T = q.shape[1]
    if form == "recurrent":
        hs = []
        for t in range(T):
            h, state = mlstm_step(qa[:, :, t], ka[:, :, t], va[:, :, t], ia[:, :, t], logf[:, :, t], state)
            hs.append(h)
        return _finish(torch.stack(hs, 2), state, q, output_final_state)
    h, state = _chunked(qa, ka, va, ia, logf, state, T if form == "parallel" else chunk_size)
    return _finish(h, state, q, output_final_state)


def mlstm_reference(q, k, v, i, f, *, scale=None, forget="sigmoid", initial_state=None, output_final_state=False,
                    **_ignored):
    """App. A.3's stabilised recurrence written out per token, in the inputs' dtype (float64 for truth)."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    if initial_state is None:
        C, n = q.new_zeros(B, H, K, v.shape[-1]), q.new_zeros(B, H, K)
        m = q.new_full((B, H), float("-inf"))
    else:
        s = initial_state.to(q.dtype)
        C, n, m = s[..., :-2], s[..., -2], s[..., 0, -1]
    hs = []
    for t in range(T):
        log_f = F.logsigmoid(f[:, t]) if forget == "sigmoid" else f[:, t]
        m_new = torch.maximum(log_f + m, i[:, t])  # m_t = max(log f_t + m_{t-1}, log i_t)
        i_gate = torch.exp(i[:, t] - m_new)  # i'_t
        f_gate = torch.exp(log_f + m - m_new)  # f'_t
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        n = f_gate[..., None] * n + i_gate[..., None] * k[:, t]
        qt = q[:, t] * scale
        h = torch.einsum("bhk,bhkv->bhv", qt, C) / torch.maximum(
            torch.einsum("bhk,bhk->bh", qt, n).abs(), torch.exp(-m_new)).unsqueeze(-1)
        hs.append(h)
        m = m_new
    h = torch.stack(hs, 1)
    return (h, _state(C, n, m)) if output_final_state else h


def mlstm_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """linear_inputs (k, v with H heads) plus gate pre-activations i ~ N(0, 1), f ~ N(3, 1) and a state
    [C | n | m] with n > 0 and one m per head."""
    from dataclasses import replace

    from ..inputs import linear_inputs, randn

    shape = replace(shape, kv_heads=None, seq_k=None)
    out = linear_inputs(shape, dtype, device, generator, initial_state=initial_state, state_cols_extra=2, **options)
    B, T, H = shape.batch, shape.seq_q, shape.heads
    out["i"] = randn((B, T, H), dtype, device, generator)
    out["f"] = randn((B, T, H), dtype, device, generator) + 3.0
    if initial_state:
        s = out["initial_state"]
        s[..., -2] = s[..., -2].abs() + 0.5
        s[..., -1] = s[..., :1, -1]
    return out


def _register() -> None:
    from functools import partial

    from ..inputs import with_test_options
    from ..registry import CHUNKWISE, Method, StateOrCache, register

    register(Method(
        name="mlstm", family="linear",
        cite="Beck et al. 2024, xLSTM: mLSTM (survey Table 5, forget + select)",
        fn=mlstm, reference=mlstm_reference,
        make_inputs=partial(with_test_options, partial(mlstm_inputs, output_final_state=True), {"chunk_size": 16}),
        complexity=CHUNKWISE,
        state_or_cache=StateOrCache("H d_k (d_v + 2)", False, lambda s: s.heads * s.head_dim * (s.Dv + 2)),
        forms=FORMS, options={"scale": None, "forget": "sigmoid", "initial_state": None,
                              "output_final_state": False, "form": "chunk", "chunk_size": 64},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("q", "k", "v", "i", "f", "initial_state"),
        description="exponential input gate, sigmoid forget gate, max stabiliser m_t, normaliser n_t"))


_register()
