"""Rectified SpaAttn on the Triton kernels: the fused R * O_spa + C epilogue, forward and backward.

Runs on CUDA when there is a GPU; otherwise only under TRITON_INTERPRET=1 (CPU, small shapes), which
test_rectified.py::test_triton_kernels_under_interpreter arranges in a subprocess."""

from __future__ import annotations

import math

import pytest
import torch

from interpreter import triton_device_and_mark  # noqa: E402

DEV, pytestmark = triton_device_and_mark("test_rectified.py")

from diffattn.kernels import block_sparse_attention  # noqa: E402
from diffattn.methods.rectified import rectified_attention, rectified_attention_reference  # noqa: E402
from metrics import rel_error  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
@pytest.mark.parametrize("B,H,S,D,bs,T", [(2, 2, 50, 16, 16, 5), (1, 2, 64, 32, 32, 0)])
@pytest.mark.parametrize("bwd", ["fused", "split", "atomic"])
def test_epilogue_forward_backward_vs_reference(dtype, B, H, S, D, bs, T, bwd, monkeypatch):
    monkeypatch.setenv("DIFFATTN_BSA_BWD", bwd)  # every backward mode carries the epilogue's R (fused: the default)
    g = torch.Generator().manual_seed(1)
    nq = math.ceil(S / bs)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(B, H, S, D), mk(B, H, S, D), mk(B, H, S, D)
    ek, ev = (mk(B, H, T, D), mk(B, H, T, D)) if T else (None, None)
    mask = (torch.rand(1, H, nq, nq, generator=g) < 0.6).to(DEV)
    mask[..., 1, :] = False  # a query block with no video keys
    r = (torch.rand(B, 1, nq, generator=g) + 0.5).to(DEV).requires_grad_()
    c = torch.randn(B, H, nq, D, generator=g).to(DEV).requires_grad_()
    leaves = [t for t in (q, k, v, ek, ev, r, c) if t is not None]
    w = torch.randn(B, H, S, D, generator=g).to(DEV)
    res = []
    for backend in ("reference", "triton"):
        out, lse = block_sparse_attention(q, k, v, mask, block_size=bs, extra_k=ek, extra_v=ev, out_scale=r,
                                          out_bias=c, return_lse=True, backend=backend)
        fin = torch.isfinite(lse)
        loss = (out.float() * w).sum() + lse[fin].sum()
        res.append((out, torch.autograd.grad(loss, leaves)))
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert rel_error(res[1][0], res[0][0]) < tol
    for a, b in zip(res[1][1], res[0][1]):
        assert torch.isfinite(a).all()
        assert rel_error(a, b) < tol * 5


def test_default_path_unchanged_by_the_epilogue_argument():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g).to(DEV) for _ in range(3))
    mask = (torch.rand(1, 2, 3, 3, generator=g) < 0.5).to(DEV)
    plain = block_sparse_attention(q, k, v, mask, block_size=16, backend="triton")
    ones, zeros = torch.ones(1, 2, 3, device=DEV), torch.zeros(1, 2, 3, 16, device=DEV)
    fused = block_sparse_attention(q, k, v, mask, block_size=16, backend="triton", out_scale=ones, out_bias=zeros)
    assert torch.equal(plain, fused)


def test_rectified_attention_on_triton_vs_float64_reference():
    g = torch.Generator().manual_seed(3)
    B, H, S, D, bs, T = 2, 2, 70, 16, 16, 6
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(DEV) * 1.5 for _ in range(3))
    ek, ev = (torch.randn(B, H, T, D, generator=g).to(DEV) for _ in range(2))
    em = torch.ones(B, T, dtype=torch.bool, device=DEV)
    em[1, 4:] = False
    kw = dict(block_size=bs, tau=0.4, k_min=1, gapr=False, extra_k=ek, extra_v=ev, extra_mask=em)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = rectified_attention(q, k, v, backend="triton", **kw)
    ref, _ = rectified_attention_reference(q, k, v, **kw)
    assert rel_error(out, ref) < 2e-5
    w = torch.randn(B, H, S, D, generator=g).to(DEV)
    ga = torch.autograd.grad((out * w).sum(), leaves)
    gb = torch.autograd.grad((ref * w.double()).sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_error(a, b) < 1e-4
