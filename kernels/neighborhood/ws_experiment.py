"""Kernel-only forward on NATTEN-style permuted tokens with Triton's automatic warp specialization (Hopper).

Triton 3.5+ warp-specializes an attention loop on Hopper (a TMA producer warp, two consumer warpgroups that split the
128 query rows, register reallocation) only when tiles come from *device-side* descriptors (`tl.make_tensor_descriptor`,
triton PR 7658); with the front door's host-side descriptors `warp_specialize=True` is a no-op (NOTES.md item 7).
This kernel is the perfectly block-sparse GNA loop over permuted `[B*H*N_pad, D]` rows (each tile contiguous, 2-D
boxes, the pattern the compiler handles): +10% over the front door's kernel at the same tiles on H100 (NOTES.md item
9). It is what the bench reports as our kernel-only time against NATTEN's kernel-only figures, which also exclude
the permutation. It is not in the front door: permuting q/k/v and un-permuting the output costs more than it gains,
and the in-place 5-D boxes the front door reads do not survive the warp-specialization pass (compile failure at
128-row tiles, wrong results at 64; NOTES.md item 9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import Plan
from .triton_fwd import LOG2E, _pad3, _softmax_step, axis_tables


@triton.jit
def _ws_kernel(
    Q, K, V, O, QT0, QT1, QT2,
    NQ1, NQ2, NK1, NK2, NPQ, NPK, ROWS_Q, ROWS_K,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qt2 = pid_t % NQ2
    qt1 = (pid_t // NQ2) % NQ1
    qt0 = pid_t // (NQ2 * NQ1)
    lo0 = tl.load(QT0 + qt0 * 4)
    hi0 = tl.load(QT0 + qt0 * 4 + 1)
    lo1 = tl.load(QT1 + qt1 * 4)
    hi1 = tl.load(QT1 + qt1 * 4 + 1)
    lo2 = tl.load(QT2 + qt2 * 4)
    hi2 = tl.load(QT2 + qt2 * 4 + 1)
    desc_q = tl.make_tensor_descriptor(Q, shape=[ROWS_Q, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K, shape=[ROWS_K, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V, shape=[ROWS_K, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O, shape=[ROWS_Q, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    q_row = pid_bh * NPQ + pid_t * BLOCK_M
    q = desc_q.load([q_row, 0])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    c1 = hi1 - lo1
    c2 = hi2 - lo2
    count = (hi0 - lo0) * c1 * c2
    for it in tl.range(0, count, num_stages=STAGES, warp_specialize=WS):
        k0 = lo0 + it // (c2 * c1)
        k1 = lo1 + (it // c2) % c1
        k2 = lo2 + it % c2
        row = pid_bh * NPK + ((k0 * NK1 + k1) * NK2 + k2) * BLOCK_N
        kk = desc_k.load([row, 0])
        vv = desc_v.load([row, 0])
        qk = tl.dot(q, tl.trans(kk))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, vv, qk_scale)
    desc_o.store([q_row, 0], (acc / l_i[:, None]).to(O.dtype.element_ty))


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def na_forward_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                  warp_specialize: bool = True, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q `[B, 1, H, Nq_pad, D]` permuted with the plan's q tile, k/v `[B, 1, H, Nk_pad, D]` with its kv tile
    (`tiling.permute_tokens`, contiguous); perfectly block-sparse plans without dilation or text tokens. Returns the
    output in q's permuted layout. Defaults: the winning H100 launch (4 warps + the producer, 2 stages)."""
    if plan.groups != 1 or plan.counts()["masked"]:
        raise ValueError("na_forward_ws handles perfectly block-sparse plans without dilation")
    if q.device.type == "cuda":
        triton.set_allocator(_alloc)  # device-side descriptors need global scratch
    b, _, h, npq, d = q.shape
    npk = k.shape[3]
    ax = plan.axes
    nq = _pad3([a.n_q_tiles for a in ax], 1)
    nk = _pad3([a.n_kv_tiles for a in ax], 1)
    out = torch.empty_like(q)
    tabs = axis_tables(plan, q.device)
    _ws_kernel[(nq[0] * nq[1] * nq[2], b * h)](
        q, k, v, out, tabs[1], tabs[4], tabs[7],
        nq[1], nq[2], nk[1], nk[2], npq, npk, b * h * npq, b * h * npk,
        scale * LOG2E,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, HEAD_DIM=d, WS=warp_specialize, STAGES=num_stages,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
