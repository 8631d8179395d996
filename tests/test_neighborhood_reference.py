"""Neighborhood attention: the reference's window semantics, argument checks, and the tiling tables (CPU, fast)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from diffattn.kernels.neighborhood import neighborhood_attention, neighborhood_attention_reference, normalize_params
from diffattn.kernels.neighborhood.reference import axis_mask, neighborhood_mask
from diffattn.kernels.neighborhood.tiling import make_plan, permute_tokens, unpermute_tokens, window_bounds


def _window(mask_row: torch.Tensor) -> list[int]:
    return torch.nonzero(mask_row).flatten().tolist()


def test_natten_worked_example_strided():
    # gna.md: L=30, K=18, s=16 -> queries 0-15 attend [0,18), queries 16-29 attend [12,30)
    m = axis_mask(30, 18, 16, 1, False)
    for i in range(16):
        assert _window(m[i]) == list(range(0, 18))
    for i in range(16, 30):
        assert _window(m[i]) == list(range(12, 30))


def test_sliding_window_inward_clamp_even_and_odd():
    for L, K in [(11, 4), (11, 5), (7, 7), (9, 2)]:
        m = axis_mask(L, K, 1, 1, False)
        assert (m.sum(1) == K).all()
        for i in range(L):
            w = _window(m[i])
            assert w == list(range(w[0], w[0] + K))
            # left K//2, right K-1-K//2, shifted inward at the borders
            assert w[0] == min(max(i - K // 2, 0), L - K)


def test_blocked_when_stride_equals_kernel():
    m = axis_mask(12, 4, 4, 1, False)
    blocks = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3)
    assert torch.equal(m, blocks)


def test_dense_when_kernel_is_length():
    assert neighborhood_mask((5, 6), (5, 6)).all()


def test_causal_keys_at_most_query():
    for L, K, s in [(13, 5, 1), (13, 4, 3), (10, 10, 1), (9, 3, 3)]:
        m = axis_mask(L, K, s, 1, True)
        assert not torch.triu(m, diagonal=1).any()
        assert m.diagonal().all()
        if s == 1:
            for i in range(L):
                assert _window(m[i]) == list(range(max(i - K + 1, 0), i + 1))


def test_dilation_groups_do_not_mix():
    L, K, d = 17, 3, 4
    m = axis_mask(L, K, 1, d, False)
    for i in range(L):
        w = _window(m[i])
        assert all(j % d == i % d for j in w)
        assert len(w) == K


def test_multi_dim_is_and_of_axes():
    m = neighborhood_mask((4, 5), (3, 2), (1, 2), 1, (False, True))
    a0 = axis_mask(4, 3, 1, 1, False)
    a1 = axis_mask(5, 2, 2, 1, True)
    for qi, ki in itertools.product(range(20), range(20)):
        assert m[qi, ki] == (a0[qi // 5, ki // 5] & a1[qi % 5, ki % 5])


@pytest.mark.parametrize("seed", range(3))
def test_reference_equals_masked_sdpa(seed):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 5, 7, 3, 8) for _ in range(3))
    ek, ev = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    out, lse = neighborhood_attention_reference(q, k, v, (3, 4), (2, 3), 1, (False, True), extra_k=ek, extra_v=ev,
                                                return_lse=True)
    mask = neighborhood_mask((5, 7), (3, 4), (2, 3), 1, (False, True))
    mask = torch.cat([mask, torch.ones(35, 4, dtype=torch.bool)], 1)
    qh = q.reshape(2, 35, 3, 8).transpose(1, 2)
    kh = torch.cat([k.reshape(2, 35, 3, 8), ek], 1).transpose(1, 2)
    vh = torch.cat([v.reshape(2, 35, 3, 8), ev], 1).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(q.shape), atol=1e-5, rtol=1e-5)
    s = (qh @ kh.transpose(-1, -2)) * 8 ** -0.5
    ref_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse, ref_lse.transpose(1, 2).reshape(2, 5, 7, 3), atol=1e-5, rtol=1e-5)


def test_front_door_on_cpu_uses_reference_and_has_gradients():
    q, k, v = (torch.randn(1, 6, 2, 8, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 3)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=9), "kernel_size \\* dilation"),
        (dict(kernel_size=3, stride=4), "stride"),
        (dict(kernel_size=3, dilation=3), "kernel_size \\* dilation"),
        (dict(kernel_size=(3, 3)), "one entry per spatial axis"),
        (dict(kernel_size=0), "kernel_size must be >= 1"),
        (dict(kernel_size=3, dilation=0), "dilation"),
    ],
)
def test_bad_parameters(kwargs, match):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, q, q, **kwargs)


def test_bad_tensors():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="same shape"):
        neighborhood_attention(q, q[:, :7], q[:, :7], 3)
    with pytest.raises(TypeError, match="dtype"):
        neighborhood_attention(q.long(), q.long(), q.long(), 3)
    with pytest.raises(ValueError, match="1 to 3 spatial axes"):
        neighborhood_attention(q[0], q[0], q[0], 3)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 8, 1, 257)
        neighborhood_attention(x, x, x, 3)
    with pytest.raises(ValueError, match="together"):
        neighborhood_attention(q, q, q, 3, extra_k=torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="extra_k must be"):
        e = torch.randn(1, 2, 3, 4)
        neighborhood_attention(q, q, q, 3, extra_k=e, extra_v=e)
    with pytest.raises(TypeError, match="is_causal"):
        neighborhood_attention(q, q, q, 3, is_causal=1)


def test_kernel_size_minus_one_means_whole_axis():
    p = normalize_params((6, 9), (-1, 3), 1, (2, 1))
    assert p.kernel_size == (3, 3)


@pytest.mark.parametrize("seed", range(4))
def test_window_tables_match_reference(seed):
    """tiling.window_bounds (used by the kernel and simulator) vs the reference's independent per-query loop."""
    rng = random.Random(seed)
    for _ in range(40):
        L = rng.randint(1, 40)
        d = rng.randint(1, max(1, L // 2))
        K = rng.randint(1, L // d)
        s = rng.randint(1, K)
        causal = rng.random() < 0.4
        m = axis_mask(L, K, s, d, causal)
        for grp in range(d):
            coords = list(range(grp, L, d))
            st, ln = window_bounds(len(coords), K, s, causal)
            for x, c in enumerate(coords):
                expect = [coords[j] for j in range(st[x], st[x] + ln[x])]
                assert _window(m[c]) == expect, (L, K, s, d, causal, c)


@pytest.mark.parametrize("seed", range(3))
def test_tile_tables_count_exactly(seed):
    """Visited/unmasked tile pairs vs brute force over the dense mask in tile order."""
    rng = random.Random(100 + seed)
    for _ in range(6):
        nd = rng.randint(1, 2)
        shape = tuple(rng.randint(4, 14) for _ in range(nd))
        dil = tuple(rng.choice([1, 1, 2]) for _ in range(nd))
        ks = tuple(rng.randint(1, shape[i] // dil[i]) for i in range(nd))
        st = tuple(rng.randint(1, ks[i]) for i in range(nd))
        ca = tuple(rng.random() < 0.3 for _ in range(nd))
        qt = tuple(rng.choice([1, 2, 4]) for _ in range(nd))
        kt = tuple(rng.choice([1, 2, 4]) for _ in range(nd))
        plan = make_plan(shape, ks, st, dil, ca, qt, kt)
        mask = neighborhood_mask(shape, ks, st, dil, ca).float()
        n = math.prod(shape)
        # tokens -> (group, tile, intra) order with padding, through the permutation itself
        idx = torch.arange(n, dtype=torch.float32).reshape(1, *shape, 1, 1)
        qperm = permute_tokens(idx + 1, qt, dil).flatten().long() - 1  # -1 marks padding
        kperm = permute_tokens(idx + 1, kt, dil).flatten().long() - 1
        bm, bn = math.prod(qt), math.prod(kt)
        rows_per_group = len(qperm) // plan.groups
        cols_per_group = len(kperm) // plan.groups
        full = visited_nonempty = 0
        for g in range(plan.groups):
            qg = qperm[g * rows_per_group:(g + 1) * rows_per_group].reshape(-1, bm)
            kg = kperm[g * cols_per_group:(g + 1) * cols_per_group].reshape(-1, bn)
            for qrow in qg:
                qv = qrow[qrow >= 0]
                if len(qv) == 0:
                    continue
                for kcol in kg:
                    sub = mask[qv][:, kcol.clamp_min(0)] * (kcol >= 0).float()
                    visited_nonempty += bool(sub.any())
                    full += bool((sub == 1).all())
        c = plan.counts()
        assert c["unmasked"] == full
        assert c["visited"] == visited_nonempty  # the box holds no empty tile pair
        assert c["window_sum"] == int(mask.sum())


def test_permutation_round_trip():
    x = torch.randn(2, 7, 10, 3, 5)
    for tile, dil in [((2, 4), (1, 1)), ((4, 2), (2, 3)), ((1, 16), (3, 1))]:
        y = permute_tokens(x, tile, dil)
        assert y.shape[:3] == (2, math.prod(dil), 3)
        assert torch.equal(unpermute_tokens(y, (7, 10), tile, dil), x)
