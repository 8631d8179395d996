"""block_sparse_attention on CPU: the reference against an independent per-query fp64 loop, index lists,
argument validation, LSE merging; and the Triton kernels run under TRITON_INTERPRET=1 in a subprocess
(the interpreter must be switched on before triton is imported, which this process may already have done)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from interpreter import run_under_interpreter
from diffattn.kernels import block_sparse_attention, merge_attention_states
from diffattn.kernels.block_sparse import (
    block_sparse_attention_reference,
    build_block_index,
    get_block_index,
    seed_block_index,
)
from metrics import rel_error


def _naive(q, k, v, block_mask, bs, scale, ek=None, ev=None):
    """Per (b, h, query) loop in float64: gather the allowed keys explicitly, softmax, weighted sum."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    out = torch.zeros(B, H, Sq, D, dtype=torch.float64)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            m = block_mask[min(b, block_mask.shape[0] - 1), min(h, block_mask.shape[1] - 1)]
            for i in range(Sq):
                keys = [j for j in range(Sk) if m[i // bs, j // bs]]
                kk = k[b, h, keys].double()
                vv = v[b, h, keys].double()
                if ek is not None:
                    kk = torch.cat([kk, ek[b, h].double()])
                    vv = torch.cat([vv, ev[b, h].double()])
                if kk.shape[0] == 0:
                    continue
                s = kk @ q[b, h, i].double() * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ vv
    return out, lse


@pytest.mark.parametrize(
    "B,H,Sq,Sk,D,bs,T,mb,mh",
    [(2, 3, 37, 53, 8, 16, 0, 1, 3), (1, 2, 64, 64, 16, 32, 4, 1, 1), (2, 2, 20, 45, 5, 16, 3, 2, 2), (1, 1, 17, 0, 4, 16, 2, 1, 1)],
)
@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_reference_matches_naive_loop(B, H, Sq, Sk, D, bs, T, mb, mh, backend):
    q, k, v = torch.randn(B, H, Sq, D), torch.randn(B, H, Sk, D), torch.randn(B, H, Sk, D)
    mask = torch.rand(mb, mh, math.ceil(Sq / bs), math.ceil(Sk / bs)) < 0.5
    if mask.shape[2] > 1:
        mask[:, :, 1] = False  # a fully masked query block
    ek = torch.randn(B, H, T, D) if T else None
    ev = torch.randn(B, H, T, D) if T else None
    scale = 0.3
    out, lse = block_sparse_attention(q, k, v, mask, block_size=bs, scale=scale, extra_k=ek, extra_v=ev, return_lse=True,
                                      backend=backend)
    ref_out, ref_lse = _naive(q, k, v, mask, bs, scale, ek, ev)
    assert not torch.isnan(out).any()
    assert rel_error(out, ref_out) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    if fin.any():
        assert rel_error(lse[fin], ref_lse[fin]) < 1e-5
    assert (out[~fin] == 0).all()


def test_reference_fully_masked_gradients_are_zero_not_nan():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 0, 1] = True
    out, lse = block_sparse_attention(q, k, v, mask, block_size=16, return_lse=True)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, 16:] == 0).all()
    assert (out[:, :, 16:] == 0).all() and torch.isinf(lse[:, :, 16:]).all()


def test_extra_keys_equal_lse_merge_of_two_parts():
    B, H, S, D, T = 1, 2, 50, 16, 7
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    ek, ev = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    mask = torch.rand(1, H, 4, 4) < 0.4
    both, lse_both = block_sparse_attention(q, k, v, mask, block_size=16, extra_k=ek, extra_v=ev, return_lse=True)
    a, lse_a = block_sparse_attention(q, k, v, mask, block_size=16, return_lse=True)
    full = torch.ones(1, 1, 4, 1, dtype=torch.bool)
    b, lse_b = block_sparse_attention(q, ek, ev, full, block_size=16, return_lse=True)
    merged, lse_m = merge_attention_states(a, lse_a, b, lse_b)
    assert rel_error(merged, both) < 1e-5 and rel_error(lse_m, lse_both) < 1e-5


def test_index_lists_are_ascending_csr():
    mask = torch.rand(2, 3, 7, 9) < 0.3
    idx = build_block_index(mask)
    for b in range(2):
        for h in range(3):
            for r in range(7):
                cols = torch.nonzero(mask[b, h, r]).flatten().tolist()
                assert idx.kv_cnt[b, h, r].item() == len(cols)
                assert idx.kv_idx[b, h, r, : len(cols)].tolist() == cols
            for c in range(9):
                rows = torch.nonzero(mask[b, h, :, c]).flatten().tolist()
                assert idx.q_idx[b, h, c, : len(rows)].tolist() == rows
    assert get_block_index(mask) is get_block_index(mask)
    cached = get_block_index(mask)
    mask[0, 0, 0, 0] = ~mask[0, 0, 0, 0]  # in-place change bumps the version: the cache must rebuild
    assert get_block_index(mask) is not cached


def test_seeded_forward_lists_are_used_and_backward_lists_built_from_the_mask(monkeypatch):
    from diffattn.kernels.block_sparse import index as index_mod

    mask = torch.rand(2, 3, 5, 6) < 0.4
    mask[..., 0] = True
    ref = build_block_index(mask)
    ref_q = (ref.q_idx, ref.q_cnt)
    seed_block_index(mask, ref.kv_idx.clone(), ref.kv_cnt.clone())
    sorts = []
    real = index_mod._csr_rows
    monkeypatch.setattr(index_mod, "_csr_rows", lambda m: sorts.append(m.shape) or real(m))
    got = get_block_index(mask)
    assert sorts == []  # the forward's lists came from the seed
    assert torch.equal(got.kv_idx, ref.kv_idx) and torch.equal(got.kv_cnt, ref.kv_cnt)
    assert torch.equal(got.q_idx, ref_q[0]) and torch.equal(got.q_cnt, ref_q[1])
    assert sorts == [(2, 3, 6, 5)]  # one sort, of the transposed mask, on the backward's first use
    q = torch.randn(2, 3, 75, 8)  # 5 query blocks (short last one), 6 key blocks
    k, v = torch.randn(2, 3, 90, 8), torch.randn(2, 3, 90, 8)
    out = block_sparse_attention(q, k, v, mask, block_size=16, backend="blocked")
    ref_out, _ = block_sparse_attention_reference(q, k, v, mask, block_size=16)
    assert rel_error(out, ref_out) < 1e-5
    mask[0, 0, 0, 1] = ~mask[0, 0, 0, 1]  # in-place change: the seed is stale and must not be used
    assert get_block_index(mask) is not got
    with pytest.raises(ValueError, match="do not match the mask"):
        seed_block_index(mask, ref.kv_idx[:, :, :-1], ref.kv_cnt)
    with pytest.raises(ValueError, match="int32"):
        seed_block_index(mask, ref.kv_idx.long(), ref.kv_cnt)


def _args(**over):
    a = dict(q=torch.randn(1, 2, 40, 16), k=torch.randn(1, 2, 40, 16), v=torch.randn(1, 2, 40, 16),
             block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16)
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,exc,word",
    [
        (dict(q=torch.randn(2, 40, 16)), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(1, 2, 40, 16, dtype=torch.float64)), TypeError, "k dtype"),
        (dict(block_mask=torch.ones(1, 1, 3, 3)), TypeError, "block_mask must be a bool"),
        (dict(block_mask=torch.ones(1, 1, 2, 3, dtype=torch.bool)), ValueError, "block_mask shape"),
        (dict(block_mask=torch.ones(3, 1, 3, 3, dtype=torch.bool)), ValueError, "block_mask shape"),
        (dict(block_size=24), ValueError, "block_size"),
        (dict(block_size=64.0), TypeError, "block_size"),
        (dict(q=torch.randn(1, 2, 40, 300), k=torch.randn(1, 2, 40, 300), v=torch.randn(1, 2, 40, 300)), ValueError, "head dim"),
        (dict(v=torch.randn(1, 2, 40, 8)), ValueError, "v head dim"),
        (dict(extra_k=torch.randn(1, 2, 3, 16)), ValueError, "together"),
        (dict(extra_k=torch.randn(1, 2, 3, 8), extra_v=torch.randn(1, 2, 3, 8)), ValueError, "extra_k must be"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_validation_names_the_argument(over, exc, word):
    with pytest.raises(exc, match=word):
        block_sparse_attention(**_args(**over))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreter is on in this process")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        block_sparse_attention(**_args(backend="triton"))


def test_reference_float64_and_backend_env(monkeypatch):
    monkeypatch.setenv("DIFFATTN_BLOCK_SPARSE_BACKEND", "reference")
    a = _args(q=torch.randn(1, 2, 40, 16, dtype=torch.float64), k=torch.randn(1, 2, 40, 16, dtype=torch.float64),
              v=torch.randn(1, 2, 40, 16, dtype=torch.float64))
    out = block_sparse_attention(**a)
    ref = block_sparse_attention_reference(**{k: a[k] for k in ("q", "k", "v", "block_mask")}, block_size=16)[0]
    assert out.dtype == torch.float64 and torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine test_block_sparse_triton.py runs directly")
def test_triton_kernels_under_interpreter():
    """Runs tests/test_block_sparse_triton.py in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    run_under_interpreter("test_block_sparse_triton.py", timeout=600)


def test_hopper_variant_failure_is_remembered_and_falls_back():
    pytest.importorskip("triton")
    from diffattn.kernels.block_sparse import triton_fwd
    from diffattn.kernels.common import run_with_fallbacks

    key = ("unit-test", 1)
    calls = []

    def launch(tma, ws):
        calls.append((tma, ws))
        if ws:
            raise RuntimeError("PassManager::run failed")

    for _ in range(3):
        run_with_fallbacks("block_sparse forward", key, triton_fwd.hopper_variants(True, True, launch))
    assert calls == [(True, True), (True, False), (True, False), (True, False)]
    with pytest.raises(RuntimeError):  # the portable variant's errors are never swallowed
        run_with_fallbacks("block_sparse forward", key, [("plain", lambda: launch(False, True))])


@pytest.mark.parametrize("Sq,Sk,bs,mb,mh,T", [(50, 70, 16, 1, 1, 3), (33, 33, 16, 2, 3, 0), (96, 40, 32, 1, 3, 5)])
def test_blocked_backend_equals_reference_values_and_gradients(Sq, Sk, bs, mb, mh, T):
    """The CPU path (one query block at a time) against the whole-matrix reference, forward and backward, with a
    fully masked query block, repeated rows (gathered once) and per-batch/per-head masks."""
    torch.manual_seed(Sq + Sk)
    B, H, D = 2, 3, 8
    mask = torch.rand(mb, mh, math.ceil(Sq / bs), math.ceil(Sk / bs)) < 0.5
    mask[..., 0, :] = False  # a query block with no key block
    if mask.shape[2] > 2:
        mask[..., 2, :] = mask[..., 1, :]  # identical rows share one gather
    inputs = [torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for n in (Sq, Sk, Sk)]
    extra = [torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(2)] if T else [None, None]
    results = {}
    for backend in ("reference", "blocked"):
        out, lse = block_sparse_attention(*inputs, mask, block_size=bs, extra_k=extra[0], extra_v=extra[1],
                                          return_lse=True, backend=backend)
        finite = torch.isfinite(lse)
        loss = (out * torch.linspace(-1, 1, D, dtype=torch.float64)).sum() + lse[finite].sum()
        leaves = [t for t in inputs + extra if t is not None]
        grads = torch.autograd.grad(loss, leaves)
        results[backend] = (out, lse, grads)
    (o1, l1, g1), (o2, l2, g2) = results["reference"], results["blocked"]
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)
    fast = block_sparse_attention(*inputs, mask, block_size=bs, extra_k=extra[0], extra_v=extra[1], backend="blocked")
    torch.testing.assert_close(fast, o1, rtol=1e-10, atol=1e-10)  # the fused-SDPA branch (no lse asked)
    assert torch.equal(torch.isfinite(l1), torch.isfinite(l2))
    torch.testing.assert_close(l2[torch.isfinite(l2)], l1[torch.isfinite(l1)], rtol=1e-10, atol=1e-10)
    for a, b in zip(g2, g1):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_auto_backend_on_cpu_is_blocked(monkeypatch):
    from diffattn.kernels.block_sparse import op

    q = torch.randn(1, 1, 20, 8)
    assert op._resolve_backend(None, q) == "blocked"
    monkeypatch.setenv("DIFFATTN_BLOCK_SPARSE_BACKEND", "reference")
    assert op._resolve_backend(None, q) == "reference"


def test_plan_is_cached_per_signature_and_mask_version(monkeypatch):
    """The steady path: one plan per call signature and mask (validation and the backend choice once); new
    tensors of the same signature reuse it; an in-place change of the mask, another mask, grad mode or the backend
    env var make a new plan; results always equal the reference."""
    from diffattn.kernels.block_sparse import op

    op.clear_plans()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 45, 8, generator=g) for _ in range(3))
    mask = torch.rand(1, 2, 3, 3, generator=g) < 0.6
    mask[..., -1, -1] = True
    calls = []
    real = op._choose
    monkeypatch.setattr(op, "_choose", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for i in range(3):
        qi = q + i
        out = block_sparse_attention(qi, k, v, mask, block_size=16)
        ref = block_sparse_attention_reference(qi.double(), k.double(), v.double(), mask, block_size=16)[0]
        assert rel_error(out, ref) < 1e-6
    assert len(calls) == 1, "validation / choice ran more than once for one signature"
    mask[..., 0, :] = ~mask[..., 0, :]  # in place: the version changes
    out = block_sparse_attention(q, k, v, mask, block_size=16)
    assert len(calls) == 2
    assert rel_error(out, block_sparse_attention_reference(q.double(), k.double(), v.double(), mask, block_size=16)[0]) < 1e-6
    block_sparse_attention(q, k, v, mask.clone(), block_size=16)
    assert len(calls) == 3
    qg = q.clone().requires_grad_()
    block_sparse_attention(qg, k, v, mask, block_size=16).sum().backward()
    assert len(calls) == 4 and qg.grad is not None
    monkeypatch.setenv("DIFFATTN_BLOCK_SPARSE_BACKEND", "reference")
    block_sparse_attention(q, k, v, mask, block_size=16)
    assert len(calls) == 5
    # bad arguments are never cached as good: the same error every time
    for _ in range(2):
        with pytest.raises(ValueError, match="block_mask shape"):
            block_sparse_attention(q, k, v, mask[..., :2], block_size=16)
    op.clear_plans()


def test_launch_key_sees_alignment_and_scalars():
    """`LaunchCache`'s key: a tensor enters by dtype and 16-byte alignment only (data and pointer value do not
    matter), a scalar by type and value (it is frozen into the recorded arguments)."""
    from diffattn.kernels.common import _arg_key

    x = torch.zeros(64, dtype=torch.bfloat16)
    assert _arg_key(x) == _arg_key(torch.ones(64, dtype=torch.bfloat16))
    assert _arg_key(x[1:]) != _arg_key(x)  # 2-byte offset: not 16-byte aligned
    assert _arg_key(x.float()) != _arg_key(x)
    assert _arg_key(3) != _arg_key(4) and _arg_key(1) != _arg_key(True) and _arg_key(0.5) != _arg_key(0.25)
    with pytest.raises(TypeError):
        _arg_key(object())
