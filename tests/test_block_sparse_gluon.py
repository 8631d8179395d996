"""The Gluon (sm90) block-sparse forward: compiles for sm90 on any machine, and on an sm90 GPU matches a float64
reference on fresh random inputs (odd lengths, batch 2, text keys, empty rows, broadcast masks, lse; fp16, bf16).

Gluon has no interpreter mode, so on a CPU only the compile-for-sm90 check runs (Triton ships ptxas, so this
checks layouts, lowering, shared-memory budget and register use without a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from diffattn.kernels.block_sparse import block_sparse_attention_reference, get_block_index
from diffattn.kernels.block_sparse import gluon_fwd
from metrics import rel_error

GEN = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_gluon = pytest.mark.skipif(gluon_fwd.GLUON_ERROR is not None, reason=f"no Gluon: {gluon_fwd.GLUON_ERROR}")
needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm90 (Hopper) GPU")


@needs_gluon
@pytest.mark.parametrize("even_k, has_extra, pingpong", [(False, True, True), (True, False, False)])
def test_compiles_for_sm90(even_k: bool, has_extra: bool, pingpong: bool) -> None:
    cfg = dict(gluon_fwd.config(128), PINGPONG=pingpong)
    try:
        k = gluon_fwd.compile_for_sm90(torch.bfloat16, 128, even_k=even_k, has_extra=has_extra, cfg=cfg)
    except RuntimeError as e:  # no ptxas / backend on this platform: not a kernel error
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no sm90 toolchain: {e}")
        raise
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "no wgmma: the kernel is not on Hopper's tensor-core path"
    assert "cp.async.bulk.tensor" in ptx, "no TMA loads"
    assert "setmaxnreg" in ptx, "no register split between producer and consumers"
    assert "ld.local" not in ptx and "st.local" not in ptx, "register spills to local memory"
    assert k.metadata.shared <= 232448, f"shared memory {k.metadata.shared} over the sm90 limit"


def test_unsupported_reason_names_the_problem() -> None:
    q = torch.randn(1, 1, 8, 128)
    reason = gluon_fwd.unsupported_reason(q, q, q, 128)
    assert reason is not None and ("CUDA" in reason or "Gluon" in reason)


def _randn(*shape, dtype):
    return torch.randn(*shape, generator=GEN).to(device="cuda", dtype=dtype)


def _check(B, H, Sq, Sk, D, T, mb, mh, dtype, density=0.5, empty_row=True, cfg=None):
    bs = 128
    q, k, v = (_randn(B, H, s, D, dtype=dtype) for s in (Sq, Sk, Sk))
    ek = _randn(B, H, T, D, dtype=dtype) if T else None
    ev = _randn(B, H, T, D, dtype=dtype) if T else None
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    mask = torch.rand(mb, mh, nq, nk, generator=GEN) < density
    if empty_row and nq > 1:
        mask[..., nq // 2, :] = False
    mask[..., -1, -1] = True  # the partial tail key block, attended by the tail query block
    mask = mask.cuda()
    assert gluon_fwd.unsupported_reason(q, k, v, bs, ek, True) is None
    index = get_block_index(mask)
    scale = 1.0 / math.sqrt(D)
    out, lse = gluon_fwd.forward(q, k, v, index.kv_idx, index.kv_cnt, bs, scale, ek, ev, cfg=cfg)
    torch.cuda.synchronize()
    f64 = lambda t: None if t is None else t.cpu().double()  # noqa: E731
    ref_out, ref_lse = block_sparse_attention_reference(f64(q), f64(k), f64(v), mask.cpu(), block_size=bs,
                                                        extra_k=f64(ek), extra_v=f64(ev))
    seed = GEN.initial_seed()
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    assert rel_error(out, ref_out) < TOL[dtype], f"out (seed {seed})"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin), f"lse finiteness (seed {seed})"
    assert (lse.cpu()[fin] - ref_lse[fin]).abs().max().item() < 2e-2, f"lse (seed {seed})"
    if (~fin).any():  # queries with no key at all: out 0, lse -inf
        assert (lse.cpu()[~fin] == float("-inf")).all()
        assert (out.cpu()[~fin] == 0).all()


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_odd_lengths_text_keys_batch(dtype) -> None:
    # odd Sq and Sk (partial tail blocks), 77 text keys (a partial text tile), batch 2, per-head masks, empty rows
    _check(2, 3, 1000, 777, 128, 77, 2, 3, dtype)


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("D", [64, 128])
def test_dense_block_aligned(D) -> None:
    # a full key list is dense attention; block-aligned lengths take the mask-free specialization
    _check(1, 2, 1024, 1024, D, 0, 1, 1, torch.bfloat16, density=1.1, empty_row=False)


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_broadcast_mask_sparse_and_no_pingpong() -> None:
    # one mask broadcast over batch and heads, density 0.2, the ring without ping-pong
    _check(2, 2, 1536, 1536, 128, 0, 1, 1, torch.bfloat16, density=0.2,
           cfg=dict(gluon_fwd.config(128), PINGPONG=False, NUM_STAGES=2))


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_only_text_keys_and_empty_query_block() -> None:
    # rows whose block list is empty still see the text keys; Sq < one query block
    _check(1, 1, 100, 300, 128, 33, 1, 1, torch.float16, density=0.0, empty_row=False)


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("pingpong", [True, False])
def test_persistent_grid(pingpong) -> None:
    # 5 programs stride over 2 x 2 x 8 work items of different list lengths (empty rows, text keys, tails): the
    # ring, q and ping-pong barrier phases carry across work items
    _check(2, 2, 1000, 900, 128, 50, 2, 2, torch.bfloat16, density=0.4,
           cfg=dict(gluon_fwd.config(128, pingpong=pingpong), PERSISTENT=5))
