"""Fused Triton recurrence for the sLSTM (see slstm.py for the equations), forward and backward.

One program per (batch, head) keeps the state (h, c, n, m) `[d]` and the head's four recurrent blocks
R_g `[d, d]` in registers and walks the sequence; h_{t-1} R_g is a broadcast multiply and a reduction (a
1 x d by d x d product is too thin for tensor cores). The forward stores the pre-activations and (c, n, m)
of every step (float32), so the backward needs no recomputation of the recurrence. The backward walks the
sequence in reverse with the adjoints of (h, c, n, m), accumulates dR_g = sum_t h_{t-1}^T dpre_g,t per
(batch, head) and hands dh_{t-1} = sum_g dpre_g,t R_g^T to the previous step. The max of the stabiliser
passes its gradient like torch.maximum (to the larger argument, half each on a tie).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import empty_output
from ..hardware._flash_common import next_pow2


@triton.jit
def _gates(pi, pf, pz, po, m_prev, EXP_F: tl.constexpr):
    """Stabilised gates of one step: (log f, m_t, i', f', z, o)."""
    if EXP_F:
        lf = pf
    else:  # logsigmoid, stable for either sign
        lf = tl.minimum(pf, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(pf)))
    m = tl.maximum(lf + m_prev, pi)
    z = 2.0 * tl.sigmoid(2.0 * pz) - 1.0  # tanh
    return lf, m, tl.exp(pi - m), tl.exp(lf + m_prev - m), z, tl.sigmoid(po)


@triton.jit
def _head(R, hd, H, d, BD: tl.constexpr):
    """Lane offsets and mask of one head's vectors `[BD]` and blocks `[BD, BD]`, and its four R_g."""
    oi = tl.arange(0, BD)
    md = oi < d
    rr = oi[:, None] * d + oi[None, :]
    mr = md[:, None] & md[None, :]
    R_i, R_f, R_z, R_o = _load4(R + hd * d * d + rr, H * d * d, mr, 0.0)
    return oi, md, rr, mr, R_i, R_f, R_z, R_o


@triton.jit
def _slstm_fwd(x, R, s0, out, pre, hist, sT, T, H, d, BD: tl.constexpr, EXP_F: tl.constexpr,
               USE_S0: tl.constexpr):
    b, hd = tl.program_id(0), tl.program_id(1)
    oi, md, rr, mr, R_i, R_f, R_z, R_o = _head(R, hd, H, d, BD)
    sb = (b * 4 * H + hd) * d + oi  # state [B, 4, H, d]: h, c, n, m
    if USE_S0:
        h, c, n, m = _load4(s0 + sb, H * d, md, 0.0)
    else:
        h, c, n = tl.zeros([BD], tl.float32), tl.zeros([BD], tl.float32), tl.zeros([BD], tl.float32)
        m = tl.full([BD], float("-inf"), tl.float32)
    for t in range(T):
        xb = ((b * T + t) * 4 * H + hd) * d + oi  # x, pre: [B, T, 4, H, d]
        hr = h[:, None]
        pi = tl.load(x + xb, mask=md, other=0.0).to(tl.float32) + tl.sum(hr * R_i, axis=0)
        pf = tl.load(x + xb + H * d, mask=md, other=0.0).to(tl.float32) + tl.sum(hr * R_f, axis=0)
        pz = tl.load(x + xb + 2 * H * d, mask=md, other=0.0).to(tl.float32) + tl.sum(hr * R_z, axis=0)
        po = tl.load(x + xb + 3 * H * d, mask=md, other=0.0).to(tl.float32) + tl.sum(hr * R_o, axis=0)
        _, m, ig, fg, z, o = _gates(pi, pf, pz, po, m, EXP_F)
        c = fg * c + ig * z
        n = fg * n + ig
        h = o * c / n
        _store4(pre + xb, pi, pf, pz, po, H * d, md)
        tl.store(out + ((b * T + t) * H + hd) * d + oi, h.to(out.dtype.element_ty), mask=md)  # [B, T, H, d]
        _store4(hist + xb, h, c, n, m, H * d, md)  # hist [B, T, 4, H, d]: the state after step t
    _store4(sT + sb, h, c, n, m, H * d, md)


@triton.jit
def _store4(ptr, a, b, c, d, stride, mask):
    """Four gates / state parts at `ptr + k * stride` (the layouts [.., 4, H, d] and [4, H, d, d])."""
    tl.store(ptr, a, mask=mask)
    tl.store(ptr + stride, b, mask=mask)
    tl.store(ptr + 2 * stride, c, mask=mask)
    tl.store(ptr + 3 * stride, d, mask=mask)


@triton.jit
def _load4(ptr, stride, mask, other):
    return (tl.load(ptr, mask=mask, other=other).to(tl.float32),
            tl.load(ptr + stride, mask=mask, other=other).to(tl.float32),
            tl.load(ptr + 2 * stride, mask=mask, other=other).to(tl.float32),
            tl.load(ptr + 3 * stride, mask=mask, other=other).to(tl.float32))


@triton.jit
def _slstm_bwd(R, s0, pre, hist, dout, dsT, dx, dR, ds0, T, H, d, BD: tl.constexpr, EXP_F: tl.constexpr,
               USE_S0: tl.constexpr, USE_DST: tl.constexpr):
    b, hd = tl.program_id(0), tl.program_id(1)
    oi, md, rr, mr, R_i, R_f, R_z, R_o = _head(R, hd, H, d, BD)
    dR_i, dR_f = tl.zeros([BD, BD], tl.float32), tl.zeros([BD, BD], tl.float32)
    dR_z, dR_o = tl.zeros([BD, BD], tl.float32), tl.zeros([BD, BD], tl.float32)
    sb = (b * 4 * H + hd) * d + oi
    if USE_DST:  # adjoints of the final (h, c, n, m)
        dh, dc, dn, dm = _load4(dsT + sb, H * d, md, 0.0)
    else:
        dh, dc = tl.zeros([BD], tl.float32), tl.zeros([BD], tl.float32)
        dn, dm = tl.zeros([BD], tl.float32), tl.zeros([BD], tl.float32)
    for i in range(T):
        t = T - 1 - i
        xb = ((b * T + t) * 4 * H + hd) * d + oi
        pi, pf, pz, po = _load4(pre + xb, H * d, md, 0.0)
        c_t = tl.load(hist + xb + H * d, mask=md, other=0.0)
        n_t = tl.load(hist + xb + 2 * H * d, mask=md, other=1.0)
        # the state before step t: the previous step's, or the initial one (zeros, m = -inf, without one)
        pb = xb - 4 * H * d
        first = t == 0
        h_p = tl.load(hist + pb, mask=md & (t > 0), other=0.0)
        c_p = tl.load(hist + pb + H * d, mask=md & (t > 0), other=0.0)
        n_p = tl.load(hist + pb + 2 * H * d, mask=md & (t > 0), other=0.0)
        m_p = tl.load(hist + pb + 3 * H * d, mask=md & (t > 0), other=float("-inf"))
        if USE_S0:
            h0, c0, n0, m0 = _load4(s0 + sb, H * d, md, 0.0)
            h_p, c_p = tl.where(first, h0, h_p), tl.where(first, c0, c_p)
            n_p, m_p = tl.where(first, n0, n_p), tl.where(first, m0, m_p)
        lf, m_t, ig, fg, z, o = _gates(pi, pf, pz, po, m_p, EXP_F)
        dh += tl.load(dout + ((b * T + t) * H + hd) * d + oi, mask=md, other=0.0).to(tl.float32)
        # h = o c / n
        dpo = dh * c_t / n_t * o * (1.0 - o)
        dc += dh * o / n_t
        dn -= dh * o * c_t / (n_t * n_t)
        # c = f' c_p + i' z,  n = f' n_p + i'
        dfg = dc * c_p + dn * n_p
        dig = dc * z + dn
        dpz = dc * ig * (1.0 - z * z)
        # i' = exp(i - m), f' = exp(lf + m_p - m), m = max(lf + m_p, i)
        dm_t = dm - dig * ig - dfg * fg
        a = lf + m_p
        w = tl.where(a > pi, 1.0, tl.where(a == pi, 0.5, 0.0))
        dpi = dig * ig + dm_t * (1.0 - w)
        dlf = dfg * fg + dm_t * w
        dm = dfg * fg + dm_t * w
        if EXP_F:
            dpf = dlf
        else:
            dpf = dlf * (1.0 - tl.sigmoid(pf))
        _store4(dx + xb, dpi, dpf, dpz, dpo, H * d, md)
        hc = h_p[:, None]
        dR_i += hc * dpi[None, :]
        dR_f += hc * dpf[None, :]
        dR_z += hc * dpz[None, :]
        dR_o += hc * dpo[None, :]
        dh = (tl.sum(R_i * dpi[None, :], axis=1) + tl.sum(R_f * dpf[None, :], axis=1)
              + tl.sum(R_z * dpz[None, :], axis=1) + tl.sum(R_o * dpo[None, :], axis=1))
        dc = dc * fg
        dn = dn * fg
    _store4(dR + (b * 4 * H + hd) * d * d + rr, dR_i, dR_f, dR_z, dR_o, H * d * d, mr)  # per batch [B, 4, H, d, d]
    if USE_S0:
        _store4(ds0 + sb, dh, dc, dn, dm, H * d, md)


def _launch_fwd(x, R, s0, exp_f: bool):
    B, T, _, H, d = x.shape
    out = empty_output((B, T, H, d), x.dtype, x.device)
    pre = empty_output((B, T, 4, H, d), torch.float32, x.device)
    hist = empty_output((B, T, 4, H, d), torch.float32, x.device)
    sT = empty_output((B, 4, H, d), torch.float32, x.device)
    BD = max(2, next_pow2(d))
    _slstm_fwd[(B, H)](x, R, s0, out, pre, hist, sT, T, H, d, BD=BD, EXP_F=exp_f, USE_S0=s0 is not None,
                       num_warps=4 if BD <= 32 else 8)
    return out, sT, pre, hist


class FusedSLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, s0, exp_f):
        out, sT, pre, hist = _launch_fwd(x, R, s0, exp_f)
        ctx.save_for_backward(R, s0, pre, hist)
        ctx.exp_f, ctx.x_dtype = exp_f, x.dtype
        return out, sT

    @staticmethod
    def backward(ctx, dout, dsT):
        R, s0, pre, hist = ctx.saved_tensors
        B, T, _, H, d = pre.shape
        dx = empty_output((B, T, 4, H, d), torch.float32, pre.device)
        dR = empty_output((B, 4, H, d, d), torch.float32, pre.device)
        ds0 = empty_output((B, 4, H, d), torch.float32, pre.device) if s0 is not None else None
        BD = max(2, next_pow2(d))
        _slstm_bwd[(B, H)](R, s0, pre, hist, dout.contiguous(), None if dsT is None else dsT.contiguous(), dx, dR,
                           ds0, T, H, d, BD=BD, EXP_F=ctx.exp_f, USE_S0=s0 is not None, USE_DST=dsT is not None,
                           num_warps=4 if BD <= 32 else 8)
        return dx.to(ctx.x_dtype), dR.sum(0).to(R.dtype), ds0, None


def fused_slstm(x, R, initial_state=None, exp_forget: bool = False):
    """The sLSTM recurrence in one Triton kernel per direction (validated by `effattn.linear.slstm.slstm`):
    x `[B, T, 4, H, d]`, R `[4, H, d, d]`, initial_state `[B, 4, H, d]` float32 or None. Returns (h `[B, T, H, d]`
    in x's dtype, the final state `[B, 4, H, d]` float32)."""
    s0 = None if initial_state is None else initial_state.float().contiguous()
    return FusedSLSTM.apply(x.contiguous(), R.contiguous(), s0, exp_forget)
