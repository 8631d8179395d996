"""diffattn.kernels.neighborhood.simulator: simulator counts and the stride proposer."""

from __future__ import annotations

import math
import random

import pytest
import torch

from diffattn.kernels.neighborhood.simulator import natten_fully_block_sparse, propose_stride, simulate
from diffattn.kernels.neighborhood.reference import neighborhood_mask


def test_documented_configs_are_perfectly_block_sparse():
    hun = simulate((30, 48, 80), (18, 24, 24), (16, 8, 8), q_tile=(2, 8, 8), kv_tile=(2, 8, 8))
    assert hun.perfectly_block_sparse and hun.natten_block_sparse
    assert hun.masked_pairs == 0
    assert hun.kv_tiles_per_q_tile == 81  # (18/2) x (24/8) x (24/8)
    assert hun.upper_bound_speedup == pytest.approx(hun.flop_bound_speedup)
    flux = simulate((256, 256), (80, 80), (16, 16), q_tile=(16, 8), kv_tile=(16, 8))
    assert flux.perfectly_block_sparse and flux.natten_block_sparse
    assert flux.flop_bound_speedup == pytest.approx(256 * 256 / 6400)


def test_plain_na_is_not_block_sparse_and_costs_more():
    na = simulate((256, 256), (80, 80), 1, q_tile=(16, 8), kv_tile=(16, 8))
    assert not na.perfectly_block_sparse and not na.natten_block_sparse
    assert na.masked_pairs > 0
    assert na.upper_bound_speedup < na.flop_bound_speedup
    assert na.expected_speedup < na.upper_bound_speedup
    text = str(na)
    assert "perfectly block-sparse: no" in text and "KV tiles per Q tile" in text


def test_causal_never_block_sparse():
    assert not simulate((64,), 16, 16, is_causal=True, q_tile=(16,), kv_tile=(16,)).perfectly_block_sparse


@pytest.mark.parametrize("seed", range(3))
def test_density_matches_dense_mask(seed):
    rng = random.Random(seed)
    for _ in range(5):
        shape = (rng.randint(5, 16), rng.randint(5, 16))
        ks = tuple(rng.randint(1, s) for s in shape)
        st = tuple(rng.randint(1, k) for k in ks)
        sim = simulate(shape, ks, st, q_tile=(4, 4), kv_tile=(4, 4))
        mask = neighborhood_mask(shape, ks, st)
        n = math.prod(shape)
        assert sim.flop_density == pytest.approx(mask.sum().item() / n ** 2)
        assert sim.visited_density >= sim.flop_density - 1e-12


def test_exact_test_agrees_with_natten_closed_form_1d():
    """Our count-based test vs NATTEN's is_fully_block_sparse on 1-D settings with L divisible by the tiles."""
    disagreements = []
    for L in (64, 96, 128):
        for K in range(8, L + 1, 4):
            for s in range(1, K + 1):
                for tq, tkv in ((16, 16), (32, 16), (16, 32)):
                    ours = simulate((L,), K, s, q_tile=(tq,), kv_tile=(tkv,)).perfectly_block_sparse
                    theirs = natten_fully_block_sparse((L,), K, s, 1, False, (tq,), (tkv,))
                    if theirs and not ours:
                        disagreements.append((L, K, s, tq, tkv))
    # NATTEN's closed form is sufficient: whenever it says yes, no tile pair is masked in our kernel
    assert not disagreements, disagreements[:10]


def test_propose_stride_1d_32k_matches_natten_docs():
    # NATTEN docs: for 32K tokens and a 2K window, stride 256 is the minimum fully block-sparse stride (T_q = 256)
    p = propose_stride((32768,), 2048, q_tile=(256,), kv_tile=(128,))
    assert p is not None and p.stride == (256,)
    assert p.simulation.perfectly_block_sparse


def test_propose_stride_is_minimal_and_searches_tiles():
    p = propose_stride((256, 256), (80, 80), q_tile=(16, 8), kv_tile=(16, 8))
    assert p is not None and p.simulation.perfectly_block_sparse
    assert p.stride == (16, 16)  # the GNA paper's FLUX-4K stride
    for s0 in range(1, p.stride[0]):
        assert not simulate((256, 256), (80, 80), (s0, p.stride[1]), q_tile=(16, 8), kv_tile=(16, 8)).perfectly_block_sparse
    free = propose_stride((30, 48, 80), (18, 24, 24))
    assert free is not None and free.simulation.perfectly_block_sparse
    assert math.prod(free.stride) <= 16 * 8 * 8
    assert "stride" in str(free)


def test_simulator_rejects_bad_tiles():
    with pytest.raises(ValueError, match="q_tile"):
        simulate((16, 16), 4, q_tile=(4,), kv_tile=(4, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        simulate((16,), 17)


@pytest.mark.parametrize("q_tile,kv_tile", [((2, 4), (4, 4)), ((4, 4), (3, 8)), ((4, 4), (2, 2))])
def test_simulator_and_kernel_share_one_tile_rule(q_tile, kv_tile):
    """Tiles the Triton kernel cannot run (not powers of two, product < 16) are refused by both, alike."""
    from diffattn.kernels.neighborhood import get_plan

    with pytest.raises(ValueError, match="powers of two with a product >= 16") as sim_err:
        simulate((16, 16), 4, q_tile=q_tile, kv_tile=kv_tile)
    with pytest.raises(ValueError, match="powers of two with a product >= 16") as plan_err:
        get_plan((16, 16), (4, 4), (1, 1), (1, 1), (False, False), q_tile, kv_tile)
    assert str(sim_err.value) == str(plan_err.value)


def test_simulator_is_torch_free_of_devices():
    # pure host computation; also usable before any tensor exists
    assert torch.cuda.is_available() in (True, False)
    assert simulate((8,), 4).q_tiles >= 1
