"""The gated linear recurrence engine: launchers, autograd and the public chunkwise function.

    S_t = G_t * S_{t-1} + beta_t k_t^T v_t   (or the (gated) delta rule),   o_t = scale * q_t S_t

`chunk_gated_linear_attn` runs the Triton chunkwise kernels of chunk.py (forward) and chunk_bwd.py
(backward: the reverse scan over chunk states gives dh at every chunk boundary; given h_c and dh_{c+1}
every chunk is independent, and fused kernels give dq, dk, dv, dbeta and the log-gate gradient).
"""
from __future__ import annotations

import functools

import torch

from .._memory import empty_output
from ..hardware._flash_common import cdiv, dot_precision, next_pow2, pick_config, seqlen_bucket
from ..validate import check_choice, check_cu_seqlens, check_positive_int, check_qkv, check_scale, check_tensor
from .chunk import _chunk_cumsum, _chunk_output, _state_fwd, _wy_fwd
from .chunk_bwd import _bwd_dqk, _bwd_dx, _state_bwd, _wy_bwd
from .chunk_torch import Chunks, make_chunks


def _prec(t: torch.Tensor):
    return dot_precision(t.dtype)


def _bk(K: int) -> int:
    return max(16, next_pow2(K))


@functools.lru_cache(maxsize=None)
def _configs(V: int, kernel: str, K: int = 0, delta_rule: bool = True) -> tuple:
    """Candidate (BV, num_warps, num_stages[, BK]), the first one used by the interpreter (cached: the
    launchers ask for them on every call)."""
    bv = [b for b in (16, 32, 64, 128) if b <= max(16, next_pow2(V))]
    if kernel == "wy":  # a latency-bound forward substitution: try a few warp counts
        return tuple((bv[-1] if len(bv) < 3 else bv[2], w, st) for w, st in ((4, 1), (4, 2), (8, 2), (2, 2)))
    if kernel == "state":  # sequential over chunks: split V finer to fill the GPU, pipeline the loads
        bks = ([64] if not delta_rule and _bk(K) > 64 else []) + [_bk(K)]  # the split first: tested on CPU
        cands = [(b, w, st, bk) for bk in bks for b in reversed(bv[:3]) for w, st in ((4, 2), (4, 3), (8, 2))]
        if not delta_rule and _bk(K) >= 64:  # 32 key channels a program: twice the programs where one sequence
            # leaves the pass latency-bound (at B = 1, H = 16, 64-channel blocks make 128 programs for 132 SMs)
            cands += [(b, w, st, 32) for b in (32, 16) if b in bv for w, st in ((2, 3), (4, 2))]
        return tuple(cands)
    # No 8-warp candidates: on the H200 (Triton 3.6), _bwd_dx with 8 warps read shared memory out of bounds
    # inside a dot (compute-sanitizer, fp32 inputs with K = 16..32, V = 32: the quality harness's layers).
    # The unpipelined narrow tiles last, a fallback for large float32 tiles: before _bwd_dqk split Dk, it needed
    # 240-360 KB of shared memory with the others at K = V = 128 (sm_90a; Hopper has 227 KB), 96-128 KB with these.
    pipelined = [(b, w, st) for b in reversed(bv[-2:]) for w, st in ((4, 2), (4, 3))]
    return tuple(pipelined + [(b, 4, 1) for b in reversed(bv[-3:-1])])


def _usable(configs, dtype):
    """With float32 inputs (tf32 dots) only 4-warp configurations: see `_configs` for the 8-warp fault."""
    return [c for c in configs if c[1] <= 4] if dtype == torch.float32 else configs


def _tuned(name, kernel, grid, key, configs, *args, variant=None, **meta):
    """Launch `kernel` with the fastest of `configs` for `key` (BV, num_warps, num_stages[, BK[, ...]]).
    variant(cfg) -> (args, constexprs): what the candidate's further fields change, run inside the timed
    launch (so work it launches first is timed with it)."""
    def launch(cfg):
        a, extra = (args, {}) if variant is None else variant(cfg)
        if len(cfg) > 3:
            extra = {**extra, "BK": cfg[3]}
        kernel[grid(*cfg[:1], *cfg[3:4])](*a, **meta, **extra, BV=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
    launch(pick_config((name, *key), _usable(configs, args[0].dtype), launch))


@functools.lru_cache(maxsize=64)
def _dense_chunks(B: int, T: int, chunk_size: int, device: str) -> Chunks:
    """Chunk tables of B sequences of T tokens, built once per shape (no host sync in later calls)."""
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32)
    return make_chunks(cu, chunk_size, device)


def _gate_code(g) -> int:
    return 0 if g is None else (1 if g.dim() == 2 else 2)


def _cumsum(g: torch.Tensor, ch: Chunks) -> torch.Tensor:
    """Chunk-local cumulative sum of packed log gates `[T, H(, K)]`, float32."""
    H = g.shape[1]
    KG = g.shape[2] if g.dim() == 3 else 1
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    _chunk_cumsum[(ch.start.numel(), H)](g, out, None, ch.start, ch.end, H=H, KG=KG, BT=ch.size,
                                         BG=max(16, next_pow2(KG)), REVERSE=False, NB=0)
    return out


def _forward(q, k, v, g, beta, scale, h0, delta_rule, ch: Chunks, want_ht: bool, want_grad: bool, out_dtype):
    """Packed q, k `[T, H, K]`, v `[T, H, V]`; returns o (in out_dtype), ht, and what backward needs."""
    T, H, K = q.shape
    V = v.shape[-1]
    num_seqs, N = ch.cu_seqlens.numel() - 1, ch.start.numel()
    BK, gate = _bk(K), _gate_code(g)
    key = (gate, delta_rule, K, V, ch.size, q.dtype, num_seqs * H, seqlen_bucket(T))
    gc = _cumsum(g, ch) if gate == 2 or (gate and want_grad) else None  # the backward reads it
    g_fwd = g if gate == 1 else gc  # the forward kernels cumulate a scalar gate themselves
    w = aw = None
    if delta_rule:
        w, u = empty_output((T, H, K), k.dtype, k.device), empty_output((T, H, V), v.dtype, v.device)
        aw = torch.empty((T, H, ch.size), dtype=k.dtype, device=k.device)
        _tuned("wy", _wy_fwd, lambda bv: (N, H), key, _configs(V, "wy"), k, v, beta, g_fwd, w, u, aw, ch.start, ch.end,
               H=H, K=K, V=V, BT=ch.size, BK=BK, GATE=gate, PREC=_prec(k))
        x = empty_output((T, H, V), v.dtype, v.device)
    else:
        u = v if beta is None else (v * beta.unsqueeze(-1)).to(v.dtype)
        x = u
    h = empty_output((N, H, K, V), q.dtype, q.device)
    ht = empty_output((num_seqs, H, K, V), torch.float32, q.device) if want_ht else None

    state_args = (k, u, w, None, h, x, h0, ht, ch.cu_seqlens, ch.first)  # None: the gate, set per candidate

    def gate_input(cfg):
        """The state pass's gate: a scalar gate raw, cumulated inside its sequential loop (RAW_G: no launch,
        but a scan on the critical path of each step), or its cumsum launched first; the tuner times both
        (2026-12-06, H100: inside wins at B = 4, T = 4k, H = 16 and loses 11% at B = 1, T = 16k). Vector
        gates always read the cumsum, no gate reads nothing."""
        raw = cfg[4]
        if raw:
            gate_in = g
        elif gc is not None or not gate:
            gate_in = gc
        else:
            gate_in = _cumsum(g, ch)
        return (*state_args[:3], gate_in, *state_args[4:]), {"RAW_G": raw}
    # (whether the backward's cumsum exists is part of the key: then the launched variant costs no launch)
    _tuned("state_fwd", _state_fwd, lambda bv, bk: (cdiv(V, bv) * cdiv(K, bk), num_seqs, H),
           (*key, gc is not None),
           [(*c, raw) for raw in ((1, 0) if gate == 1 else (0,)) for c in _configs(V, "state", K, delta_rule)],
           *state_args, variant=gate_input, H=H, K=K, V=V, BT=ch.size, GATE=gate, DELTA=delta_rule,
           USE_H0=h0 is not None, STORE_HT=want_ht, PREC=_prec(k))
    o = empty_output((T, H, V), out_dtype, q.device)
    a = torch.empty((T, H, ch.size), dtype=q.dtype, device=q.device) if want_grad else None
    BQ = 16 if gate == 2 else ch.size
    _tuned("output", _chunk_output, lambda bv: (cdiv(V, bv), N * (ch.size // BQ), H), key,
           _configs(V, "output"), q, k, x, g_fwd, h, o, a, ch.start, ch.end, scale, H=H, K=K, V=V, BT=ch.size, BQ=BQ,
           BK=BK, GATE=gate, STORE_A=want_grad, PREC=_prec(q))
    return o, ht, (gc, h, w, x, a, aw)


def _backward(q, k, v, g, beta, scale, delta_rule, ch: Chunks, saved, do, dht, want_dh0: bool, grad_dtype=None):
    """dq, dk, dv, dg, dbeta, dh0 from the forward's `saved`; without the delta rule, dq, dk and dv in grad_dtype
    if given (float32 for a caller that adds other gradients to them before rounding once)."""
    gc, h, w, x, a, aw = saved
    T, H, K = q.shape
    V = v.shape[-1]
    num_seqs, N = ch.cu_seqlens.numel() - 1, ch.start.numel()
    BK, gate, BT = _bk(K), _gate_code(g), ch.size
    BQ = 16 if gate == 2 else BT
    key = (gate, delta_rule, K, V, BT, q.dtype, num_seqs * H, seqlen_bucket(T))
    do = do.to(q.dtype).contiguous()  # (an output in another dtype: the kernels' dots take q's)
    dht = None if dht is None else dht.contiguous()  # autograd may hand in an expanded (stride 0) tensor
    f32 = dict(dtype=torch.float32, device=q.device)
    consts = dict(H=H, K=K, V=V, BT=BT, GATE=gate, DELTA=delta_rule, PREC=_prec(q))
    # float32: dh carries the final-state cotangent dht, and rounding it to bf16 costs dg several ulps
    dh = torch.empty(h.shape, **f32)
    dh0 = empty_output((num_seqs, H, K, V), torch.float32, q.device)
    da = torch.empty((T, H, BT), **f32)
    dbeta = None if beta is None else empty_output(beta.shape, beta.dtype, beta.device)
    dxi = dx = torch.empty((T, H, V), **f32) if delta_rule else None

    def state_bwd():
        _tuned("state_bwd", _state_bwd, lambda bv, bk: (cdiv(V, bv) * cdiv(K, bk), num_seqs, H), key,
               _configs(V, "state", K, delta_rule), q, k, w, gc, do, dxi, dx, dh, dht, dh0, ch.cu_seqlens, ch.first,
               scale, USE_DHT=dht is not None, **consts)

    def bwd_dx(out):
        _tuned("bwd_dx", _bwd_dx, lambda bv: (N, H), key, _configs(V, "output"), a, k, v, x, beta, gc, do, dh, out,
               da, dbeta, ch.start, ch.end, scale, BK=BK, USE_BETA=beta is not None and not delta_rule, **consts)

    if delta_rule:  # the intra part of dx first: the reverse scan needs the whole dx = dU for dh
        bwd_dx(dxi)
        dx = torch.empty((T, H, V), **f32)
        state_bwd()
    else:
        state_bwd()
        dv = empty_output(v.shape, grad_dtype or v.dtype, v.device)
        bwd_dx(dv)
    KG = K if gate == 2 else 1
    # dq, dk, dw per key channel: Dk > 64 split over programs of 64 channels, as FLA does (at Dk = 128 in bf16,
    # one program of 128 spilled 0.8-4.2 KB of registers in every candidate: engine_compile --ptxas)
    BK_CHANNELS = min(BK, 64)
    NK = cdiv(K, BK_CHANNELS)
    parts = NK if gate == 1 else 1  # the scalar gate's sums over channels, one part per program
    dq = empty_output(q.shape, grad_dtype or q.dtype, q.device)
    dk = torch.empty(k.shape, **f32) if delta_rule else empty_output(k.shape, grad_dtype or k.dtype, k.device)
    dw = torch.empty(k.shape, **f32) if delta_rule else None
    # per row: dL/dGc, before the reversed cumsum
    dgc = torch.empty((*g.shape, parts) if gate == 1 else g.shape, **f32) if gate else None
    dgl = torch.empty((N, BT // BQ * parts, H, KG), **f32) if gate else None
    _tuned("bwd_dqk", _bwd_dqk, lambda bv: (N * (BT // BQ), H, NK), key, _configs(V, "output"), q, k, x, gc, h, dh,
           do, dx, da, dq, dk, dw, dgc, dgl, ch.start, ch.end, scale, BQ=BQ, BK=BK_CHANNELS, **consts)
    if gate == 1:
        dgc = dgc[..., 0] if parts == 1 else dgc.sum(-1)
    if delta_rule:
        dk32, dgc_in = dk, dgc
        dk, dv = empty_output(k.shape, k.dtype, k.device), empty_output(v.shape, v.dtype, v.device)
        dgc = torch.empty_like(dgc_in) if gate else None
        _tuned("wy_bwd", _wy_bwd, lambda bv: (N, H), key, _configs(V, "output"), k, v, beta, gc, aw, dw, dx, dk32,
               dgc_in, dk, dv, dbeta, dgc, ch.start, ch.end, H=H, K=K, V=V, BT=BT, BK=BK, GATE=gate, PREC=_prec(q))
    dg = None
    if gate:
        dg = empty_output(g.shape, g.dtype, g.device)
        _chunk_cumsum[(N, H)](dgc, dg, dgl, ch.start, ch.end, H=H, KG=KG, BT=BT, BG=max(16, next_pow2(KG)),
                              REVERSE=True, NB=BT // BQ * parts)
    return dq, dk, dv, dg, dbeta, dh0 if want_dh0 else None


class _ChunkGatedLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, delta_rule, ch, want_ht, out_dtype):
        o, ht, saved = _forward(q, k, v, g, beta, scale, h0, delta_rule, ch, want_ht, any(ctx.needs_input_grad[:6]),
                                out_dtype)
        ctx.save_for_backward(q, k, v, g, beta, *saved)
        ctx.scale, ctx.delta_rule, ctx.ch, ctx.has_h0 = scale, delta_rule, ch, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, *saved = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = _backward(q, k, v, g, beta, ctx.scale, ctx.delta_rule, ctx.ch, saved, do, dht,
                                               ctx.has_h0)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None, None


def validate_linear(q, k, v, g, beta, scale, initial_state, cu_seqlens, *, delta_rule: bool,
                    dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> int:
    """Checks shared by every public function of the engine; returns the number of sequences."""
    B, T, _, H, Hkv, K, V = check_qkv(q, k, v, dtypes=dtypes, same_length=True)
    if Hkv != H:
        raise ValueError(f"k and v must have as many heads as q (H={H}), got Hkv={Hkv}")
    check_scale(scale)
    if g is not None:
        check_tensor("g", g, dtypes=(q.dtype, torch.float32))
        if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
            raise ValueError(f"g must be [B, T, H] (scalar gate) or [B, T, H, Dk] (vector gate) = "
                             f"{(B, T, H)} or {(B, T, H, K)}, got {tuple(g.shape)}")
    if beta is not None:
        check_tensor("beta", beta, ndim=3, dtypes=(q.dtype, torch.float32), layout="[B, T, H]")
        if tuple(beta.shape) != (B, T, H):
            raise ValueError(f"beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if delta_rule and g is not None and g.dim() == 4:
        raise ValueError("the delta rule takes a scalar gate g [B, T, H] (gated delta rule), got a vector gate")
    num_seqs = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q)
        num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, layout="[N, H, Dk, Dv]")
        if tuple(initial_state.shape) != (num_seqs, H, K, V):
            raise ValueError(f"initial_state must be [num_seqs, H, Dk, Dv] = {(num_seqs, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
    for name, t in (("g", g), ("beta", beta), ("initial_state", initial_state)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    return num_seqs


def chunk_gated_linear_attn(q, k, v, g=None, beta=None, *, scale=None, initial_state=None,
                            output_final_state=False, cu_seqlens=None, delta_rule=False, chunk_size=64,
                            output_dtype=None):
    """Chunkwise gated linear attention with Triton kernels (forward and backward).

    q, k: `[B, T, H, Dk]`, v: `[B, T, H, Dv]`; g: log forget gate `[B, T, H]` (scalar) or `[B, T, H, Dk]`
    (vector), `g <= 0`; beta: `[B, T, H]`; initial_state: `[N, H, Dk, Dv]` (N = B, or the number of
    sequences with `cu_seqlens`, int32 `[N + 1]`, B == 1). `delta_rule`: S_t = G_t S_{t-1} (I - beta k^T k)
    + beta k^T v (scalar gate or none). Returns o `[B, T, H, Dv]` in q's dtype (or `output_dtype`, e.g.
    float32 for a caller that adds to it before rounding once), and with
    `output_final_state` also the final state `[N, H, Dk, Dv]` in float32.
    Time O(T C Dk + T Dk Dv), memory O(T/C H Dk Dv) for the chunk states; chunk_size C a power of two >= 16.
    """
    validate_linear(q, k, v, g, beta, scale, initial_state, cu_seqlens, delta_rule=delta_rule)
    check_positive_int("chunk_size", chunk_size, power_of_two=True, minimum=16)
    check_choice("output_final_state", output_final_state, (True, False))
    check_choice("output_dtype", output_dtype, (None, torch.float16, torch.bfloat16, torch.float32))
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else float(scale)
    pk = lambda t: None if t is None else t.contiguous().reshape(B * T, *t.shape[2:])  # noqa: E731
    ch = (_dense_chunks(B, T, chunk_size, str(q.device)) if cu_seqlens is None
          else make_chunks(cu_seqlens, chunk_size, q.device))
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _ChunkGatedLinearAttn.apply(pk(q), pk(k), pk(v), pk(g), pk(beta), h0, scale, delta_rule, ch,
                                        output_final_state, output_dtype or q.dtype)
    o = o.reshape(B, T, H, v.shape[-1])
    return (o, ht) if output_final_state else o
