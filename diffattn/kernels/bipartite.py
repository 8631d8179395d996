"""Fused bipartite matching for token merging: each source token's most similar destination, in one kernel.

ToMe/AgentSD's similarity step is `cosine(x[src], x[dst])` followed by a row max and argmax. Done with PyTorch it is
~8 launches (cast, norm, clamp, divide, two row gathers, a batched matmul, max) and materialises the `[B, Ns, Nd]`
score matrix: 0.4 GB fp32 per block at SD1.5 1024x1024, 6.4 GB at 2048x2048. `best_match` instead reads the metric
rows through the `src`/`dst` index vectors, accumulates the dot products and both squared norms in fp32 tile by
tile (tensor cores on fp16/bf16 metrics), and keeps a running max/argmax per source row: one launch, no score matrix.

Backends (the shared vocabulary of `kernels.common`): "triton" (the fused kernel; CUDA, or CPU under
`TRITON_INTERPRET=1`), "blocked" (PyTorch matmuls in the metric's dtype, by chunks of sources: `best_match_blocked`)
and "reference" (PyTorch in float32, `best_match_reference`). `best_match` defaults to "blocked": on the H200 the
first fused kernel lost even to the float32 cuBLAS matmul (BENCHMARKS.md, AgentSD); the kernel here is its
second version (precomputed inverse norms, row-major tiles), opt-in until it is measured faster. `assign_slots`
defaults to Triton where it runs.
`DIFFATTN_AGENT_BACKEND` sets both defaults.
"""

from __future__ import annotations

import os

import torch

from .common import check_tensors, resolve_backend, triton_importable

__all__ = ["assign_slots", "assign_slots_reference", "best_match", "best_match_blocked", "best_match_reference",
           "ENV_VAR"]

ENV_VAR = "DIFFATTN_AGENT_BACKEND"


def best_match_reference(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in float32: `(best [B, Ns] float32, best_dst [B, Ns] long)` where `best_dst[b, i]` is the
    position in `dst` of the destination with the largest cosine similarity to source `src[i]`."""
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, src] @ m[:, dst].transpose(1, 2)  # [B, Ns, Nd]
    best, best_dst = scores.max(dim=-1)
    return best, best_dst


def best_match_blocked(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, *,
                       max_scores: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch in the metric's dtype (tensor-core matmuls for fp16/bf16, as upstream ToMe), rows normalised in
    float32 first, the `[B, Ns, Nd]` scores made by chunks of sources so that at most `max_scores` exist at once."""
    m = metric.float()
    m = (m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(metric.dtype)
    a, b = m[:, src], m[:, dst].transpose(1, 2)
    rows = max(1, max_scores // max(1, metric.shape[0] * dst.numel()))
    bests, idxs = [], []
    for start in range(0, src.numel(), rows):
        best, idx = (a[:, start:start + rows] @ b).max(dim=-1)
        bests.append(best.float())
        idxs.append(idx)
    if len(bests) == 1:
        return bests[0], idxs[0]
    return torch.cat(bests, 1), torch.cat(idxs, 1)


def best_match(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, *,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each source's best destination by cosine similarity of `metric [B, N, C]` rows: `(best [B, Ns] float32,
    best_dst [B, Ns] long)`. `dst`, `src`: long index vectors into N (shared by the batch)."""
    check_tensors(metric=metric, dst=dst, src=src)
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    if dst.ndim != 1 or src.ndim != 1 or dst.numel() == 0:
        raise ValueError(f"dst and src must be 1-D index vectors (dst non-empty), got {tuple(dst.shape)}, {tuple(src.shape)}")
    if backend is None and not os.environ.get(ENV_VAR):
        backend = "blocked"  # the fused kernel is opt-in until measured faster (module docstring)
    backend = resolve_backend(backend, metric.device, ENV_VAR)
    if backend == "reference" or src.numel() == 0:
        return best_match_reference(metric, dst, src)
    if backend == "blocked":
        return best_match_blocked(metric, dst, src)
    return _best_match_triton(metric, dst, src)


def assign_slots_reference(rank: torch.Tensor, best_dst: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                           n: int, counts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each `r` in `counts`: `(assign [B, N] long, weights [B, N - r] float32)`. Destination `j` keeps slot
    `j`; a source of rank `< r` joins its best destination's slot, the others get slots `Nd + rank - r` (ranking
    order). `weights` = 1 / tokens per slot (every slot holds at least one token)."""
    batch, ns = rank.shape
    nd = dst.numel()
    out = []
    for r in counts:
        src_slot = torch.where(rank < r, best_dst, nd + rank - r)  # [B, Ns]
        assign = torch.empty(batch, n, dtype=torch.long, device=rank.device)
        assign[:, dst] = torch.arange(nd, device=rank.device)
        assign[:, src] = src_slot
        count = torch.zeros(batch, n - r, dtype=torch.float32, device=rank.device)
        count.scatter_add_(1, assign, torch.ones(assign.shape, dtype=torch.float32, device=rank.device))
        out.append((assign, count.clamp_min_(1).reciprocal_()))
    return out


def assign_slots(rank: torch.Tensor, best_dst: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, n: int,
                 counts: list[int], *, backend: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`assign_slots_reference` in one Triton launch for up to two counts (the merge and the agents), plus one
    zero-fill and one reciprocal per count, instead of ~12 launches each."""
    for r in counts:
        if not 0 <= r <= src.numel():
            raise ValueError(f"cannot merge r={r} of {src.numel()} source tokens")
    backend = resolve_backend(backend, rank.device, ENV_VAR)
    if backend != "triton" or not 1 <= len(counts) <= 2 or dst.numel() + src.numel() != n:
        return assign_slots_reference(rank, best_dst, dst, src, n, counts)
    return _assign_slots_triton(rank, best_dst, dst, src, n, counts)


if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _best_match_kernel(m_ptr, inv_ptr, dst_ptr, src_ptr, best_ptr, idx_ptr, n_tok, n_src, n_dst, channels,
                           stride_b, stride_n, stride_c,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        base = m_ptr + b * stride_b
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_src
        src_tok = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        inv_a = tl.load(inv_ptr + b * n_tok + src_tok, mask=row_ok, other=0.0)
        ks = tl.arange(0, BLOCK_K)
        run_best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_idx = tl.zeros((BLOCK_M,), dtype=tl.int32)
        cols0 = tl.arange(0, BLOCK_N)
        for n0 in range(0, n_dst, BLOCK_N):
            cols = n0 + cols0
            col_ok = cols < n_dst
            dst_tok = tl.load(dst_ptr + cols, mask=col_ok, other=0).to(tl.int64)
            inv_b = tl.load(inv_ptr + b * n_tok + dst_tok, mask=col_ok, other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, channels, BLOCK_K):
                k_ok = (k0 + ks) < channels
                a = tl.load(base + src_tok[:, None] * stride_n + (k0 + ks)[None, :] * stride_c,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                bb = tl.load(base + dst_tok[:, None] * stride_n + (k0 + ks)[None, :] * stride_c,
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(a, tl.trans(bb), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(bb), acc)
            cos = acc * inv_a[:, None] * inv_b[None, :]
            cos = tl.where(col_ok[None, :], cos, float("-inf"))
            tile_best = tl.max(cos, axis=1)
            tile_idx = tl.argmax(cos, axis=1).to(tl.int32) + n0
            better = tile_best > run_best  # strict: the earlier destination wins a tie, as torch.max's first index
            run_best = tl.where(better, tile_best, run_best)
            run_idx = tl.where(better, tile_idx, run_idx)
        out = b * n_src + rows
        tl.store(best_ptr + out, run_best, mask=row_ok)
        tl.store(idx_ptr + out, run_idx.to(tl.int64), mask=row_ok)


def _best_match_triton(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, channels = metric.shape
    ns, nd = src.numel(), dst.numel()
    best = torch.empty(batch, ns, dtype=torch.float32, device=metric.device)
    idx = torch.empty(batch, ns, dtype=torch.long, device=metric.device)
    # Inverse row norms once (float32), so the kernel's inner loop is only the dot products.
    inv = torch.linalg.vector_norm(metric.float(), dim=-1).clamp_min_(1e-12).reciprocal_()
    block_k = 64 if channels >= 64 else max(16, triton.next_power_of_2(channels))
    cuda = metric.device.type == "cuda"
    block_m, block_n = (128, 64) if cuda else (16, 16)
    grid = (triton.cdiv(ns, block_m), batch)
    _best_match_kernel[grid](
        metric, inv, dst.contiguous(), src.contiguous(), best, idx, metric.shape[1], ns, nd, channels,
        metric.stride(0), metric.stride(1), metric.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=metric.dtype == torch.float32,
        num_warps=8 if cuda else 4, num_stages=3 if cuda else 1,
    )
    return best, idx


if triton_importable():

    @triton.jit
    def _assign_kernel(rank_ptr, best_ptr, dst_ptr, src_ptr, a0_ptr, c0_ptr, a1_ptr, c1_ptr, n_tok, n_dst, n_src,
                       r0, r1, TWO: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_dst = p < n_dst
        in_src = (p >= n_dst) & (p < n_tok)
        i = tl.where(in_src, p - n_dst, 0)
        tok = tl.where(in_dst, tl.load(dst_ptr + p, mask=in_dst, other=0),
                       tl.load(src_ptr + i, mask=in_src, other=0)).to(tl.int64)
        rk = tl.load(rank_ptr + b * n_src + i, mask=in_src, other=0)
        bd = tl.load(best_ptr + b * n_src + i, mask=in_src, other=0)
        valid = in_dst | in_src
        dst_slot = p.to(tl.int64)
        slot0 = tl.where(in_dst, dst_slot, tl.where(rk < r0, bd, n_dst + rk - r0))
        tl.store(a0_ptr + b * n_tok + tok, slot0, mask=valid)
        tl.atomic_add(c0_ptr + b * (n_tok - r0) + slot0, tl.full((BLOCK,), 1.0, tl.float32), mask=valid)
        if TWO:
            slot1 = tl.where(in_dst, dst_slot, tl.where(rk < r1, bd, n_dst + rk - r1))
            tl.store(a1_ptr + b * n_tok + tok, slot1, mask=valid)
            tl.atomic_add(c1_ptr + b * (n_tok - r1) + slot1, tl.full((BLOCK,), 1.0, tl.float32), mask=valid)


def _assign_slots_triton(rank, best_dst, dst, src, n, counts):
    batch, ns = rank.shape
    dev = rank.device
    assigns = [torch.empty(batch, n, dtype=torch.long, device=dev) for _ in counts]
    tallies = [torch.zeros(batch, n - r, dtype=torch.float32, device=dev) for r in counts]
    two = len(counts) == 2
    block = 1024 if dev.type == "cuda" else 64
    _assign_kernel[(triton.cdiv(n, block), batch)](
        rank.contiguous(), best_dst.contiguous(), dst.contiguous(), src.contiguous(), assigns[0], tallies[0],
        assigns[-1], tallies[-1], n, dst.numel(), ns, counts[0], counts[-1], TWO=two, BLOCK=block)
    # Tallies are sums of 1.0 (exact integers): the atomics' order does not change them.
    return [(a, t.reciprocal_()) for a, t in zip(assigns, tallies)]
