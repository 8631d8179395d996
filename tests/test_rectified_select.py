"""The Triton selection of Rectified SpaAttn (`kernels.rectified_select`) against its plain-PyTorch path.

Runs on CUDA when there is a GPU; otherwise only under TRITON_INTERPRET=1 (CPU, small shapes), which
test_rectified.py::test_selection_kernels_under_interpreter arranges in a subprocess."""

from __future__ import annotations

import math

import pytest
import torch

from interpreter import triton_device_and_mark  # noqa: E402

DEV, pytestmark = triton_device_and_mark("test_rectified.py")

from diffattn.kernels.block_sparse import build_block_index  # noqa: E402
from diffattn.kernels.rectified_select import (  # noqa: E402
    block_pool,
    block_pool_torch,
    rectified_select,
    rectified_select_torch,
)
from diffattn.methods.rectified import rectified_plan  # noqa: E402
from metrics import rel_error  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,D,bs", [(77, 8, 16), (64, 24, 32), (33, 16, 64)])
def test_block_pool_matches_torch(S, D, bs, dtype):
    g = torch.Generator().manual_seed(S)
    x = (torch.randn(2, 3, S, D, generator=g) * 2 + 0.5).to(DEV, dtype)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] memory, as the attention processors pass it
    for inp in (x, xt):
        mr, dr = block_pool_torch(inp, bs, with_mad=True)
        for rows in (None, 16):  # the whole block in registers, and 16-row chunks
            m, d = block_pool(inp, bs, with_mad=True, rows=rows)
            assert m.dtype == torch.float32 and m.shape == (2, 3, math.ceil(S / bs), D)
            assert rel_error(m, mr) < 1e-6 and rel_error(d, dr) < 1e-6
    m2, none = block_pool(x, bs)
    assert none is None and torch.equal(m2, block_pool(x, bs, with_mad=True)[0])


CASES = [
    # B, H, Sq, Sk, D, bs, T, pad, tau, k_min, gapr, forced
    (2, 3, 77, 77, 8, 16, 0, 0, 0.3, 1, True, True),
    (1, 2, 64, 64, 16, 16, 5, 0, 0.5, 3, False, False),
    (2, 2, 53, 53, 8, 16, 7, 3, 0.6, 2, True, True),
    (2, 1, 40, 71, 4, 32, 4, 2, 0.2, 0, True, False),
    (2, 2, 300, 300, 16, 16, 9, 4, 0.3, 4, True, True),  # 19 key blocks: a row over several warps
    (1, 1, 50, 50, 8, 16, 0, 0, 1.0, 0, True, False),  # tau 1: everything kept
]


@pytest.mark.parametrize("B,H,Sq,Sk,D,bs,T,pad,tau,k_min,gapr,forced", CASES)
def test_selection_matches_torch(B, H, Sq, Sk, D, bs, T, pad, tau, k_min, gapr, forced):
    g = torch.Generator().manual_seed(Sq * 7 + T)
    q = torch.randn(B, H, Sq, D, generator=g) * 1.5
    k = torch.randn(B, H, Sk, D, generator=g) * 1.5 + torch.randn(1, 1, 1, D, generator=g)  # some block coherence
    v = torch.randn(B, H, Sk, D, generator=g)
    ek = torch.randn(B, H, T, D, generator=g) if T else None
    em = None
    if T and pad:
        em = torch.ones(B, T, dtype=torch.bool)
        em[-1, T - pad:] = False
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    fb = None
    if forced:
        fb = torch.rand(1, H, nq, nk, generator=g) < 0.15
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    ek = ek.to(DEV) if ek is not None else None
    kw = dict(block_size=bs, tau=tau, k_min=k_min, gapr=gapr, extra_k=ek, extra_mask=em, forced_blocks=fb)
    a = rectified_select(q, k, v, **kw)
    b = rectified_select_torch(q, k, v, **kw)
    assert torch.equal(a.keep, b.keep)
    assert torch.equal(a.unsafe, b.unsafe)
    # the row kernel's index lists are exactly the front door's (stable sort of the mask: kept columns ascending,
    # then the dropped ones ascending)
    ref = build_block_index(a.keep)
    assert a.kv_idx.dtype == torch.int32 and a.kv_cnt.dtype == torch.int32
    assert torch.equal(a.kv_cnt, ref.kv_cnt) and torch.equal(a.kv_idx, ref.kv_idx)
    assert b.kv_idx is None and b.kv_cnt is None
    bare = rectified_select(q, k, v, emit_index=False, **kw)
    assert bare.kv_idx is None and torch.equal(bare.keep, a.keep)
    assert not bool((a.unsafe & a.keep).any())  # GAPR marks dropped blocks only
    if not gapr:
        assert not bool(a.unsafe.any())
    assert rel_error(a.probs, b.probs) < 1e-5
    assert (a.text_mass - b.text_mass).abs().max() < 1e-5
    assert (a.out_scale - b.out_scale).abs().max() < 1e-5
    assert rel_error(a.out_bias, b.out_bias) < 1e-4 or b.out_bias.abs().max() == 0
    if tau >= 1:
        assert bool(a.keep.all())
    else:
        assert not bool(a.keep.all())
    if k_min:
        assert int(a.keep.sum(-1).min()) >= k_min
    if fb is not None:
        assert bool((a.keep | ~fb.to(DEV)).all())  # forced blocks are kept


def test_plan_auto_takes_triton_without_grad_and_torch_with_grad():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g).to(DEV) for _ in range(3))
    kw = dict(block_size=16, tau=0.3, k_min=1, gapr=True)
    with torch.no_grad():
        auto = rectified_plan(q, k, v, **kw)
    tri = rectified_plan(q, k, v, selection="triton", **kw)
    thr = rectified_plan(q, k, v, selection="threshold", **kw)
    assert torch.equal(auto.block_mask, tri.block_mask) and torch.equal(tri.block_mask, thr.block_mask)
    assert torch.equal(auto.out_scale, tri.out_scale)
    qg = q.clone().requires_grad_()
    plan = rectified_plan(qg, k, v, **kw)  # needs a gradient: the differentiable PyTorch path
    assert plan.out_scale.requires_grad
    torch.autograd.grad(plan.out_bias.sum() + plan.out_scale.sum(), qg)


@pytest.mark.parametrize("pad", [False, True])
def test_attention_reuses_the_selections_index_lists(monkeypatch, pad):
    """With the Triton selection the front door's forward sorts no mask (the selection's lists are seeded), and the
    output is the one the mask's own lists give."""
    from diffattn.kernels.block_sparse import clear_cache
    from diffattn.kernels.block_sparse import index as index_mod
    from diffattn.methods.rectified import rectified_attention

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 75, 16, generator=g).to(DEV) for _ in range(3))
    ek, ev = (torch.randn(2, 2, 5, 16, generator=g).to(DEV) for _ in range(2))
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEV)
    if pad:
        mask[1, 3:] = False
    kw = dict(block_size=16, tau=0.4, k_min=1, gapr=True, extra_k=ek, extra_v=ev, extra_mask=mask)
    clear_cache()
    sorts = []
    real = index_mod._csr_rows
    monkeypatch.setattr(index_mod, "_csr_rows", lambda m: sorts.append(tuple(m.shape)) or real(m))
    with torch.no_grad():
        out = rectified_attention(q, k, v, **kw)
    assert sorts == []
    import diffattn.methods.rectified_core as core

    monkeypatch.setattr(core, "seed_block_index", lambda *a: None)
    clear_cache()
    with torch.no_grad():
        again = rectified_attention(q, k, v, **kw)
    assert sorts  # without the seed the front door sorts the mask itself
    assert torch.equal(out, again)
