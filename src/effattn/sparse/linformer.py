"""Linformer (Wang et al. 2020; survey Sec. 3.3, low-rank attention).

Keys and values are projected along the sequence by learned E, F `[k, S]` (S -> k):
    o = softmax(Q (E K)^T * scale) (F V)
so the score matrix is `[T, k]`: time and memory O(N k d). Non-causal (the projection mixes all
positions). The projected K, V go through the flash kernel.
"""
from __future__ import annotations

from ..hardware.flash import flash_attention
from ..reference.softmax import softmax_attention
from ..validate import check_qkv, check_same, check_scale, check_tensor


def project(x, P):
    """x `[B, S, Hkv, D]`, P `[k, S]` -> `[B, k, Hkv, D]` (one projection shared by the heads)."""
    return (P.to(x.dtype) @ x.flatten(2)).view(x.shape[0], P.shape[0], *x.shape[2:])


def linformer(q, k, v, E, F, *, scale=None):
    """q `[B, T, H, D]`, k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`, E, F `[k, S]` -> o `[B, T, H, Dv]`."""
    B, T, S, H, Hkv, D, Dv = check_qkv(q, k, v)
    check_scale(scale)
    for name, P in (("E", E), ("F", F)):
        check_tensor(name, P, ndim=2, layout="[k, S]")
        check_same("q", q, name, P)
        if P.shape[1] != S:
            raise ValueError(f"{name} must have shape [k, S] with S={S} (the key length), got {tuple(P.shape)}")
    if E.shape[0] != F.shape[0]:
        raise ValueError(f"E and F must project to the same k, got {E.shape[0]} and {F.shape[0]}")
    return flash_attention(q, project(k, E), project(v, F), scale=scale)


def linformer_reference(q, k, v, E, F, *, scale=None, **_ignored):
    return softmax_attention(q, project(k, E), project(v, F), scale=scale)


def linformer_inputs(shape, dtype, device, generator, *, proj=None, **options):
    from ..inputs import randn, softmax_inputs
    from ..inputs import is_small

    proj = (8 if is_small(shape) else 256) if proj is None else proj  # the paper's k = 256
    out = softmax_inputs(shape, dtype, device, generator, **options)
    for name in ("E", "F"):  # std 1/sqrt(S): projected rows keep the scale of K and V rows
        out[name] = randn((proj, shape.S), dtype, device, generator, std=shape.S ** -0.5)
    return out


def _register() -> None:
    from ..registry import KV_CACHE, Complexity, Method, register

    register(Method(
        name="linformer", family="sparse", cite="Wang et al. 2020 (Linformer; survey Sec. 3.3, low rank)",
        fn=linformer, reference=linformer_reference, make_inputs=linformer_inputs,
        complexity=Complexity("O(N k d)", "O(N k)", 1.0, 1.0),
        state_or_cache=KV_CACHE,
        options={"E": None, "F": None, "scale": None}, supports=frozenset({"noncausal", "backward", "gqa"}),
        grad_inputs=("q", "k", "v", "E", "F"), approximates_softmax=True,
        description="keys and values projected N -> k by learned E, F (non-causal)"))


_register()
