"""Quantized KV caches: KIVI (Liu et al. 2024) and a per-token 8-bit variant (survey Table 4, KV storage).

KIVI quantizes keys per channel (one scale/zero per channel over a group of `key_group` tokens: key
outliers sit in fixed channels) and values per token (one scale/zero per `value_group` channels of a
token), to 2 or 4 bits, and keeps the most recent tokens in full precision (the residual window, between
`residual` and `residual + key_group - 1` of them, since a key group is quantized only once complete).
`key_axis="token"` quantizes keys per token like values; with 8 bits and `residual=0` this is the INT8
per-token cache. The decode kernel dequantises the packed codes in its tile loader; the residual is a
second, full-precision segment merged with the same LSE rule.

KVQuant (Hooper et al. 2024) quantizes keys per channel *before* RoPE (rotation mixes channel pairs and
smears the outlier channels) and keeps a dense-and-sparse split: the largest-magnitude entries of each
key are stored apart in full precision and left out of the quantization ranges. `pre_rope=True` stores
pre-RoPE keys (append keys before rotary embedding; the kernel rotates them at their positions) and
`key_outliers=n` keeps n sparse outliers per key vector (a fixed count per token here, rather than
KVQuant's calibrated thresholds; uniform codes rather than its non-uniform datatype).
"""
from __future__ import annotations

import torch

from ..hardware.decode_kernels import KVSegment, Quant
from ..validate import check_choice, check_positive_int
from .base import KVCacheBase
from .quantize import BITS, dequantize, pack, quantize, rotate, unpack


class QuantizedKVCache(KVCacheBase):
    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, head_dim_v: int | None = None, *,
                 key_bits: int = 4, value_bits: int = 4, key_axis: str = "channel", key_group: int = 32,
                 value_group: int = 32, residual: int = 32, pre_rope: bool = False, rope_base: float = 10000.0,
                 key_outliers: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__(kv_heads, head_dim, head_dim_v, dtype, device)
        check_positive_int("batch", batch)
        check_positive_int("max_len", max_len)
        check_choice("key_bits", key_bits, BITS)
        check_choice("value_bits", value_bits, BITS)
        check_choice("key_axis", key_axis, ("channel", "token"))
        check_positive_int("key_group", key_group, power_of_two=True)
        check_positive_int("value_group", value_group, power_of_two=True)
        check_positive_int("residual", residual, minimum=0)
        check_positive_int("key_outliers", key_outliers, minimum=0)
        if key_outliers > head_dim:
            raise ValueError(f"key_outliers={key_outliers} must be <= head_dim={head_dim}")
        if not (isinstance(rope_base, (int, float)) and rope_base > 1):
            raise ValueError(f"rope_base must be a number > 1, got {rope_base!r}")
        self.pre_rope, self.rope_base, self.key_outliers = bool(pre_rope), float(rope_base), key_outliers
        Dv = self.head_dim_v
        if key_axis == "token" and head_dim % key_group:
            raise ValueError(f"key_group={key_group} must divide head_dim={head_dim} for per-token keys")
        if Dv % value_group:
            raise ValueError(f"value_group={value_group} must divide head_dim_v={Dv}")
        for name, dim, bits in (("head_dim", head_dim, key_bits), ("head_dim_v", Dv, value_bits)):
            if dim % (8 // bits):
                raise ValueError(f"{name}={dim} must be a multiple of {8 // bits} to pack {bits}-bit codes")
        self.batch, self.max_len, self.key_axis = batch, max_len, key_axis
        self.key_bits, self.value_bits, self.residual = key_bits, value_bits, residual
        self.key_group, self.value_group = key_group, value_group
        self.token_group = key_group if key_axis == "channel" else 1  # tokens quantized together
        sdtype = torch.float32 if dtype in (torch.float32, torch.float64) else torch.float16
        dev = self.device
        kw = dict(dtype=torch.uint8, device=dev)
        self.k_codes = torch.zeros(batch, max_len, kv_heads, head_dim * key_bits // 8, **kw)
        self.v_codes = torch.zeros(batch, max_len, kv_heads, Dv * value_bits // 8, **kw)
        k_rows, k_cols = ((-(-max_len // key_group), head_dim) if key_axis == "channel"
                          else (max_len, head_dim // key_group))
        self.k_scale = torch.zeros(batch, k_rows, kv_heads, k_cols, dtype=sdtype, device=dev)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(batch, max_len, kv_heads, Dv // value_group, dtype=sdtype, device=dev)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.k_out_idx = torch.zeros(batch, max_len, kv_heads, key_outliers, dtype=torch.int32, device=dev)
        self.k_out_val = torch.zeros(batch, max_len, kv_heads, key_outliers, dtype=dtype, device=dev)
        window = residual + self.token_group
        self.k_res = torch.zeros(batch, window, kv_heads, head_dim, dtype=dtype, device=dev)
        self.v_res = torch.zeros(batch, window, kv_heads, Dv, dtype=dtype, device=dev)
        self.lengths = [0] * batch
        self.quantized = [0] * batch  # tokens [0, quantized[b]) are codes, the rest is the residual

    def _quantize_keys(self, x: torch.Tensor):  # x [n, Hkv, D], n a multiple of token_group
        """codes, scale, zero, and the sparse outliers (channel index, value) `[n, Hkv, key_outliers]`."""
        idx = x.abs().topk(self.key_outliers, dim=-1).indices  # largest-magnitude entries of each key
        val = torch.gather(x, -1, idx)
        exclude = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        if self.key_axis == "channel":
            shape = (-1, self.key_group, *x.shape[1:])  # [groups, G, Hkv, D]
            codes, scale, zero = quantize(x.reshape(shape), self.key_bits, 1, exclude.reshape(shape))
            return codes.reshape(x.shape), scale[:, 0], zero[:, 0], idx, val
        shape = (*x.shape[:-1], -1, self.key_group)
        codes, scale, zero = quantize(x.reshape(shape), self.key_bits, -1, exclude.reshape(shape))
        return codes.reshape(x.shape), scale[..., 0], zero[..., 0], idx, val

    def _quantize_values(self, x: torch.Tensor):
        g = x.reshape(*x.shape[:-1], -1, self.value_group)
        codes, scale, zero = quantize(g, self.value_bits, dim=-1)
        return codes.reshape(x.shape), scale[..., 0], zero[..., 0]

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Append k `[B, T, Hkv, D]`, v `[B, T, Hkv, Dv]` (first `lengths[b]` tokens of row b): they enter
        the residual window, whose oldest complete groups beyond `residual` tokens are then quantized."""
        lengths = self._check_append(k, v, self.batch, lengths)
        over = [b for b, n in enumerate(lengths) if self.lengths[b] + n > self.max_len]
        if over:
            raise ValueError(f"append would exceed max_len={self.max_len} for sequences {over}")
        G = self.token_group
        for b, n in enumerate(lengths):
            Lq, L = self.quantized[b], self.lengths[b]
            pending_k = torch.cat([self.k_res[b, :L - Lq], k[b, :n]])  # residual + new, in token order
            pending_v = torch.cat([self.v_res[b, :L - Lq], v[b, :n]])
            L += n
            new_q = max(Lq, max(0, L - self.residual) // G * G)
            if new_q > Lq:
                self._store_codes(b, Lq, pending_k[:new_q - Lq], pending_v[:new_q - Lq])
            rest = L - new_q
            self.k_res[b, :rest] = pending_k[new_q - Lq:]
            self.v_res[b, :rest] = pending_v[new_q - Lq:]
            self.lengths[b], self.quantized[b] = L, new_q
        self._memo = None

    def _store_codes(self, b: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize tokens k `[n, Hkv, D]`, v `[n, Hkv, Dv]` into positions [start, start + n)."""
        n = k.shape[0]
        kc, ks, kz, oi, ov = self._quantize_keys(k)
        self.k_out_idx[b, start:start + n], self.k_out_val[b, start:start + n] = oi.to(torch.int32), ov
        vc, vs, vz = self._quantize_values(v)
        self.k_codes[b, start:start + n] = pack(kc, self.key_bits)
        self.v_codes[b, start:start + n] = pack(vc, self.value_bits)
        if self.key_axis == "channel":
            rows = slice(start // self.key_group, (start + n) // self.key_group)
        else:
            rows = slice(start, start + n)
        self.k_scale[b, rows], self.k_zero[b, rows] = ks, kz
        self.v_scale[b, start:start + n], self.v_zero[b, start:start + n] = vs, vz

    def _build_segments(self, seq_ids):
        lengths = self.batch_lengths(seq_ids)
        totals = self._lengths_tensor(lengths)
        quant = self._lengths_tensor(self.quantized)
        k_gn, k_gd = (self.key_group, 1) if self.key_axis == "channel" else (1, self.key_group)
        rope = self.rope_base if self.pre_rope else None
        body = KVSegment(self.k_codes, self.v_codes, quant, torch.zeros_like(quant), max(self.quantized),
                         k_quant=Quant(self.key_bits, self.k_scale, self.k_zero, k_gn, k_gd,
                                       self.k_out_idx if self.key_outliers else None, self.k_out_val),
                         v_quant=Quant(self.value_bits, self.v_scale, self.v_zero, 1, self.value_group),
                         rope_base=rope)
        res_len = [L - q for L, q in zip(lengths, self.quantized)]
        residual = KVSegment(self.k_res, self.v_res, self._lengths_tensor(res_len), quant, max(res_len),
                             rope_base=rope)
        segs = [s for s in (body, residual) if s.max_len > 0]
        return segs or [residual], totals

    def keys_values(self, b: int, dtype=None):
        """Dequantised keys `[L, Hkv, D]` (rotated to their positions when stored pre-RoPE) and values
        `[L, Hkv, Dv]` of sequence b, computed in `dtype`."""
        dtype = dtype or self.dtype
        Lq, L = self.quantized[b], self.lengths[b]
        kc = unpack(self.k_codes[b, :Lq], self.key_bits)
        vc = unpack(self.v_codes[b, :Lq], self.value_bits)
        if self.key_axis == "channel":
            rows = torch.arange(Lq, device=self.device) // self.key_group
            k = dequantize(kc, self.k_scale[b, rows], self.k_zero[b, rows], dtype)
        else:
            rep = self.key_group
            k = dequantize(kc, self.k_scale[b, :Lq].repeat_interleave(rep, -1),
                           self.k_zero[b, :Lq].repeat_interleave(rep, -1), dtype)
        rep = self.value_group
        v = dequantize(vc, self.v_scale[b, :Lq].repeat_interleave(rep, -1),
                       self.v_zero[b, :Lq].repeat_interleave(rep, -1), dtype)
        k = k.scatter(-1, self.k_out_idx[b, :Lq].long(), self.k_out_val[b, :Lq].to(dtype))  # sparse part
        k = torch.cat([k, self.k_res[b, :L - Lq].to(dtype)])
        v = torch.cat([v, self.v_res[b, :L - Lq].to(dtype)])
        return (rotate(k, self.rope_base, dtype) if self.pre_rope else k), v

    def nbytes(self) -> int:
        """Bytes of storage per the tokens held (codes + scales + residual), for memory reports."""
        per_code = self.kv_heads * (self.head_dim * self.key_bits + self.head_dim_v * self.value_bits) // 8
        scales = (self.k_scale[0, 0].numel() / (self.token_group) + self.v_scale[0, 0].numel())
        scale_bytes = 2 * scales * self.kv_heads * self.k_scale.element_size()
        res = self.kv_heads * (self.head_dim + self.head_dim_v) * self.k_res.element_size()
        return int(sum(q * (per_code + scale_bytes) + (L - q) * res for q, L in zip(self.quantized, self.lengths)))


def kivi_cache(batch, max_len, kv_heads, head_dim, *, bits: int = 4, group: int = 32, residual: int = 32, **kw):
    """KIVI-2/KIVI-4: per-channel keys, per-token values, full-precision residual window."""
    check_choice("bits", bits, (2, 4))
    return QuantizedKVCache(batch, max_len, kv_heads, head_dim, key_bits=bits, value_bits=bits,
                            key_axis="channel", key_group=group, value_group=group, residual=residual, **kw)


def kvquant_cache(batch, max_len, kv_heads, head_dim, *, bits: int = 4, group: int = 32, outliers: int = 1,
                  residual: int = 32, rope_base: float = 10000.0, **kw):
    """KVQuant-style: per-channel keys quantized before RoPE with `outliers` sparse full-precision entries
    per key vector, per-token values; append pre-RoPE keys."""
    return QuantizedKVCache(batch, max_len, kv_heads, head_dim, key_bits=bits, value_bits=bits,
                            key_axis="channel", key_group=group, value_group=group, residual=residual,
                            pre_rope=True, rope_base=rope_base, key_outliers=outliers, **kw)


def int8_cache(batch, max_len, kv_heads, head_dim, *, group: int | None = None, **kw):
    """8-bit per-token keys and values (one scale per token and head, or per `group` channels)."""
    return QuantizedKVCache(batch, max_len, kv_heads, head_dim, key_bits=8, value_bits=8, key_axis="token",
                            key_group=group or head_dim, value_group=group or head_dim, residual=0, **kw)
