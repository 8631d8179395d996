"""Experiment (GPU only, not used by the front door): Triton's automatic warp specialization on Hopper.

Triton 3.5+ warp-specializes an attention loop on Hopper (a TMA producer warp, consumer warpgroups) only when the
tiles come from *device-side* tensor descriptors (`tl.make_tensor_descriptor`; triton PR 7658); the front door's
kernel uses host-side descriptors, where `warp_specialize=True` measured as a no-op (NOTES.md item 7). This kernel
is the perfectly block-sparse GNA loop with device-side descriptors, in two layouts:
- "perm": NATTEN-style permuted `[B*H*N_pad, D]` rows (each tile contiguous; 2-D boxes, the tutorial's pattern);
- "inplace": 5-D boxes of the caller's `[B, *spatial, H, D]` (contiguous), as the front door reads them.
`python -m diffattn.kernels.neighborhood.bench --cases flux-gna,hunyuan-gna --ws-experiment` times it.
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
    NQ0, NQ1, NQ2, NK1, NK2, NPQ, NPK, L0, L1, L2, H, B,
    qk_scale,
    NDIM: tl.constexpr, TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr, HEAD_DIM: tl.constexpr,
    INPLACE: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_N: tl.constexpr = TK0 * TK1 * TK2
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    b = pid_bh // H
    qt2 = pid_t % NQ2
    qt1 = (pid_t // NQ2) % NQ1
    qt0 = pid_t // (NQ2 * NQ1)
    lo0 = tl.load(QT0 + qt0 * 4)
    hi0 = tl.load(QT0 + qt0 * 4 + 1)
    lo1 = tl.load(QT1 + qt1 * 4)
    hi1 = tl.load(QT1 + qt1 * 4 + 1)
    lo2 = tl.load(QT2 + qt2 * 4)
    hi2 = tl.load(QT2 + qt2 * 4 + 1)
    if INPLACE:
        if NDIM == 2:
            desc_q = tl.make_tensor_descriptor(
                Q, shape=[B, L0, L1, H, HEAD_DIM], strides=[L0 * L1 * H * HEAD_DIM, L1 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[1, TQ0, TQ1, 1, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(
                K, shape=[B, L0, L1, H, HEAD_DIM], strides=[L0 * L1 * H * HEAD_DIM, L1 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[1, TK0, TK1, 1, HEAD_DIM])
            desc_v = tl.make_tensor_descriptor(
                V, shape=[B, L0, L1, H, HEAD_DIM], strides=[L0 * L1 * H * HEAD_DIM, L1 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[1, TK0, TK1, 1, HEAD_DIM])
            desc_o = tl.make_tensor_descriptor(
                O, shape=[B, L0, L1, H, HEAD_DIM], strides=[L0 * L1 * H * HEAD_DIM, L1 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[1, TQ0, TQ1, 1, HEAD_DIM])
            q = desc_q.load([b, qt0 * TQ0, qt1 * TQ1, h, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            desc_q = tl.make_tensor_descriptor(
                Q, shape=[B * L0, L1, L2, H, HEAD_DIM], strides=[L1 * L2 * H * HEAD_DIM, L2 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[TQ0, TQ1, TQ2, 1, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(
                K, shape=[B * L0, L1, L2, H, HEAD_DIM], strides=[L1 * L2 * H * HEAD_DIM, L2 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[TK0, TK1, TK2, 1, HEAD_DIM])
            desc_v = tl.make_tensor_descriptor(
                V, shape=[B * L0, L1, L2, H, HEAD_DIM], strides=[L1 * L2 * H * HEAD_DIM, L2 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[TK0, TK1, TK2, 1, HEAD_DIM])
            desc_o = tl.make_tensor_descriptor(
                O, shape=[B * L0, L1, L2, H, HEAD_DIM], strides=[L1 * L2 * H * HEAD_DIM, L2 * H * HEAD_DIM, H * HEAD_DIM, HEAD_DIM, 1],
                block_shape=[TQ0, TQ1, TQ2, 1, HEAD_DIM])
            q = desc_q.load([b * L0 + qt0 * TQ0, qt1 * TQ1, qt2 * TQ2, h, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        rows_q = B * H * NPQ
        rows_k = B * H * NPK
        desc_q = tl.make_tensor_descriptor(Q, shape=[rows_q, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        desc_k = tl.make_tensor_descriptor(K, shape=[rows_k, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        desc_v = tl.make_tensor_descriptor(V, shape=[rows_k, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        desc_o = tl.make_tensor_descriptor(O, shape=[rows_q, HEAD_DIM], strides=[HEAD_DIM, 1],
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
        if INPLACE:
            if NDIM == 2:
                kk = desc_k.load([b, k0 * TK0, k1 * TK1, h, 0]).reshape(BLOCK_N, HEAD_DIM)
                vv = desc_v.load([b, k0 * TK0, k1 * TK1, h, 0]).reshape(BLOCK_N, HEAD_DIM)
            else:
                kk = desc_k.load([b * L0 + k0 * TK0, k1 * TK1, k2 * TK2, h, 0]).reshape(BLOCK_N, HEAD_DIM)
                vv = desc_v.load([b * L0 + k0 * TK0, k1 * TK1, k2 * TK2, h, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            row = pid_bh * NPK + ((k0 * NK1 + k1) * NK2 + k2) * BLOCK_N
            kk = desc_k.load([row, 0])
            vv = desc_v.load([row, 0])
        qk = tl.dot(q, tl.trans(kk))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, vv, qk_scale)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if INPLACE:
        if NDIM == 2:
            desc_o.store([b, qt0 * TQ0, qt1 * TQ1, h, 0], out.reshape(1, TQ0, TQ1, 1, HEAD_DIM))
        else:
            desc_o.store([b * L0 + qt0 * TQ0, qt1 * TQ1, qt2 * TQ2, h, 0], out.reshape(TQ0, TQ1, TQ2, 1, HEAD_DIM))
    else:
        desc_o.store([q_row, 0], out)


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def na_forward_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float, layout: str,
                  warp_specialize: bool, num_warps: int, num_stages: int, maxnreg: int | None = None) -> torch.Tensor:
    """Perfectly block-sparse, no dilation, no text tokens. layout "inplace": q/k/v contiguous `[B, *spatial, H, D]`
    (2-D or 3-D); "perm": `[B, 1, H, N_pad, D]` from `permute_tokens` (q with the q tile, k/v with the kv tile)."""
    if plan.groups != 1 or plan.counts()["masked"] or plan.ndim not in (2, 3):
        raise ValueError("the experiment handles perfectly block-sparse 2-D/3-D plans without dilation")
    triton.set_allocator(_alloc)  # device-side descriptors need global scratch
    ax = plan.axes
    nq = _pad3([a.n_q_tiles for a in ax], 1)
    nk = _pad3([a.n_kv_tiles for a in ax], 1)
    ls = _pad3([a.length for a in ax], 1)
    tq = _pad3(list(plan.q_tile), 1)
    tk = _pad3(list(plan.kv_tile), 1)
    inplace = layout == "inplace"
    if inplace:
        b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
        npq = npk = 0
    else:
        b, _, h, npq, d = q.shape
        npk = k.shape[3]
    out = torch.empty_like(q)
    tabs = axis_tables(plan, q.device)
    grid = (nq[0] * nq[1] * nq[2], b * h)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    _ws_kernel[grid](
        q, k, v, out, tabs[1], tabs[4], tabs[7],
        nq[0], nq[1], nq[2], nk[1], nk[2], npq, npk, ls[0], ls[1], ls[2], h, b,
        scale * LOG2E,
        NDIM=plan.ndim, TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2], HEAD_DIM=d,
        INPLACE=inplace, WS=warp_specialize, STAGES=num_stages, num_warps=num_warps, num_stages=num_stages, **extra,
    )
    return out
