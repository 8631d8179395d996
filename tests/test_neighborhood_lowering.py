"""The block-sparse lowering of neighborhood attention (diffattn/kernels/neighborhood/lowering.py) on CPU.

Two independent checks: the lowering's tile-level block mask, mapped back to tokens through the permutation, equals
the reference neighborhood mask (NATTEN's formulas, `reference.neighborhood_mask`); and the output and lse through
the plain-PyTorch block-sparse backends ("blocked", "reference") equal the neighborhood reference in float64, on
odd grids (padded tiles), batch 2, dilation, unequal Q/KV tile shapes and text keys. The fa4/gluon runs of the same
lowering are in tests/test_neighborhood_lowering_gpu.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffattn.kernels import backends as registry
from diffattn.kernels.neighborhood import neighborhood_attention, neighborhood_mask, propose_stride
from diffattn.kernels.neighborhood.checks import normalize_params
from diffattn.kernels.neighborhood.functional import get_plan
from diffattn.kernels.neighborhood.lowering import (
    lower,
    lowering_reason,
    neighborhood_attention_block_sparse,
    permute_rows,
    unpermute_rows,
)
from diffattn.kernels.neighborhood.reference import neighborhood_attention_reference
from diffattn.kernels.neighborhood.tiling import permute_tokens, unpermute_tokens

# (shape, kernel, stride, dilation, q_tile, kv_tile): exactly block-sparse plans found by propose_stride at 16-token
# tiles (odd axes with padded tiles, unequal Q/KV tile shapes, dilation), plus the production configurations.
EXACT = [
    ((6, 10, 12), (4, 4, 8), (3, 4, 8), 1, (1, 4, 4), (2, 2, 4)),
    ((10, 13, 16), (4, 6, 8), (4, 1, 1), (1, 1, 2), (2, 1, 8), (2, 1, 8)),
    ((8, 16, 16), (4, 8, 8), (4, 8, 8), 1, (2, 8, 8), (2, 8, 8)),
    ((48,), 16, 16, 1, (16,), (16,)),
]
PRODUCTION = [((30, 48, 80), (18, 24, 24), (16, 8, 8)), ((256, 256), (80, 80), (16, 16))]


def _plan(shape, ks, st, dl, qt, kt):
    return get_plan(shape, ks, st, dl, False, qt, kt), normalize_params(shape, ks, st, dl, False)


def test_exact_configs_are_proposed_block_sparse():
    # the fixture configurations are what propose_stride says is exactly block-sparse (independent check)
    prop = propose_stride((6, 10, 12), (4, 4, 8), block_m=16, block_n=16)
    assert prop is not None and prop.stride == (3, 4, 8)
    for shape, ks, st, dl, qt, kt in EXACT:
        plan, _ = _plan(shape, ks, st, dl, qt, kt)
        assert lowering_reason(plan) is None, (shape, lowering_reason(plan))


@pytest.mark.parametrize("cfg", EXACT, ids=lambda c: "x".join(map(str, c[0])))
def test_block_mask_equals_reference_mask(cfg):
    shape, ks, st, dl, qt, kt = cfg
    plan, p = _plan(shape, ks, st, dl, qt, kt)
    low = lower(plan, p)
    ref = neighborhood_mask(shape, ks, st, dl)  # [N, N] over row-major tokens
    n = math.prod(shape)
    ids = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, *shape, 1, 1)  # 0 marks padding after permuting
    pq = permute_tokens(ids, plan.q_tile, p.dilation)[0, :, 0, :, 0].long() - 1  # [G, Nq_pad]
    pk = permute_tokens(ids, plan.kv_tile, p.dilation)[0, :, 0, :, 0].long() - 1
    bs = low.block_size
    masks = low.group_masks  # [G, nq, nk]
    covered = 0
    for g in range(low.groups):
        tok = masks[g].repeat_interleave(bs, 0).repeat_interleave(bs, 1)  # [Nq_pad, Nk_pad]
        qv, kv = pq[g] >= 0, pk[g] >= 0
        # no kept block holds a padded key for a real query
        assert not tok[qv][:, ~kv].any()
        sub = tok[qv][:, kv]
        want = ref[pq[g][qv]][:, pk[g][kv]]
        assert torch.equal(sub, want)
        covered += int(want.sum())
    assert covered == int(ref.sum())  # nothing of the reference lies across dilation groups


@pytest.mark.parametrize("cfg", [c for c in EXACT if math.prod(c[0]) <= 2100], ids=lambda c: "x".join(map(str, c[0])))
def test_lowered_output_equals_reference(cfg):
    shape, ks, st, dl, qt, kt = cfg
    plan, p = _plan(shape, ks, st, dl, qt, kt)
    g = torch.Generator().manual_seed(7)
    B, H, D, T = 2, 2, 8, 5
    q, k, v = (torch.randn(B, *shape, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    for extra in (False, True):
        kw = dict(extra_k=ek, extra_v=ev) if extra else {}
        ro, rl = neighborhood_attention_reference(q, k, v, ks, st, dl, return_lse=True, scale=0.3, **kw)
        for backend, layout in (("blocked", "tokens"), ("reference", "tokens"), ("blocked", "heads")):
            out, lse = neighborhood_attention_block_sparse(q, k, v, plan, p, backend, return_lse=True, scale=0.3,
                                                           layout=layout, **kw)
            assert out.shape == q.shape and lse.shape == q.shape[:-1]
            assert torch.allclose(out, ro, atol=1e-12, rtol=0), (backend, (out - ro).abs().max())
            assert torch.allclose(lse.double(), rl.double(), atol=1e-5, rtol=0)  # lse is float32 by contract


@pytest.mark.parametrize("shape,tile,dil", [((6, 10, 12), (1, 4, 4), (1, 1, 1)), ((10, 13, 16), (2, 1, 8), (1, 1, 2)),
                                            ((7, 9), (4, 2), (2, 3)), ((23,), (8,), (1,))])
def test_token_major_permutation_is_the_same_order(shape, tile, dil):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, 3, 5, generator=g)
    rows = permute_rows(x, tile, dil)  # [B*G, H, N, D] view of token-major memory
    heads = permute_tokens(x, tile, dil)
    assert torch.equal(rows, heads.reshape(-1, *heads.shape[2:]))
    assert rows.transpose(1, 2).is_contiguous()
    assert torch.equal(unpermute_rows(rows, 2, shape, tile, dil), x)
    # from head-major memory too (what a [B, H, S, D] kernel writes), and for lse-like [B*G, H, N]
    assert torch.equal(unpermute_rows(rows.contiguous(), 2, shape, tile, dil), x)
    lse = rows[..., 0]
    assert torch.equal(unpermute_rows(lse, 2, shape, tile, dil), unpermute_tokens(lse.reshape(2, -1, *lse.shape[1:]),
                                                                                  shape, tile, dil))


def test_lowered_gradients_equal_reference():
    shape, ks, st, dl, qt, kt = EXACT[0]
    plan, p = _plan(shape, ks, st, dl, qt, kt)
    g = torch.Generator().manual_seed(3)
    ins = [torch.randn(2, *shape, 1, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ins += [torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    go = torch.randn(2, *shape, 1, 8, generator=g, dtype=torch.float64)
    out = neighborhood_attention_block_sparse(*ins[:3], plan, p, "blocked", extra_k=ins[3], extra_v=ins[4])
    ga = torch.autograd.grad((out * go).sum(), ins)
    ro = neighborhood_attention_reference(*ins[:3], ks, st, dl, extra_k=ins[3], extra_v=ins[4])
    gr = torch.autograd.grad((ro * go).sum(), ins)
    for a, b in zip(ga, gr):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape,ks,st", PRODUCTION)
def test_production_plans_lower(shape, ks, st):
    """HunyuanVideo 720p and FLUX-4K GNA at the simulator's tiles: exact, with the FLOP density as block density."""
    plan, p = _plan(shape, ks, st, 1, None, None)
    assert lowering_reason(plan) is None
    low = lower(plan, p)
    assert low.block_size == 128
    flop_density = math.prod(ks) / math.prod(shape)
    assert low.density() == pytest.approx(flop_density, rel=1e-9)  # no wasted pair: kept blocks = useful work
    assert low.block_mask("cpu") is low.block_mask("cpu")  # cached, so the block-sparse index lists are too


@pytest.mark.parametrize("shape,ks,st,causal,qt,kt,needle", [
    ((30, 48, 80), (18, 24, 24), 1, False, None, None, "per-element mask"),  # plain NA
    ((16, 32), (8, 16), (8, 16), (True, False), (8, 16), (8, 16), "causal"),
    ((16, 32), (8, 16), (8, 16), False, (8, 16), (8, 8), "differ in size"),
])
def test_refusal_reasons(shape, ks, st, causal, qt, kt, needle):
    plan = get_plan(shape, ks, st, 1, causal, qt, kt)
    reason = lowering_reason(plan)
    assert reason is not None and needle in reason
    with pytest.raises(ValueError, match="block"):
        lower(plan, normalize_params(shape, ks, st, 1, causal))


def test_registry_rules_for_lowered_backends():
    nb = registry.backends("neighborhood")
    assert {"fa4", "gluon"} <= set(nb)
    base = registry.Request("neighborhood", "cuda", (9, 0), torch.bfloat16, 128)
    for name in ("fa4", "gluon"):
        assert nb[name].rule(base) == registry.NOT_BLOCK_SPARSE
        exact = registry.Request("neighborhood", "cuda", (9, 0), torch.bfloat16, 128, block_size=128,
                                 block_sparse_plan=True)
        inner = registry.backends("block_sparse")[name].why_not(
            registry.Request("block_sparse", "cuda", (9, 0), torch.bfloat16, 128, block_size=128))
        got = nb[name].rule(exact)
        assert (got is None) == (inner is None) and (inner is None or inner in got)
    odd = registry.Request("neighborhood", "cuda", (9, 0), torch.bfloat16, 128, block_size=96, block_sparse_plan=True)
    if registry.backends("block_sparse")["fa4"].available() is None:
        assert "block_size 96" in nb["fa4"].rule(odd)
    # the table key of an exact plan carries its block size (its own row in kernels/tuned/<kind>.json)
    assert odd.table_key() == "bf16/d128/b96" and base.table_key() == "bf16/d128"


def test_front_door_refuses_lowered_backends_on_cpu():
    q = torch.randn(1, 8, 16, 16, 2, 16)
    for name in ("fa4", "gluon"):
        with pytest.raises(ValueError, match="CUDA"):
            neighborhood_attention(q, q, q, (4, 8, 8), (4, 8, 8), backend=name)
