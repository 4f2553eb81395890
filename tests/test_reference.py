"""The float64 references agree with torch's SDPA and with each other (recurrent == parallel)."""
import pytest
import torch
import torch.nn.functional as F

from effattn.reference import linear_parallel, linear_recurrent, softmax_attention
from effattn.reference.softmax import visibility


def _sdpa(q, k, v, mask, scale=None):
    """torch SDPA on [B, T, H, D] float64 inputs with an explicit boolean mask [B, H, T, S]."""
    H, Hkv = q.shape[2], k.shape[2]
    kk, vv = (x.repeat_interleave(H // Hkv, dim=2).transpose(1, 2) for x in (k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def _qkv(B, T, S, H, Hkv, D, Dv=None):
    g = torch.Generator().manual_seed(T * 31 + S)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, T, H, D), r(B, S, Hkv, D), r(B, S, Hkv, Dv or D)


@pytest.mark.parametrize("T,S", [(13, 13), (7, 19), (19, 7)])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("kind", ["none", "causal", "window", "window_causal", "mask", "mask_fn"])
def test_softmax_matches_sdpa(T, S, Hkv, kind):
    B, H, D = 2, 4, 8
    q, k, v = _qkv(B, T, S, H, Hkv, D, Dv=5)
    opts, mask = {}, None
    if kind in ("causal", "window_causal"):
        opts["causal"] = True
    if kind.startswith("window"):
        opts["window"] = (3, 2)
    if kind == "mask":
        mask = torch.rand(B, H, T, S, generator=torch.Generator().manual_seed(1)) > 0.3
        opts["mask"] = mask
    if kind == "mask_fn":
        opts["mask"] = lambda b, h, qi, ki: (qi + ki + h) % 3 != 0
    o, lse = softmax_attention(q, k, v, return_lse=True, **opts)
    keep = visibility(B, H, T, S, causal=opts.get("causal", False), window=opts.get("window"),
                      mask=opts.get("mask"))
    full_rows = keep.any(-1)  # SDPA gives NaN on empty rows; ours gives 0 and LSE -inf
    ref = _sdpa(q, k, v, keep).nan_to_num(0.0)
    assert torch.allclose(o, ref, atol=1e-12)
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H // Hkv, 2)) * D ** -0.5
    ref_lse = torch.logsumexp(scores.masked_fill(~keep, -float("inf")), -1)
    assert torch.allclose(lse[full_rows], ref_lse[full_rows], atol=1e-12)
    assert torch.isneginf(lse[~full_rows]).all()
    assert (o.transpose(1, 2)[~full_rows] == 0).all()


def test_causal_is_bottom_right_aligned():
    keep = visibility(1, 1, 2, 4, causal=True)[0, 0]
    assert keep.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_softcap_matches_explicit_formula():
    q, k, v = _qkv(1, 6, 9, 2, 2, 4)
    o = softmax_attention(q, k, v, softcap=2.0, scale=0.7)
    s = torch.einsum("bthd,bshd->bhts", q, k) * 0.7
    p = torch.softmax(2.0 * torch.tanh(s / 2.0), -1)
    assert torch.allclose(o, torch.einsum("bhts,bshd->bthd", p, v), atol=1e-12)


GATES = [("none", False), ("scalar", False), ("vector", False), ("none", True), ("scalar", True),
         ("vector", True)]


@pytest.mark.parametrize("gate,delta", GATES)
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_recurrent_equals_parallel(gate, delta, with_state):
    g = torch.Generator().manual_seed(3)
    B, T, H, Dk, Dv = 2, 23, 3, 6, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, Dk), F.normalize(r(B, T, H, Dk), dim=-1), r(B, T, H, Dv)
    gsh = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, Dk)}[gate]
    gates = None if gsh is None else F.logsigmoid(r(*gsh) + 1.0) * 3.0  # strong decays, log space
    beta = torch.sigmoid(r(B, T, H)) if delta or gate == "scalar" else None
    s0 = r(B, H, Dk, Dv) if with_state else None
    kw = dict(g=gates, beta=beta, initial_state=s0, output_final_state=True, delta_rule=delta, scale=0.5)
    o_r, s_r = linear_recurrent(q, k, v, **kw)
    o_p, s_p = linear_parallel(q, k, v, **kw)
    assert torch.allclose(o_r, o_p, atol=1e-10)
    assert torch.allclose(s_r, s_p, atol=1e-10)


def test_linear_recurrence_matches_hand_computation():
    """One head, T=2, scalar gates a = (0.5, 0.25): S1 = a1 * 0 + k1^T v1, S2 = a2 S1 + k2^T v2."""
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0]], [[2.0]]]], dtype=torch.float64)
    g = torch.log(torch.tensor([[[0.5], [0.25]]], dtype=torch.float64))
    o = linear_recurrent(q, k, v, g=g, scale=1.0)
    S1 = torch.tensor([[1.0], [2.0]])  # the gate a1 = 0.5 multiplies the zero initial state
    S2 = 0.25 * S1 + torch.tensor([[6.0], [0.0]])
    assert torch.allclose(o[0, 0, 0], (torch.tensor([1.0, 0.0]) @ S1).double())
    assert torch.allclose(o[0, 1, 0], (torch.tensor([0.0, 1.0]) @ S2).double())
