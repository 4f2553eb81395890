"""SageAttention3's FP4 path (Zhang et al. 2025) as a quantiser and a plain-PyTorch emulation only.

FP4 tensor cores exist on Blackwell (sm_100+), not on the H100 we run on, so there is no kernel and nothing
is registered: `sage3_fp4_emulation` computes in q's dtype what the FP4 kernel would, to measure the
accuracy of the format. NVFP4 (microscaling): blocks of 16 consecutive elements share an FP8 e4m3 scale,
on top of one float32 scale per tensor; elements are E2M1, magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}:
    g = max|x| / (6 * 448),  s_b = e4m3(max|x_b| / (6 g)),  x_q = rne_E2M1(x / (s_b g)),  x ~= x_q s_b g
"""
from __future__ import annotations

import torch

from ..reference.softmax import visibility
from .quantize import FP8, FP8_MAX, smooth_k as smooth_keys

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_BLOCK = 16


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of y (|y| <= 6), ties to the even code (0, 1, 2, 4 before 0.5, 1.5, 3, 6)."""
    grid = torch.tensor(E2M1, dtype=y.dtype, device=y.device)
    d = (y.abs()[..., None] - grid).abs()
    best = d == d.amin(-1, keepdim=True)
    even = best & (torch.arange(8, device=y.device) % 2 == 0)
    idx = torch.where(even.any(-1), even.int().argmax(-1), best.int().argmax(-1))
    return torch.sign(y) * grid[idx]


def quantize_nvfp4(x: torch.Tensor, dim: int = -1, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """NVFP4 along `dim` (its length a multiple of 16), in float32, with one tensor scale per index of the
    dims `keep` (e.g. per head). Returns (E2M1 values as float32 with x's shape moved so dim is last,
    e4m3 block scales `[..., n / 16]`, float32 tensor scale g `[..., 1]`), all with dim moved last."""
    xf = x.to(torch.float32)
    keep = {d % x.dim() for d in keep}
    red = [d for d in range(x.dim()) if d not in keep]
    g = xf.abs().amax(dim=red, keepdim=True).movedim(dim, -1)
    g = torch.where(g > 0, g / (6.0 * FP8_MAX), torch.ones_like(g))
    xm = xf.movedim(dim, -1)
    blocks = xm.reshape(*xm.shape[:-1], -1, FP4_BLOCK)
    s_b = (blocks.abs().amax(-1) / (6.0 * g)).to(FP8)
    denom = s_b.to(torch.float32)[..., None] * g[..., None]
    y = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(blocks))
    return round_e2m1(y.clamp(-6, 6)).reshape(xm.shape), s_b, g


def dequantize_nvfp4(codes: torch.Tensor, s_b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_nvfp4 (dim still last)."""
    blocks = codes.reshape(*codes.shape[:-1], -1, FP4_BLOCK) * s_b.to(torch.float32)[..., None] * g[..., None]
    return blocks.reshape(codes.shape)


def fake_nvfp4(x: torch.Tensor, dim: int = -1, keep: tuple[int, ...] = ()) -> torch.Tensor:
    """x quantised to NVFP4 along dim and back (zero-padded to a multiple of 16), in x's dtype."""
    n = x.shape[dim]
    xp = torch.nn.functional.pad(x.movedim(dim, -1), (0, -n % FP4_BLOCK)).movedim(-1, dim)
    out = dequantize_nvfp4(*quantize_nvfp4(xp, dim, keep)).movedim(-1, dim)
    return out.narrow(dim, 0, n).to(x.dtype)


def sage3_fp4_emulation(q, k, v, *, causal=False, scale=None, smooth_k=True):
    """SageAttention3-style FP4 attention, emulated: K smoothed; Q and K in NVFP4 along the head dim; P =
    exp(S - rowmax) in NVFP4 along the keys with a tensor scale per row (the two-level scaling that keeps
    P's block scales inside e4m3); V in NVFP4 along the tokens (the P V reduction); tensor scales per
    (batch, head). q `[B, T, H, D]`, k/v `[B, S, Hkv, D|Dv]` -> o `[B, T, H, Dv]` in q's dtype. Not a kernel."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    k = smooth_keys(k).to(q.dtype) if smooth_k else k
    qh = fake_nvfp4(q, -1, keep=(0, 2))
    kh = fake_nvfp4(k, -1, keep=(0, 2)).repeat_interleave(H // Hkv, 2)
    vh = fake_nvfp4(v, 1, keep=(0, 2)).repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bthd,bshd->bhts", qh, kh) * scale
    s = s.masked_fill(~visibility(B, H, T, S, causal=causal, device=q.device), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    o = torch.einsum("bhts,bshd->bhtd", fake_nvfp4(p, -1, keep=(0, 1, 2)), vh)
    return (o / torch.where(l > 0, l, torch.ones_like(l))).transpose(1, 2)
