"""The chunkwise form of the gated recurrence in plain PyTorch (survey Sec. 4.2, "chunkwise parallel form").

The sequence is cut into chunks of C tokens (chunks never cross a `cu_seqlens` boundary). With the state
h_c at the start of chunk c and the chunk-local cumulative log gates Gc (float32, so Gc_0 = g_0):

    x      = beta * v                                   (no delta rule)
    x      = U - W h_c,  U = A (beta v),  W = A (beta k e^{Gc}),  A = (I + tril_-1(beta k k^T * D))^{-1}
                                                        (delta rule: the WY / UT representation)
    o      = scale * [(q e^{Gc}) h_c + tril(q k^T * D) x]        D_ij = e^{Gc_i - Gc_j} (per channel if vector)
    h_{c+1} = e^{Gc_last} h_c + (k e^{Gc_last - Gc})^T x

Intra-chunk work runs for all chunks at once on a padded `[N, C, H, *]` layout; only the h_c scan is
sequential; the Triton kernels (chunk.py, chunk_bwd.py) follow the same decomposition.
Vector gates take their decays relative to reference rows in blocks of 16 (`_pair_vector`), like the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Chunks:
    """How packed tokens `[T]` fall into chunks: `index[n, i]` is the token of row i of chunk n (T for padding);
    `start`/`end` the token range of chunk n; `first[s]` the first chunk of sequence s."""

    index: torch.Tensor  # [N, C] int64
    start: torch.Tensor  # [N] int32
    end: torch.Tensor  # [N] int32
    first: torch.Tensor  # [num_seqs + 1] int32
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32
    size: int


def make_chunks(cu_seqlens: torch.Tensor, chunk_size: int, device) -> Chunks:
    cu = cu_seqlens.to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + chunk_size - 1) // chunk_size
    seq_of_chunk = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
    first = torch.cat([torch.zeros(1, dtype=torch.int64), per_seq.cumsum(0)])
    pos = torch.arange(int(first[-1])) - first[seq_of_chunk]
    start = cu[seq_of_chunk] + pos * chunk_size
    end = torch.minimum(start + chunk_size, cu[seq_of_chunk + 1])
    rows = start.unsqueeze(1) + torch.arange(chunk_size)
    index = torch.where(rows < end.unsqueeze(1), rows, torch.full_like(rows, int(cu[-1])))
    i32 = dict(device=device, dtype=torch.int32)
    return Chunks(index.to(device), start.to(**i32), end.to(**i32), first.to(**i32), cu_seqlens.to(**i32),
                  chunk_size)


def pack(x: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """`[B, T, ...]` -> `[B*T, ...]` and the cu_seqlens describing it (B sequences of T tokens)."""
    B, T = x.shape[:2]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=x.device)
    return x.reshape(B * T, *x.shape[2:]), cu_seqlens


def to_chunks(x: torch.Tensor, chunks: Chunks) -> torch.Tensor:
    """Packed `[T, H, ...]` -> padded `[N, C, H, ...]` (padding rows are zero)."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return padded[chunks.index]


def from_chunks(x: torch.Tensor, chunks: Chunks, total: int) -> torch.Tensor:
    """Padded `[N, C, H, ...]` -> packed `[T, H, ...]` (padding rows dropped)."""
    out = x.new_zeros(total + 1, *x.shape[2:])
    out[chunks.index.reshape(-1)] = x.reshape(-1, *x.shape[2:])
    return out[:total]


def _decay(Gc: torch.Tensor, vector: bool, strict: bool) -> torch.Tensor:
    """D[n, h, i, j(, d)] = exp(Gc_i - Gc_j) for j <= i (j < i if strict), else 0; never overflows."""
    C = Gc.shape[1]
    keep = torch.ones(C, C, dtype=torch.bool, device=Gc.device).tril(-1 if strict else 0)
    G = Gc.transpose(1, 2)  # [N, H, C(, K)]
    if vector:
        diff = G.unsqueeze(3) - G.unsqueeze(2)  # [N, H, C, C, K]
        return torch.exp(diff.masked_fill(~keep.view(1, 1, C, C, 1), -float("inf")))
    diff = G.unsqueeze(3) - G.unsqueeze(2)
    return torch.exp(diff.masked_fill(~keep, -float("inf")))


def _pair(a: torch.Tensor, b: torch.Tensor, D: torch.Tensor, vector: bool) -> torch.Tensor:
    """sum_d a_id b_jd D_ij(d): a, b `[N, C, H, K]` -> `[N, H, C, C]`."""
    if vector:
        return torch.einsum("nihd,njhd,nhijd->nhij", a, b, D)
    return torch.einsum("nihd,njhd->nhij", a, b) * D


def _pair_vector(a: torch.Tensor, b: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """tril(sum_d a_id b_jd e^{G_id - G_jd}) for a vector gate without the `[C, C, K]` decay tensor: in blocks
    of 16 rows, relative to a reference row (the key block's last row below the diagonal, the block's first
    row on it) as the Triton kernel does, so no exponent is positive outside a diagonal block."""
    N, C, H, K = a.shape
    S = min(16, C)
    nb = C // S
    Gb = G.reshape(N, nb, S, H, K)
    blk = torch.arange(nb, device=a.device)
    below = (blk.view(1, nb, 1, 1, 1) > blk.view(1, 1, nb, 1, 1))  # [1, I, J, 1, 1]
    ref = torch.where(below, Gb[:, None, :, -1], Gb[:, :, None, 0])  # [N, I, J, H, K]
    live = (blk.view(nb, 1) >= blk.view(1, nb)).view(1, nb, nb, 1, 1, 1)
    af = a.reshape(N, nb, 1, S, H, K) * torch.exp(Gb[:, :, None] - ref[:, :, :, None])
    bf = b.reshape(N, 1, nb, S, H, K) * torch.exp(torch.where(live, ref[:, :, :, None] - Gb[:, None], -float("inf")))
    P = torch.einsum("nIJihd,nIJjhd->nhIiJj", af, bf).reshape(N, H, C, C)
    return P.tril()


def wy(k, v, Gc, beta, vector: bool):
    """W = A (beta k e^{Gc}), U = A (beta v) with A = (I + tril_-1(beta k k^T * D))^{-1}: `[N, C, H, *]`."""
    C = k.shape[1]
    L = _pair(k, k, _decay(Gc, vector, strict=True), vector) * beta.transpose(1, 2).unsqueeze(-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    rhs_k = (k * torch.exp(Gc if vector else Gc.unsqueeze(-1)) * beta.unsqueeze(-1)).transpose(1, 2)
    rhs_v = (v * beta.unsqueeze(-1)).transpose(1, 2)
    W = torch.linalg.solve_triangular(eye + L, rhs_k, upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(eye + L, rhs_v, upper=False, unitriangular=True)
    return W.transpose(1, 2), U.transpose(1, 2)


def chunk_local(q, k, v, Gc, beta, h, *, scale: float, delta_rule: bool, vector: bool):
    """Everything of a chunk given its start state h `[N, H, K, V]`: returns (o, h_next, x), padded layout.

    q, k `[N, C, H, K]`, v `[N, C, H, V]`, Gc `[N, C, H]` or `[N, C, H, K]` (chunk-local cumsum, float32),
    beta `[N, C, H]` or None."""
    Gk = Gc if vector else Gc.unsqueeze(-1)  # [N, C, H, K or 1]
    if delta_rule:
        W, U = wy(k, v, Gc, beta, vector)
        x = U - torch.einsum("nchk,nhkv->nchv", W, h)
    else:
        x = v if beta is None else v * beta.unsqueeze(-1)
    P = _pair_vector(q, k, Gc) if vector else _pair(q, k, _decay(Gc, False, strict=False), False)  # [N, H, C, C]
    o = scale * (torch.einsum("nchk,nhkv->nchv", q * torch.exp(Gk), h) + torch.einsum("nhij,njhv->nihv", P, x))
    last = Gk[:, -1]  # padding rows carry g = 0, so row C-1 holds the chunk's last cumulative gate
    k_to_end = k * torch.exp(last.unsqueeze(1) - Gk)
    h_next = torch.exp(last).unsqueeze(-1) * h + torch.einsum("nchk,nchv->nhkv", k_to_end, x)
    return o, h_next, x


def chunk_form(q, k, v, g=None, beta=None, *, scale=None, initial_state=None, output_final_state=False,
               delta_rule=False, cu_seqlens=None, chunk_size=16, **_ignored):
    """The chunkwise form (module docstring), same signature and returns as the reference forms."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    vector = g is not None and g.dim() == 4
    (qp, cu), (kp, _), (vp, _) = pack(q, cu_seqlens), pack(k, cu_seqlens), pack(v, cu_seqlens)
    chunks = make_chunks(cu, chunk_size, q.device)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (to_chunks(x.to(acc), chunks) for x in (qp, kp, vp))
    gp = qp.new_zeros(B * T, H, dtype=acc) if g is None else pack(g, None)[0].to(acc)
    Gc = to_chunks(gp, chunks).cumsum(1)  # chunk-local, float32 (or float64)
    bc = None if beta is None else to_chunks(pack(beta, None)[0].to(acc), chunks)
    num_seqs = cu.numel() - 1
    first = chunks.first.tolist()
    state = q.new_zeros(num_seqs, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    # The scan over chunk positions: step i advances the i-th chunk of every sequence that has one.
    states = [None] * chunks.start.numel()
    for i in range(max(b - a for a, b in zip(first[:-1], first[1:]))):
        seqs = [s for s in range(num_seqs) if first[s] + i < first[s + 1]]
        sel = torch.tensor([first[s] + i for s in seqs], device=q.device)
        h = state[seqs]
        for n, hn in zip(sel.tolist(), h):
            states[n] = hn
        _, h_next, _ = chunk_local(qc[sel], kc[sel], vc[sel], Gc[sel], None if bc is None else bc[sel], h,
                                   scale=scale, delta_rule=delta_rule, vector=vector)
        state = state.clone()
        state[seqs] = h_next
    h_all = torch.stack(states)
    o, _, _ = chunk_local(qc, kc, vc, Gc, bc, h_all, scale=scale, delta_rule=delta_rule, vector=vector)
    o = from_chunks(o, chunks, B * T).reshape(B, T, H, V).to(q.dtype)
    return (o, state.to(q.dtype)) if output_final_state else o
