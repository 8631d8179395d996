"""The Triton row gather of the block-sparse lowering (neighborhood/permute_triton.py) against the torch
permutation, on CUDA, or on CPU under TRITON_INTERPRET=1 (the last test re-runs this file so)."""

from __future__ import annotations

import pytest
import torch

from interpreter import INTERP, run_under_interpreter, triton_device_and_mark

DEVICE, MARK = triton_device_and_mark("test_neighborhood_permute_triton.py")


@MARK
@pytest.mark.parametrize("shape,qt,kt,dil,B,H,D", [
    ((6, 10, 12), (1, 4, 4), (2, 2, 4), (1, 1, 1), 2, 3, 16),  # padded tiles, unequal tile shapes
    ((10, 13, 16), (2, 1, 8), (2, 1, 8), (1, 1, 2), 2, 2, 32),  # dilation groups
    ((7, 9), (4, 2), (4, 2), (2, 3), 1, 5, 16),
    ((40,), (16,), (16,), (1,), 3, 1, 64),
])
def test_gather_matches_torch_permutation(shape, qt, kt, dil, B, H, D, monkeypatch):
    from diffattn.kernels.neighborhood.checks import normalize_params
    from diffattn.kernels.neighborhood.lowering import BlockSparseLowering, permute_rows, unpermute_rows
    from diffattn.kernels.neighborhood import permute_triton
    from diffattn.kernels.neighborhood.tiling import make_plan

    calls = []
    real = permute_triton.gather_rows
    monkeypatch.setattr(permute_triton, "gather_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = normalize_params(shape, 1, 1, dil, False)
    plan = make_plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, qt, kt)
    low = BlockSparseLowering(plan, p.shape, p.dilation)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *shape, H, D, generator=g).to(DEVICE, torch.float16)
    for got_of, tile in ((low.permute_q, qt), (low.permute_kv, kt)):
        got = got_of(x)
        want = permute_rows(x, tile, dil)
        assert got.shape == want.shape and torch.equal(got, want)
    # a strided input (a slice of a wider head axis): same result
    wide = torch.randn(B, *shape, H + 2, D, generator=g).to(DEVICE, torch.float16)[..., 1:H + 1, :]
    assert torch.equal(low.permute_q(wide), permute_rows(wide, qt, dil))
    # the inverse from token-major and from head-major memory (what FA4 / Gluon write)
    y = permute_rows(x, qt, dil)
    for mem in (y, y.contiguous()):
        assert torch.equal(low.unpermute(mem, B), x)
    assert torch.equal(unpermute_rows(y, B, shape, qt, dil), x)
    assert len(calls) == 5  # every permute/unpermute above went through the Triton gather


@MARK
def test_gradients_take_the_torch_copies():
    from diffattn.kernels.neighborhood.checks import normalize_params
    from diffattn.kernels.neighborhood.lowering import BlockSparseLowering
    from diffattn.kernels.neighborhood.tiling import make_plan

    p = normalize_params((8, 16), 1)
    low = BlockSparseLowering(make_plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, (4, 4), (4, 4)),
                              p.shape, p.dilation)
    x = torch.randn(1, 8, 16, 2, 16, device=DEVICE, requires_grad=True)
    y = low.permute_q(x)
    assert y.grad_fn is not None  # differentiable path
    (y.float() * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.skipif(INTERP or torch.cuda.is_available(), reason="this is the CPU runner (the tests above run directly)")
def test_under_the_interpreter():
    run_under_interpreter("test_neighborhood_permute_triton.py", timeout=600, allow_skips=True)
