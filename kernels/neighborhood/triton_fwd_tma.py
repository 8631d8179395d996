"""Experimental Hopper path: the perfectly block-sparse forward over permuted tokens with TMA tensor descriptors.

Only for plans with no masked tile pair, no text tokens, no lse (the GNA fast path). Every query tile and key
tile is one contiguous run of rows in the permuted `[B, G, H, N_pad, D]` layout, so each load is one 2-D TMA
box. Measured against the pointer-based kernel in `bench.py`; not used by `neighborhood_attention` unless it wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import Plan
from .triton_fwd import LOG2E, _pad3, axis_tables


@triton.jit
def _na_fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o,
    QT0, QT1, QT2,
    NQ0, NQ1, NQ2, NK1, NK2, NPQ, NPK,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bgh = tl.program_id(1)
    qt2 = pid_t % NQ2
    qt1 = (pid_t // NQ2) % NQ1
    qt0 = pid_t // (NQ2 * NQ1)
    # pid_bgh = b * heads + h (no dilation on this path): its rows start at pid_bgh * N_pad
    lo0 = tl.load(QT0 + qt0 * 4)
    hi0 = tl.load(QT0 + qt0 * 4 + 1)
    lo1 = tl.load(QT1 + qt1 * 4)
    hi1 = tl.load(QT1 + qt1 * 4 + 1)
    lo2 = tl.load(QT2 + qt2 * 4)
    hi2 = tl.load(QT2 + qt2 * 4 + 1)
    q_row = pid_bgh * NPQ + pid_t * BLOCK_M
    kv_row0 = pid_bgh * NPK
    q = desc_q.load([q_row, 0])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    c1 = hi1 - lo1
    c2 = hi2 - lo2
    count = (hi0 - lo0) * c1 * c2
    for it in tl.range(0, count, warp_specialize=WS):
        k2 = lo2 + it % c2
        k1 = lo1 + (it // c2) % c1
        k0 = lo0 + it // (c2 * c1)
        row = kv_row0 + ((k0 * NK1 + k1) * NK2 + k2) * BLOCK_N
        kk = desc_k.load([row, 0])
        vv = desc_v.load([row, 0])
        qk = tl.dot(q, tl.trans(kk)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vv.dtype), vv, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    desc_o.store([q_row, 0], out.to(desc_o.dtype))


def na_forward_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                   num_warps: int = 8, num_stages: int = 3, warp_specialize: bool = False) -> torch.Tensor:
    """q `[B, 1, H, Nq_pad, D]`, k/v `[B, 1, H, Nk_pad, D]` contiguous (permuted, no dilation); returns out like q."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if plan.groups != 1:
        raise ValueError("the TMA path handles dilation 1 only")
    if plan.counts()["masked"]:
        raise ValueError("the TMA path needs a perfectly block-sparse plan")
    b, _, h, npq, d = q.shape
    npk = k.shape[3]
    bm, bn = plan.block_m, plan.block_n
    out = torch.empty_like(q)
    q2, k2, v2, o2 = (t.reshape(-1, d) for t in (q, k, v, out))
    dq = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [bm, d])
    dk = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [bn, d])
    dv = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [bn, d])
    do = TensorDescriptor(o2, list(o2.shape), list(o2.stride()), [bm, d])
    tabs = axis_tables(plan, q.device)
    ax = plan.axes
    nq = _pad3([a.n_q_tiles for a in ax], 1)
    nk = _pad3([a.n_kv_tiles for a in ax], 1)
    grid = (nq[0] * nq[1] * nq[2], b * h)
    _na_fwd_tma_kernel[grid](
        dq, dk, dv, do, tabs[1], tabs[4], tabs[7],
        nq[0], nq[1], nq[2], nk[1], nk[2], npq, npk,
        scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, WS=warp_specialize, num_warps=num_warps, num_stages=num_stages,
    )
    return out
