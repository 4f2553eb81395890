"""Input checks for the public boundary. Each error names the argument, what it got and what it expects.

Kernels assume these checks passed and contain none of their own (STYLE.md, rule 6).
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t: Any, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 layout: str = "") -> torch.Tensor:
    """`t` is a tensor of rank `ndim` (layout like "[B, T, H, D]" for the message) and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' ' + layout if layout else ''}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got {_describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def check_qkv(q: Any, k: Any, v: Any, *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
              head_dims: Iterable[int] | None = None, same_length: bool = False) -> tuple[int, ...]:
    """Validate q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]` with `H % Hkv == 0`.

    Returns (B, T, S, H, Hkv, D, Dv).
    """
    dtypes = tuple(dtypes)
    check_tensor("q", q, ndim=4, dtypes=dtypes, layout="[B, T, H, D]")
    check_tensor("k", k, ndim=4, dtypes=dtypes, layout="[B, S, Hkv, D]")
    check_tensor("v", v, ndim=4, dtypes=dtypes, layout="[B, S, Hkv, Dv]")
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    B, T, H, D = q.shape
    Bk, S, Hkv, Dk = k.shape
    Bv, Sv, Hv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k has B={Bk}, v has B={Bv}")
    if Dk != D:
        raise ValueError(f"k must have head dim D={D} like q ([B, S, Hkv, D]), got k {_describe(k)}")
    if Sv != S or Hv != Hkv:
        raise ValueError(f"v must match k in length and heads: k has S={S}, Hkv={Hkv}; v {_describe(v)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the key/value heads Hkv={Hkv}")
    if same_length and S != T:
        raise ValueError(f"q and k must have the same length for this method, got T={T} and S={S}")
    if head_dims is not None:
        head_dims = tuple(head_dims)
        if D not in head_dims:
            raise ValueError(f"unsupported head dim D={D} (q {_describe(q)}); supported: {head_dims}")
    return B, T, S, H, Hkv, D, Dv


def check_options(method_name: str, given: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Every key of `given` must be an option the method takes, with a did-you-mean for typos."""
    accepted = list(accepted)
    for key in given:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(
                f"method {method_name!r} got an unknown option {key!r}{hint} "
                f"(it takes: {', '.join(accepted) or 'no options'})"
            )


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value: Any, *, power_of_two: bool = False, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def check_scale(scale: Any) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number or None (meaning D ** -0.5), got {scale!r}")


def normalize_window(window: Any, causal: bool) -> tuple[int, int] | None:
    """`window` None, an int w (meaning (w, w)) or a pair (left, right) of non-negative ints.

    Query i (aligned to key position i + S - T) sees keys j with pos - left <= j <= pos + right; causal
    clips right to 0.
    """
    if window is None:
        return None
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, window)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be None, an int or a (left, right) pair of ints, got {window!r}")
    left, right = window
    if left < 0 or right < 0:
        raise ValueError(f"window sizes must be >= 0, got (left={left}, right={right})")
    return (left, 0 if causal else right)


def check_softcap(softcap: Any) -> None:
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


def check_cu_seqlens(cu_seqlens: Any, q: torch.Tensor, total_k: int | None = None,
                     name: str = "cu_seqlens") -> torch.Tensor:
    """Packed varlen batches: int32 `[num_seqs + 1]`, starting at 0, non-decreasing, ending at the length."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), layout="[num_seqs + 1]")
    if q.shape[0] != 1:
        raise ValueError(f"{name} requires packed inputs with batch size 1, got q with B={q.shape[0]}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {cu_seqlens.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets, got {cu_seqlens.numel()}")
    c = cu_seqlens.cpu()
    total = q.shape[1] if total_k is None else total_k
    if int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length {total}, "
                         f"got {c.tolist()}")
    return cu_seqlens
