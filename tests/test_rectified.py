"""Rectified SpaAttn's attention function against its float64 reference, and the properties that define it.

The Triton kernels (the fused R * O_spa + C epilogue included) run under TRITON_INTERPRET=1 in a subprocess, as
test_block_sparse.py does for the block-sparse tests (the interpreter must be on before triton is imported)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from interpreter import run_under_interpreter
from diffattn.kernels import block_sparse_attention
from diffattn.methods.rectified import (
    rectified_attention,
    rectified_attention_reference,
    rectified_plan,
    threshold_select,
)
from diffattn.methods.rectified_core import sorted_select
from metrics import rel_error


def _inputs(B, H, Sq, Sk, D, T, pad, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g, dtype=dtype) * 1.5
    k = torch.randn(B, H, Sk, D, generator=g, dtype=dtype) * 1.5
    v = torch.randn(B, H, Sk, D, generator=g, dtype=dtype)
    ek = torch.randn(B, H, T, D, generator=g, dtype=dtype) if T else None
    ev = torch.randn(B, H, T, D, generator=g, dtype=dtype) if T else None
    em = None
    if T and pad:
        em = torch.ones(B, T, dtype=torch.bool)
        em[-1, T - pad:] = False  # the last batch element's prompt is shorter
    return q, k, v, ek, ev, em


CASES = [
    # B, H, Sq, Sk, D, bs, T, pad, tau, k_min, gapr
    (2, 3, 77, 77, 8, 16, 0, 0, 0.3, 1, True),
    (1, 2, 64, 64, 16, 16, 5, 0, 0.5, 0.25, False),
    (2, 2, 53, 53, 8, 16, 7, 3, 0.6, 2, True),
    (2, 1, 40, 71, 4, 32, 4, 2, 0.2, 0, True),
]


@pytest.mark.parametrize("B,H,Sq,Sk,D,bs,T,pad,tau,k_min,gapr", CASES)
@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_matches_float64_reference(B, H, Sq, Sk, D, bs, T, pad, tau, k_min, gapr, backend):
    q, k, v, ek, ev, em = _inputs(B, H, Sq, Sk, D, T, pad)
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    forced = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
    forced[..., 0] = True  # e.g. a first-frame column
    kw = dict(block_size=bs, tau=tau, k_min=k_min, gapr=gapr, extra_k=ek, extra_v=ev, extra_mask=em, forced_blocks=forced)
    out, stats = rectified_attention(q, k, v, return_stats=True, backend=backend, **kw)
    ref, ref_mask = rectified_attention_reference(q, k, v, **kw)
    for selection in ("threshold", "sort"):
        plan = rectified_plan(q, k, v, selection=selection, **{n: kw[n] for n in kw if n != "extra_v"})
        assert torch.equal(plan.block_mask, ref_mask)
    assert 0 < stats["density"] < 1
    assert rel_error(out, ref) < 1e-5
    if em is not None:  # padding really is left out: changing padded keys changes nothing
        ek2, ev2 = ek.clone(), ev.clone()
        ek2[-1, :, T - pad:] = 50.0
        ev2[-1, :, T - pad:] = -50.0
        out2 = rectified_attention(q, k, v, backend=backend, **{**kw, "extra_k": ek2, "extra_v": ev2})
        assert torch.equal(out, out2)


def test_gradients_match_reference():
    q, k, v, ek, ev, em = _inputs(2, 2, 45, 45, 8, 5, 2, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, ek, ev)]
    kw = dict(block_size=16, tau=0.4, k_min=1, gapr=True, extra_k=ek, extra_v=ev, extra_mask=em)
    w = torch.randn(2, 2, 45, 8, dtype=torch.float64)
    out = rectified_attention(q, k, v, backend="blocked", **kw)
    g = torch.autograd.grad((out * w).sum(), leaves)
    ref, _ = rectified_attention_reference(q, k, v, **kw)
    gr = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(g, gr):
        assert torch.isfinite(a).all()
        assert rel_error(a, b) < 1e-9
    assert g[0].abs().sum() > 0 and g[3].abs().sum() > 0


@pytest.mark.parametrize("T,pad", [(0, 0), (6, 2)])
def test_tau_at_least_one_is_dense(T, pad):
    q, k, v, ek, ev, em = _inputs(2, 2, 50, 50, 8, T, pad)
    out, stats = rectified_attention(q, k, v, block_size=16, tau=1.0, extra_k=ek, extra_v=ev, extra_mask=em,
                                     return_stats=True)
    assert stats["density"] == 1.0
    kk = torch.cat([k, ek], 2) if T else k
    vv = torch.cat([v, ev], 2) if T else v
    mask = None
    if em is not None:
        mask = torch.cat([torch.ones(2, 50, dtype=torch.bool), em], 1)[:, None, None, :]
    dense = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    assert rel_error(out, dense) < 1e-5


def test_rectification_off_is_plain_block_sparse_on_the_same_selection():
    q, k, v, ek, ev, _ = _inputs(2, 2, 70, 70, 8, 4, 0)
    kw = dict(block_size=16, tau=0.3, k_min=1, gapr=True, extra_k=ek)
    plan = rectified_plan(q, k, v, **kw)
    out = rectified_attention(q, k, v, extra_v=ev, rectify=False, **kw)
    plain = block_sparse_attention(q, k, v, plan.block_mask, block_size=16, extra_k=ek, extra_v=ev)
    assert torch.equal(out, plain)
    # and R = 1, C = 0 through the epilogue is the same kernel result
    ones = torch.ones(plan.out_scale.shape)
    zeros = torch.zeros(plan.out_bias.shape)
    fused = block_sparse_attention(q, k, v, plan.block_mask, block_size=16, extra_k=ek, extra_v=ev, out_scale=ones,
                                   out_bias=zeros)
    assert rel_error(fused, plain) < 1e-6
    rect = rectified_attention(q, k, v, extra_v=ev, **{**kw, "gapr": False})  # random tokens: GAPR flags every block
    assert not torch.allclose(rect, plain)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_tokens_per_block_give_dense_for_any_selection(seed):
    """Pooling is exact when every block's tokens are equal: R * O_spa + C is then full attention."""
    g = torch.Generator().manual_seed(seed)
    B, H, S, D, bs, T = 2, 2, 61, 8, 16, 3  # short last block (13 tokens)
    nb = math.ceil(S / bs)
    q, k, v = (torch.randn(B, H, nb, D, generator=g).repeat_interleave(bs, 2)[:, :, :S] for _ in range(3))
    ek, ev = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    forced = torch.rand(B, H, nb, nb, generator=g) < 0.3
    out = rectified_attention(q, k, v, block_size=bs, tau=0.0, k_min=0, gapr=False, extra_k=ek, extra_v=ev,
                              forced_blocks=forced)
    dense = F.scaled_dot_product_attention(q, torch.cat([k, ek], 2), torch.cat([v, ev], 2))
    assert rel_error(out, dense) < 1e-5
    plain = rectified_attention(q, k, v, block_size=bs, tau=0.0, k_min=0, gapr=False, extra_k=ek, extra_v=ev,
                                forced_blocks=forced, rectify=False)
    assert rel_error(plain, dense) > 1e-2  # the selection really drops mass


def test_threshold_search_equals_sorted_cumulative_selection():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, 5, 37, generator=g) * 3, -1)
    budget = torch.rand(4, 5, generator=g) * 0.9
    for k_min in (0, 1, 7, 37):
        keep = threshold_select(p, budget, k_min)
        srt, order = p.sort(-1, descending=True)
        before = srt.cumsum(-1) - srt  # mass strictly above each sorted entry (no ties in random data)
        n = ((before <= budget[..., None]).sum(-1)).clamp(min=k_min)
        want = torch.zeros_like(keep)
        ranks = torch.arange(37).expand_as(srt)
        want.scatter_(-1, order, ranks < n[..., None])
        assert torch.equal(keep, want)
        assert torch.equal(sorted_select(p, budget, k_min), want)


def test_validation_names_the_argument():
    q = torch.randn(1, 1, 20, 8)
    with pytest.raises(ValueError, match="tau"):
        rectified_attention(q, q, q, block_size=16, tau=-0.1)
    with pytest.raises(ValueError, match="k_min"):
        rectified_attention(q, q, q, block_size=16, k_min=1.5)
    with pytest.raises(ValueError, match="extra_mask"):
        rectified_attention(q, q, q, block_size=16, extra_k=q[:, :, :3], extra_v=q[:, :, :3],
                            extra_mask=torch.ones(1, 4, dtype=torch.bool))


def test_triton_kernels_under_interpreter():
    """Runs tests/test_rectified_triton.py in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    run_under_interpreter("test_rectified_triton.py", allow_skips=True)


def test_selection_kernels_under_interpreter():
    """Runs tests/test_rectified_select.py (Triton selection vs its PyTorch path) with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    run_under_interpreter("test_rectified_select.py")


def test_bench_oracle_diagnosis_is_consistent():
    """The bench's block oracle: its pooled column equals rectified_attention (GAPR off) against dense, its top-p
    column equals plain top-p, and on blocks of identical tokens everything but top-p is exact."""
    from diffattn.bench.rectified import oracle_analysis

    g = torch.Generator().manual_seed(7)
    B, H, S, D, bs = 2, 2, 70, 8, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    kw = dict(block_size=bs, tau=0.3, k_min=1, gapr=False)
    plan = rectified_plan(q, k, v, **kw)
    o = oracle_analysis(q, k, v, plan, bs, None, chunk_blocks=2)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert abs(o["err_pooled_rectified_no_gapr"] - rel_error(rectified_attention(q, k, v, **kw), dense)) < 1e-5
    assert abs(o["err_topp"] - rel_error(rectified_attention(q, k, v, rectify=False, **kw), dense)) < 1e-5
    nb = math.ceil(S / bs)
    q, k, v = (torch.randn(B, H, nb, D, generator=g).repeat_interleave(bs, 2)[:, :, :S] for _ in range(3))
    plan = rectified_plan(q, k, v, **kw)
    o = oracle_analysis(q, k, v, plan, bs, None)
    assert o["err_block_oracle"] < 1e-5 and o["err_pooled_rectified_no_gapr"] < 1e-5 and o["err_topp"] > 1e-2
    assert o["dropped_mass_abs_err_mean"] < 1e-5 and o["c_rel_err"] < 1e-4
