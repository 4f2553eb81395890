"""sLSTM, xLSTM's scalar LSTM with exponential gating (Beck et al., 2024, "xLSTM", Sec. 2.2 and App. A.2;
survey Table 5). Per head (hidden size d, recurrent weights R block-diagonal over heads), with the input
projections W x_t + b given as `x` `[B, T, 4, H, d]` (gates in the order i, f, z, o):

    (i~, f~, z~, o~)_t = x_t + h_{t-1} R            (R `[4, H, d, d]`: one d x d block per gate and head)
    m_t = max(log f_t + m_{t-1}, i~_t)              (log f = logsigmoid(f~), or f~ for the exponential gate)
    i'_t = exp(i~_t - m_t),   f'_t = exp(log f_t + m_{t-1} - m_t)
    c_t = f'_t c_{t-1} + i'_t tanh(z~_t),   n_t = f'_t n_{t-1} + i'_t,   h_t = sigmoid(o~_t) c_t / n_t

The recurrence through h_{t-1} R makes every gate depend nonlinearly on the previous output, so there is no
parallel or chunkwise form (the paper: "not parallelizable"); both forms are the recurrence:
- "recurrent" (the default): token by token in PyTorch, float32 accumulation (float64 for float64 input), a
  reference-grade form: one small op per gate and step, slow on long sequences.
- "fused": one Triton kernel per direction (slstm_fused.py), state and R in registers. Tested with Triton's
  interpreter only so far (not yet run on a GPU), hence not the default.

State `[B, 4, H, d]` = (h, c, n, m); without one, h = c = n = 0 and m = -inf.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton_mode import require_triton
from ..validate import check_choice, check_tensor
from .slstm_fused import fused_slstm

FORMS = ("recurrent", "fused")
FORGET = ("sigmoid", "exp")


def slstm_step(x_t, R, state, forget="sigmoid"):
    """One token: x_t `[B, 4, H, d]`, R `[4, H, d, d]`, state (h, c, n, m) each `[B, H, d]`. Returns the new state."""
    h, c, n, m = state
    pre = x_t + (h[:, None, :, None, :] @ R).squeeze(-2)  # W x + b + h_{t-1} R, per gate and head
    i_, f_, z_, o_ = pre.unbind(1)
    log_f = F.logsigmoid(f_) if forget == "sigmoid" else f_
    m_new = torch.maximum(log_f + m, i_)
    i_gate, f_gate = torch.exp(i_ - m_new), torch.exp(log_f + m - m_new)
    c = f_gate * c + i_gate * torch.tanh(z_)
    n = f_gate * n + i_gate
    h = torch.sigmoid(o_) * c / n
    return h, c, n, m_new


def _check(x, R, forget, initial_state):
    check_tensor("x", x, ndim=5, layout="[B, T, 4, H, d]")
    B, T, G, H, d = x.shape
    if G != 4:
        raise ValueError(f"x must be [B, T, 4, H, d] (gates i, f, z, o), got {tuple(x.shape)}")
    check_tensor("R", R, ndim=4, layout="[4, H, d, d]")
    if R.shape != (4, H, d, d):
        raise ValueError(f"R must be [4, H, d, d] = {(4, H, d, d)}, got {tuple(R.shape)}")
    check_choice("forget", forget, FORGET)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, layout="[B, 4, H, d]")
        if initial_state.shape != (B, 4, H, d):
            raise ValueError(f"initial_state must be [B, 4, H, d] = {(B, 4, H, d)} (h, c, n, m), got "
                             f"{tuple(initial_state.shape)}")


def _run(x, R, forget, initial_state, dtype):
    B, T, _, H, d = x.shape
    x, R = x.to(dtype), R.to(dtype)
    if initial_state is None:
        zeros = x.new_zeros(B, H, d)
        state = (zeros, zeros, zeros, x.new_full((B, H, d), float("-inf")))
    else:
        state = tuple(initial_state.to(dtype).unbind(1))
    hs = []
    for t in range(T):
        state = slstm_step(x[:, t], R, state, forget)
        hs.append(state[0])
    return torch.stack(hs, 1), torch.stack(state, 1)


def slstm(x, R, *, forget="sigmoid", initial_state=None, output_final_state=False, form="recurrent"):
    """The sLSTM cell over a sequence.

    x: input pre-activations W x + b `[B, T, 4, H, d]` (i, f, z, o); R: recurrent block-diagonal weights
    `[4, H, d, d]`; initial_state `[B, 4, H, d]` = (h, c, n, m). Returns h `[B, T, H, d]` in x's dtype (and the
    final state `[B, 4, H, d]`, float32 or float64, with `output_final_state`). Time O(T H d^2), sequential in T.
    `form`: "recurrent" (PyTorch, float32 accumulation) or "fused" (Triton; float16/bfloat16/float32 input).
    """
    check_choice("form", form, FORMS)
    check_choice("output_final_state", output_final_state, (True, False))
    _check(x, R, forget, initial_state)
    if form == "fused":
        require_triton("slstm(form='fused')", x)
        if x.dtype == torch.float64:
            raise TypeError("slstm(form='fused') takes float16, bfloat16 or float32 x, got float64")
        h, state = fused_slstm(x, R.float(), initial_state, exp_forget=forget == "exp")
        return (h, state) if output_final_state else h
    h, state = _run(x, R, forget, initial_state, torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = h.to(x.dtype)
    return (h, state) if output_final_state else h


def slstm_reference(x, R, *, forget="sigmoid", initial_state=None, output_final_state=False, **_ignored):
    """The paper's recurrence token by token in the inputs' dtype (float64 for ground truth)."""
    h, state = _run(x, R, forget, initial_state, x.dtype)
    return (h, state) if output_final_state else h


def slstm_inputs(shape, dtype, device, generator, *, initial_state=True, **options):
    """x `[B, T, 4, H', d]` (forget pre-activations shifted by +3), R ~ N(0, 1/d), a state with n > 0, with
    H' = H / 4 heads of d = head_dim / 4: narrow, since Triton's interpreter runs the fused form's tests."""
    from ..inputs import randn

    B, T, H, d = shape.batch, shape.seq_q, max(1, shape.heads // 4), max(2, shape.head_dim // 4)
    x = torch.randn((B, T, 4, H, d), generator=generator)
    x[:, :, 1] += 3.0
    out = {"x": x.to(device=device, dtype=dtype), "R": randn((4, H, d, d), dtype, device, generator, std=d ** -0.5)}
    if initial_state:
        s = torch.randn((B, 4, H, d), generator=generator) * 0.5
        s[:, 2] = s[:, 2].abs() + 1.0  # n > 0
        out["initial_state"] = s.to(device=device)
    out.update(options)
    return out


def _register() -> None:
    from functools import partial

    from ..registry import Complexity, Method, StateOrCache, register

    register(Method(
        name="slstm", family="linear",
        cite="Beck et al. 2024, xLSTM: sLSTM (survey Table 5)",
        fn=slstm, reference=slstm_reference,
        make_inputs=partial(slstm_inputs, output_final_state=True),
        complexity=Complexity("O(N H d^2) sequential", "O(N H d)", 1.0, 1.0),
        state_or_cache=StateOrCache("4 H d (as drawn: H / 4 heads of d / 4)", False,
                                    lambda s: 4 * max(1, s.heads // 4) * max(2, s.head_dim // 4)),
        forms=FORMS, options={"forget": "sigmoid", "initial_state": None, "output_final_state": False,
                              "form": "recurrent"},
        supports=frozenset({"causal", "backward", "decode", "state"}),
        grad_inputs=("x", "R", "initial_state"),
        description="scalar memory, exponential gating with stabiliser, block-diagonal recurrent weights; "
                    "recurrent only (PyTorch, or a fused Triton kernel not yet run on a GPU)"))


_register()
