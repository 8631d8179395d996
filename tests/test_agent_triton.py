"""AgentSD's fused bipartite best-match kernel (`kernels.bipartite`) against its float32 reference.

Runs on CUDA when there is a GPU; otherwise only under TRITON_INTERPRET=1 (CPU, small shapes), which
test_agent.py::test_triton_kernels_under_interpreter arranges in a subprocess. (bf16 only on CUDA: the interpreter's
bf16 dot is not faithful.)"""

from __future__ import annotations


import pytest
import torch

from interpreter import triton_device_and_mark  # noqa: E402

DEV, pytestmark = triton_device_and_mark("test_agent.py")

from diffattn.kernels.agent import bipartite_partition, merge_assignment  # noqa: E402
from diffattn.kernels.bipartite import (  # noqa: E402
    assign_slots,
    assign_slots_reference,
    best_match,
    best_match_reference,
)

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)] + ([(torch.bfloat16, 1e-2)] if DEV == "cuda" else [])


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("batch,h,w,c,sx,sy", [(2, 7, 10, 24, 2, 2), (1, 12, 12, 70, 2, 2), (3, 9, 13, 16, 3, 2),
                                               (1, 17, 16, 40, 4, 4)])
def test_best_match_matches_reference(dtype, tol, batch, h, w, c, sx, sy):
    g = torch.Generator().manual_seed(h * w + c)
    metric = torch.randn(batch, h * w, c, generator=g).to(DEV, dtype)
    dst, src = bipartite_partition(h, w, sx, sy, generator=g, device=DEV)
    best, idx = best_match(metric, dst, src, backend="triton")
    ref_best, ref_idx = best_match_reference(metric, dst, src)
    assert best.dtype == torch.float32 and idx.dtype == torch.long and idx.shape == (batch, src.numel())
    torch.testing.assert_close(best, ref_best, rtol=tol, atol=tol)
    # The chosen destination is a best one (its reference score is the max, up to rounding); exact ties aside,
    # it is the reference's choice.
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    chosen = (m[:, src] * m[:, dst][torch.arange(batch, device=DEV)[:, None], idx]).sum(-1)
    torch.testing.assert_close(chosen, ref_best, rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert (idx == ref_idx).float().mean() > 0.99


def test_best_match_ties_pick_the_first_destination_across_tiles():
    # Destinations 1 and 30 are the same vector (different tiles of 16); a source equal to it must pick 1, as torch.max.
    h, w = 12, 12
    dst, src = bipartite_partition(h, w, 2, 2, randomize=False, device=DEV)
    metric = torch.randn(1, h * w, 20, generator=torch.Generator().manual_seed(0)).to(DEV)
    metric[0, dst[30]] = metric[0, dst[1]]
    metric[0, src[5]] = 3.0 * metric[0, dst[1]]
    _, idx = best_match(metric, dst, src, backend="triton")
    _, ref_idx = best_match_reference(metric, dst, src)
    assert int(ref_idx[0, 5]) == 1 and int(idx[0, 5]) == 1


@pytest.mark.parametrize("batch,h,w,sx,sy,counts", [(2, 7, 10, 2, 2, [5, 40]), (1, 9, 13, 3, 2, [0]),
                                                     (3, 17, 16, 4, 4, [100, 255])])
def test_assign_slots_matches_reference(batch, h, w, sx, sy, counts):
    g = torch.Generator().manual_seed(batch + h)
    dst, src = bipartite_partition(h, w, sx, sy, generator=g, device=DEV)
    ns = src.numel()
    counts = [min(c, ns) for c in counts]
    rank = torch.stack([torch.randperm(ns, generator=g) for _ in range(batch)]).to(DEV)
    best_dst = torch.randint(dst.numel(), (batch, ns), generator=g).to(DEV)
    got = assign_slots(rank, best_dst, dst, src, h * w, counts, backend="triton")
    ref = assign_slots_reference(rank, best_dst, dst, src, h * w, counts)
    for (a, wt), (b, wr), r in zip(got, ref, counts):
        assert torch.equal(a, b) and wt.shape == (batch, h * w - r)
        torch.testing.assert_close(wt, wr, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot merge"):
        assign_slots(rank, best_dst, dst, src, h * w, [ns + 1], backend="triton")


def test_merge_assignment_same_with_fused_and_reference_similarity():
    g = torch.Generator().manual_seed(4)
    h, w = 11, 14
    metric = torch.randn(2, h * w, 32, generator=g).to(DEV)
    dst, src = bipartite_partition(h, w, 2, 2, generator=g, device=DEV)
    counts = [40, src.numel()]
    fused = merge_assignment(metric, dst, src, counts, backend="triton")
    plain = merge_assignment(metric, dst, src, counts, backend="reference")
    for (a, s), (b, t) in zip(fused, plain):
        assert s == t and torch.equal(a, b)


def test_best_match_rejects_bad_arguments():
    m = torch.randn(1, 8, 4, device=DEV)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        best_match(m[0], torch.arange(2, device=DEV), torch.arange(2, 8, device=DEV))
    with pytest.raises(ValueError, match="dst"):
        best_match(m, torch.arange(0, device=DEV), torch.arange(8, device=DEV))
    with pytest.raises(TypeError, match="metric"):
        best_match([1], torch.arange(2), torch.arange(2, 8))
