"""Quantisers of the quantized attention methods (SageAttention 1/2, FlashAttention-3 FP8, SageAttention3 FP4).

Every quantiser is a deterministic rule evaluated in float32 (float64 inputs are rounded to float32 first),
so the kernels' inputs, the float64 reference of the quantised algorithm and the plain-PyTorch baseline all
see bit-identical integer / FP8 codes. Tensors use the API layout `[B, N, H, D]`; token groups run along N
per (batch, head), and a scale is stored per token (`[B, H, N]`, each token holding its group's scale) so
the kernel reads the same way at every granularity.

    int8:  s = max|x_group| / 127,  x_q = sign(y) floor(|y| + 1/2), y = x / s   (SageAttention, Eq. 3)
    fp8:   s = max|x_group| / 448,  x_q = e4m3(x / s)                           (FlashAttention-3 FP8)
    smoothing: K <- K - mean_tokens(K), which adds a per-row constant to Q K^T (softmax-invariant)
"""
from __future__ import annotations

import math

import torch

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP8 = torch.float8_e4m3fn
V_PAD = 128  # FP8 V^T codes are zero-padded to a multiple of this many tokens: every key tile of the FP8
#              kernel (64 or 128 keys) then loads without a mask
P_TILE = 64  # keys per tile of the FP8 P V reference (the running max that P's e4m3 rounding sees)


def _groups(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, int]:
    """x `[B, N, H, D]` in float32 as `[B, H, G, group, D]` (zero-padded), and N. group None: all tokens."""
    B, N, H, D = x.shape
    g = N if group is None else group
    G = -(-N // max(g, 1))
    xf = x.to(torch.float32).permute(0, 2, 1, 3)
    pad = G * g - N
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    return xf.reshape(B, H, G, g, D), N


def _group_scales(x: torch.Tensor, group: int | None, qmax: float) -> torch.Tensor:
    """Per-token scale `[B, H, N]` (float32): max|x| over the token's group / qmax, 1 for an all-zero group."""
    xg, N = _groups(x, group)
    amax = xg.abs().amax(dim=(3, 4))
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale.repeat_interleave(xg.shape[3], dim=2)[:, :, :N].contiguous()


def quantize_int8(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 quantisation per group of `group` tokens (None: per head). x `[B, N, H, D]` ->
    (codes int8 `[B, N, H, D]`, scale float32 `[B, H, N]`); x ~= codes * scale."""
    scale = _group_scales(x, group, INT8_MAX)
    y = x.to(torch.float32) / scale.transpose(1, 2)[..., None]
    return (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8), scale  # half away from zero


def quantize_fp8(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 quantisation per group of `group` tokens (None: per head), scaled so the group's largest
    magnitude maps to 448. x `[B, N, H, D]` -> (codes float8_e4m3fn, scale float32 `[B, H, N]`)."""
    scale = _group_scales(x, group, FP8_MAX)
    return (x.to(torch.float32) / scale.transpose(1, 2)[..., None]).to(FP8), scale


def quantize_v_fp8(v: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 V with one scale per channel over all of the head's tokens (SageAttention2's per-channel V;
    per_head: one scale per head, FlashAttention-3's). A scale constant along the keys leaves the P V product
    unscaled in the kernel's loop: the scale multiplies the output once, at the end.

    v `[B, S, H, Dv]` -> (codes float8_e4m3fn `[B, H, Dv, S_pad]` token-contiguous, as the PV product's
    B operand wants, with S_pad = S rounded up to V_PAD and zeros past S; scale float32 `[B, H, Dv]`)."""
    B, S, H, Dv = v.shape
    vt = v.to(torch.float32).permute(0, 2, 3, 1)  # [B, H, Dv, S]
    scale = v_fp8_scale(v, per_head)
    out = torch.zeros(B, H, Dv, -(-S // V_PAD) * V_PAD, dtype=FP8, device=v.device)
    out[..., :S] = (vt / scale[..., None]).to(FP8)
    return out, scale


def v_fp8_scale(v: torch.Tensor, per_head: bool) -> torch.Tensor:
    """`quantize_v_fp8`'s scale `[B, H, Dv]` (float32): max |v| over the tokens (and channels: per_head) / 448,
    1 where that is 0."""
    amax = v.abs().amax(dim=(1, 3) if per_head else 1, keepdim=per_head).to(torch.float32)  # exact in any dtype
    amax = amax[:, 0].expand(-1, -1, v.shape[3]) if per_head else amax
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).contiguous()


def dequantize_v_fp8(codes: torch.Tensor, scale: torch.Tensor, S: int, dtype) -> torch.Tensor:
    """Inverse of `quantize_v_fp8`: `[B, S, H, Dv]` in `dtype`."""
    return (codes[..., :S].to(dtype) * scale.to(dtype)[..., None]).permute(0, 3, 1, 2)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """codes `[B, N, H, D]` (int8 or fp8) times the per-token scale `[B, H, N]`, in `dtype`."""
    return codes.to(dtype) * scale.transpose(1, 2)[..., None].to(dtype)


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its per-channel mean over tokens (SageAttention Sec. 4.2), in float32: q . (k_j - mean)
    differs from q . k_j by a constant per query row, which the softmax cancels, while outlier channels
    shared by all keys no longer set the quantisation scale."""
    return k.to(torch.float32) - k.mean(dim=1, keepdim=True, dtype=torch.float32)


def hadamard(d: int, seed: int = 0, device=None) -> torch.Tensor:
    """Random orthogonal Hadamard rotation `[d, d]` (float32): H_d diag(signs) / sqrt(d), d a power of 2.
    Q K^T is unchanged under q -> q R, k -> k R; the rotation spreads outlier channels over all channels
    (incoherent processing, FlashAttention-3 Sec. 3.3)."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen).to(torch.float32) * 2 - 1
    return (h * signs[None, :] / math.sqrt(d)).to(device)
