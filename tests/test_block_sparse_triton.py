"""The Triton block-sparse kernels (forward and backward) against an fp64 reference on fresh random inputs.

Runs on CUDA when there is a GPU; otherwise only under TRITON_INTERPRET=1 (on CPU, small shapes), which
test_block_sparse.py::test_triton_kernels_under_interpreter arranges in a subprocess.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from interpreter import INTERP, triton_device_and_mark  # noqa: E402

DEVICE, pytestmark = triton_device_and_mark("test_block_sparse.py")
CUDA = DEVICE == "cuda"

from diffattn.kernels import block_sparse_attention  # noqa: E402
from diffattn.kernels.block_sparse import block_sparse_attention_reference  # noqa: E402
from metrics import rel_error  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-3}
GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _randn(*shape, dtype):
    return torch.randn(*shape, generator=GEN).to(device=DEVICE, dtype=dtype)


def _check(B, H, Sq, Sk, D, bs, T, mb, mh, dtype, density=0.5, empty_row=True, grad=True):
    q, k, v = (_randn(B, H, s, D, dtype=dtype) for s in (Sq, Sk, Sk))
    ek = _randn(B, H, T, D, dtype=dtype) if T else None
    ev = _randn(B, H, T, D, dtype=dtype) if T else None
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    mask = torch.rand(mb, mh, nq, nk, generator=GEN) < density
    if empty_row and nq > 1:
        mask[..., nq // 2, :] = False
    mask[..., -1, -1] = True  # the partial tail block, attended by the partial tail query block
    mask = mask.to(DEVICE)
    leaves = [t.requires_grad_(grad) for t in (q, k, v) + ((ek, ev) if T else ())]
    out, lse = block_sparse_attention(q, k, v, mask, block_size=bs, extra_k=ek, extra_v=ev, return_lse=True, backend="triton")
    ref_leaves = [t.detach().cpu().double().requires_grad_(grad) for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rek, rev = (ref_leaves[3], ref_leaves[4]) if T else (None, None)
    ref_out, ref_lse = block_sparse_attention_reference(rq, rk, rv, mask.cpu(), block_size=bs, extra_k=rek, extra_v=rev)
    seed = GEN.initial_seed()
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    assert rel_error(out, ref_out) < tol, f"out (seed {seed})"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), fin), f"lse -inf pattern (seed {seed})"
    assert (out.cpu()[~fin] == 0).all()
    if fin.any():
        assert rel_error(lse.cpu()[fin], ref_lse[fin]) < 1e-3, f"lse (seed {seed})"
    if not grad:
        return
    g_out = _randn(B, H, Sq, D, dtype=dtype)
    g_lse = _randn(B, H, Sq, dtype=torch.float32)
    (out * g_out).float().sum().add((torch.where(torch.isfinite(lse), lse, 0) * g_lse).sum()).backward()
    rg_lse = g_lse.cpu().double()
    ((ref_out * g_out.cpu().double()).sum() + (torch.where(fin, ref_lse.double(), 0) * rg_lse).sum()).backward()
    for name, a, b in zip(("dq", "dk", "dv", "d_extra_k", "d_extra_v"), leaves, ref_leaves):
        assert a.grad is not None and a.grad.shape == a.shape, name
        assert rel_error(a.grad, b.grad) < tol, f"{name} (seed {seed})"


BF, FP, F32 = torch.bfloat16, torch.float16, torch.float32
if CUDA:
    CASES = [
        # (B, H, Sq, Sk, D, block_size, T extra keys, mask B, mask H), dtype
        ((1, 2, 1000, 1000, 128, 128, 0, 1, 2), BF),
        ((2, 2, 777, 1030, 64, 64, 13, 2, 1), BF),
        ((1, 3, 515, 515, 80, 128, 77, 1, 1), BF),
        ((1, 2, 300, 300, 40, 64, 5, 1, 2), FP),
        ((1, 1, 400, 257, 160, 128, 0, 1, 1), BF),
        ((1, 1, 256, 300, 256, 64, 9, 1, 1), FP),
        ((2, 2, 500, 500, 128, 128, 512, 2, 2), FP),
        ((1, 2, 1000, 1000, 128, 128, 0, 1, 2), F32),
        ((2, 1, 333, 200, 64, 64, 7, 2, 1), F32),
        ((1, 1, 200, 150, 160, 64, 3, 1, 1), F32),
    ]
else:
    CASES = [
        ((1, 2, 100, 77, 64, 32, 0, 1, 2), BF),
        ((2, 1, 70, 45, 40, 16, 5, 2, 1), BF),
        ((1, 1, 40, 33, 160, 16, 0, 1, 1), BF),
        ((1, 2, 100, 77, 64, 32, 0, 1, 2), FP),
        ((1, 2, 50, 64, 16, 16, 3, 1, 1), FP),
        ((2, 2, 48, 48, 32, 16, 2, 2, 2), FP),
        ((1, 2, 100, 77, 64, 32, 0, 1, 2), F32),
        ((2, 1, 70, 45, 40, 16, 5, 2, 1), F32),
    ]


@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_forward_backward_vs_fp64(shape, dtype):
    _check(*shape, dtype=dtype)


def test_tma_forward_on_transposed_layout():
    """The tensor-descriptor (TMA) key/value path, on [B, S, H, D] memory viewed as [B, H, S, D] (the layout
    Diffusers processors produce). On CPU the interpreter runs the descriptor path too."""
    from diffattn.kernels.block_sparse import get_block_index, triton_fwd

    B, H, S, D, bs = 1, 2, 200, 64, 64 if CUDA else 32
    q, k, v = (_randn(B, S, H, D, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    mask = (torch.rand(1, H, math.ceil(S / bs), math.ceil(S / bs), generator=GEN) < 0.6).to(DEVICE)
    idx = get_block_index(mask)
    cfg = dict(BLOCK_M=bs, BLOCK_N=bs // 2, num_warps=4, num_stages=2, tma=True, warp_specialize=True)
    out, _ = triton_fwd.forward(q, k, v, idx.kv_idx, idx.kv_cnt, bs, D**-0.5, None, None, interpret=INTERP, config=cfg)
    ref, _ = block_sparse_attention_reference(*(t.cpu().double() for t in (q, k, v)), mask.cpu(), block_size=bs)
    assert rel_error(out, ref) < 5e-3


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_all_masked_and_dense(density):
    # density 0 and no extra keys: every row is empty -> out 0, lse -inf, grads 0, never NaN.
    _check(1, 2, 70, 70, 32, 32, 0, 1, 1, torch.bfloat16, density=density, empty_row=False)


def test_block_size_not_power_of_two():
    _check(1, 1, 100, 100, 32, 48, 3, 1, 1, torch.float16)


def test_torch_compile_fullgraph():
    """The custom op traces with no graph break (fake impl + registered autograd)."""
    B, H, S, D, bs = 1, 2, 64, 32, 32
    q, k, v = (_randn(B, H, S, D, dtype=torch.float16).requires_grad_() for _ in range(3))
    mask = (torch.rand(1, H, 2, 2, generator=GEN) < 0.7).to(DEVICE)

    def f(q, k, v, mask):
        return block_sparse_attention(q, k, v, mask, block_size=bs, backend="triton").float().square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(q, k, v, mask)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v, mask).backward()
    assert torch.allclose(loss, f(q, k, v, mask))
    for g, t in zip(grads, (q, k, v)):
        assert torch.equal(g, t.grad)


@pytest.mark.parametrize("mode", ["fused", "split", "atomic"])
@pytest.mark.parametrize("case", [0, 1, -1])
def test_every_backward_mode_vs_fp64(case, mode, monkeypatch):
    """Both backward passes in one launch (`DIFFATTN_BSA_BWD=fused`, the default), as two kernels (`split`), and the
    dK/dV pass alone with dQ by atomics (`atomic`): the same gradients as the reference, with extra keys, broadcast
    masks, partial tail blocks and an empty query block."""
    monkeypatch.setenv("DIFFATTN_BSA_BWD", mode)
    shape, dtype = CASES[case]
    _check(*shape, dtype)
