"""Neighborhood attention, "blocked" CPU backend: equal to the dense-mask reference (values, lse, gradients)."""

from __future__ import annotations

import pytest
import torch
from diffattn.kernels.neighborhood import (
    default_backend,
    neighborhood_attention,
    neighborhood_attention_blocked,
    neighborhood_attention_reference,
)
from diffattn.kernels.neighborhood.blocked import _plan, choose_tile

# (shape, kernel_size, stride, dilation, is_causal, extra tokens, tile or None for the chosen one)
CASES = [
    ((13,), 5, 1, 1, False, 0, None),  # 1-D sliding window, odd size, borders
    ((13,), 4, 1, 1, False, 3, (3,)),  # even kernel
    ((14,), 4, 3, 1, False, 0, (5,)),  # 1 < stride < kernel
    ((12,), 4, 4, 1, False, 2, (3,)),  # stride = kernel (blocked)
    ((13,), 4, 3, 3, True, 0, (2,)),  # causal, stride, dilation
    ((7, 9), (3, 4), (2, 4), (2, 1), (False, True), 3, None),
    ((9, 10), (4, 5), 1, 2, False, 0, (2, 3)),  # dilation on both axes
    ((8, 11), (5, 3), (5, 2), 1, (True, False), 4, (4, 4)),
    ((5, 6, 7), (3, 2, 5), (1, 2, 3), (1, 3, 1), (True, False, False), 2, None),
    ((5, 7, 6), (5, 3, 4), (2, 3, 1), 1, False, 0, (2, 3, 1)),  # whole T axis, per-axis mix
    ((4, 9, 9), (3, 4, 3), (1, 1, 3), (1, 2, 3), (False, True, False), 3, (1, 2, 2)),
    ((3, 8, 8), (-1, 4, 4), 1, 1, False, 0, (1, 1, 1)),  # -1 = whole axis; one-query tiles
]


def _inputs(shape, extra, *, heads=2, dim=8, batch=2, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)

    q, k, v = (r(batch, *shape, heads, dim) for _ in range(3))
    ek = r(batch, extra, heads, dim) if extra else None
    ev = r(batch, extra, heads, dim) if extra else None
    return q, k, v, ek, ev


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}-c{c[4]}-t{c[5]}" for c in CASES])
def test_blocked_equals_reference(case):
    shape, ks, st, dl, ca, extra, tile = case
    q, k, v, ek, ev = _inputs(shape, extra, seed=len(shape) * 100 + extra)
    kw = {"scale": 0.3, "extra_k": ek, "extra_v": ev}
    ref_out, ref_lse = neighborhood_attention_reference(q, k, v, ks, st, dl, ca, return_lse=True, **kw)
    out, lse = neighborhood_attention_blocked(q, k, v, ks, st, dl, ca, return_lse=True, tile=tile, **kw)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], *shape, q.shape[-2])
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    fused = neighborhood_attention_blocked(q, k, v, ks, st, dl, ca, tile=tile, **kw)  # SDPA path
    torch.testing.assert_close(fused, ref_out, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [CASES[4], CASES[5], CASES[8], CASES[10]], ids=["1d", "2d", "3d", "3d-dil"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_blocked_gradients_equal_reference(case, with_lse):
    shape, ks, st, dl, ca, extra, tile = case
    extra = max(extra, 2)
    grads = []
    for fn, kw in ((neighborhood_attention_reference, {}), (neighborhood_attention_blocked, {"tile": tile})):
        q, k, v, ek, ev = _inputs(shape, extra, seed=7, grad=True)
        g = torch.Generator().manual_seed(1)
        res = fn(q, k, v, ks, st, dl, ca, extra_k=ek, extra_v=ev, return_lse=with_lse, **kw)
        out = res[0] if with_lse else res
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v, ek, ev)))
    for name, a, b in zip(("q", "k", "v", "extra_k", "extra_v"), *grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=f"d{name}")


def test_blocked_gradient_through_lse():
    shape, ks, st, dl, ca = (6, 7), (3, 4), (1, 2), (2, 1), (False, True)
    grads = []
    for fn in (neighborhood_attention_reference, neighborhood_attention_blocked):
        q, k, v, ek, ev = _inputs(shape, 3, seed=3, grad=True)
        out, lse = fn(q, k, v, ks, st, dl, ca, extra_k=ek, extra_v=ev, return_lse=True)
        weights = torch.linspace(-1, 1, lse.numel(), dtype=torch.float64).reshape(lse.shape)
        loss = out.sum() + (lse.double() * weights).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v, ek, ev)))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # lse is float32 by contract


def test_default_backend_on_cpu_is_blocked(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert default_backend(torch.device("cpu")) == "blocked"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert default_backend(torch.device("cpu")) == "triton"  # the interpreter tests keep running the kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v, ek, ev = (t.float() if t is not None else None for t in _inputs((5, 6, 7), 3, seed=5))
    args = (q, k, v, (3, 3, 5), (1, 2, 1), 1, (True, False, False))
    out = neighborhood_attention(*args, extra_k=ek, extra_v=ev)
    blocked = neighborhood_attention_blocked(*args, extra_k=ek, extra_v=ev)
    ref = neighborhood_attention(*args, extra_k=ek, extra_v=ev, backend="reference")
    assert torch.equal(out, blocked)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_front_door_blocked_float32_autograd_and_tile_override():
    q, k, v, _, _ = _inputs((6, 10), 0, seed=11)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    out, lse = neighborhood_attention(q, k, v, (3, 5), backend="blocked", q_tile=(2, 3), return_lse=True)
    (out.sum() + lse.sum()).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_out, ref_lse = neighborhood_attention(q, k, v, (3, 5), backend="reference", return_lse=True)
    (ref_out.sum() + ref_lse.sum()).backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5)


def test_bad_backend_and_tile_are_clear_errors():
    q, k, v, _, _ = (t.float() if t is not None else None for t in _inputs((8,), 0))
    with pytest.raises(ValueError, match="blocked"):
        neighborhood_attention(q, k, v, 3, backend="nope")
    with pytest.raises(ValueError, match="tile"):
        neighborhood_attention(q, k, v, 3, backend="blocked", q_tile=(0,))


def test_tiles_partition_queries_and_boxes_stay_local():
    shape, ks = (5, 32, 32), (3, 17, 17)
    n = 5 * 32 * 32
    for tile in (choose_tile(shape, ks, (1, 1, 1), (1, 1, 1), (False,) * 3, 8, 64), (1, 8, 8)):
        plan = _plan(shape, ks, (1, 1, 1), (1, 1, 1), (False,) * 3, tile)
        order = torch.cat([t.q_idx for t in plan.tiles])
        assert torch.equal(order.sort().values, torch.arange(n))
        # the key box of a tile: at most tile + kernel - 1 per axis, not the grid
        box = [min(t + k - 1, s) for t, k, s in zip(tile, ks, shape)]
        assert max(t.k_idx.numel() for t in plan.tiles) <= box[0] * box[1] * box[2] < n
    # a perfectly block-sparse setting (stride = tile-aligned) needs no mask at all
    plan = _plan((4, 16), (2, 8), (2, 8), (1, 1), (False, False), (2, 8))
    assert all(t.full for t in plan.tiles)
