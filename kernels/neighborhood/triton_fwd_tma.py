"""Hopper TMA path for perfectly block-sparse plans (no masked tile pair): the GNA fast path.

`na_forward_tma_inplace` (used by `neighborhood_attention` on sm90+ when `tma_inplace_ok`): every query/key tile is
one multi-dimensional TMA box read straight out of the caller's `[B, *spatial, H, D]` tensors, so there is no
permutation copy; text tokens and lse as in the pointer kernel, whose @triton.jit helpers (online-softmax step,
text-token loop, finish) it shares. Measured +11-18% over the pointer kernel on H100 (NOTES.md).
If the descriptors fail at run time (old Triton or driver), the front door logs once and uses the pointer kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import Plan
from .triton_fwd import LOG2E, _extra_tokens, _finish, _pad3, _softmax_step, axis_tables


# ----------------------------------------------------------------------------------------------------------------
# In place: TMA boxes straight out of the caller's `[B, *spatial, H, D]` tensors (no permutation copy).
# The tensors are viewed as 5-D [B', X, Y, H, D] (1-D: [B, L0, 1, H, D]; 2-D: [B, L0, L1, H, D];
# 3-D: [B*L0, L1, L2, H, D]) and a query/key tile is one [T0', T1', T2', 1, D] box, reshaped to [rows, D].


@triton.jit
def _tma_tile(desc, b, h, t0, t1, t2, L0, NDIM: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr,
              T2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Tile (t0, t1, t2) of one (batch, head) as a [rows, D] block: one TMA box of the 5-D view (see `_desc5`)."""
    if NDIM == 1:
        x = desc.load([b, t0 * T0, 0, h, 0])
    elif NDIM == 2:
        x = desc.load([b, t0 * T0, t1 * T1, h, 0])
    else:
        x = desc.load([b * L0 + t0 * T0, t1 * T1, t2 * T2, h, 0])
    return x.reshape(T0 * T1 * T2, HEAD_DIM)


@triton.jit
def _na_fwd_tma_inplace_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, EK, EV,
    QT0, QT1, QT2,
    NQ0, NQ1, NQ2, L0, L1, L2, H,
    sl_b, sl_0, sl_1, sl_2, se_b, se_h, se_t, n_extra,
    qk_scale,
    NDIM: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_EXTRA: tl.constexpr, WRITE_LSE: tl.constexpr,
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
    q = _tma_tile(desc_q, b, h, qt0, qt1, qt2, L0, NDIM, TQ0, TQ1, TQ2, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    c1 = hi1 - lo1
    c2 = hi2 - lo2
    count = (hi0 - lo0) * c1 * c2
    for it in range(0, count):
        k0 = lo0 + it // (c2 * c1)
        k1 = lo1 + (it // c2) % c1
        k2 = lo2 + it % c2
        kk = _tma_tile(desc_k, b, h, k0, k1, k2, L0, NDIM, TK0, TK1, TK2, HEAD_DIM)
        vv = _tma_tile(desc_v, b, h, k0, k1, k2, L0, NDIM, TK0, TK1, TK2, HEAD_DIM)
        qk = tl.dot(q, tl.trans(kk))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, vv, qk_scale)
    offs_d = tl.arange(0, HEAD_DIM)
    if HAS_EXTRA:
        acc, m_i, l_i = _extra_tokens(acc, m_i, l_i, q, EK, EV, b.to(tl.int64) * se_b + h * se_h, se_t, n_extra,
                                      tl.arange(0, BLOCK_N), offs_d, offs_d < HEAD_DIM, qk_scale, BLOCK_N)
    out, lse = _finish(acc, m_i, l_i)
    out = out.to(desc_o.dtype)
    # TMA stores clip rows outside the tensor (padding of the last tile along an axis)
    if NDIM == 1:
        desc_o.store([b, qt0 * TQ0, 0, h, 0], out.reshape(1, TQ0, 1, 1, HEAD_DIM))
    elif NDIM == 2:
        desc_o.store([b, qt0 * TQ0, qt1 * TQ1, h, 0], out.reshape(1, TQ0, TQ1, 1, HEAD_DIM))
    else:
        desc_o.store([b * L0 + qt0 * TQ0, qt1 * TQ1, qt2 * TQ2, h, 0], out.reshape(TQ0, TQ1, TQ2, 1, HEAD_DIM))
    if WRITE_LSE:
        offs_m = tl.arange(0, BLOCK_M)
        x0 = qt0 * TQ0 + offs_m // (TQ1 * TQ2)
        valid = x0 < L0
        off = b.to(tl.int64) * sl_b + h + x0 * sl_0
        if NDIM > 1:
            x1 = qt1 * TQ1 + (offs_m // TQ2) % TQ1
            valid &= x1 < L1
            off += x1 * sl_1
        if NDIM > 2:
            x2 = qt2 * TQ2 + offs_m % TQ2
            valid &= x2 < L2
            off += x2 * sl_2
        tl.store(LSE + off, lse, mask=valid)


def tma_inplace_ok(q: torch.Tensor, plan: Plan) -> bool:
    """Whether the in-place TMA path applies: Hopper or newer, perfectly block-sparse, no dilation, head dim a
    power of two >= 16, 16-byte aligned strides, and (3-D with batch > 1) axis 0 divisible by both tiles."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or plan.groups != 1 or plan.counts()["masked"]:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    esz = q.element_size()
    if q.stride(-1) != 1 or any((st * esz) % 16 for st in q.stride()[:-1]) or q.data_ptr() % 16:
        return False
    if plan.ndim == 3 and q.shape[0] > 1:
        l0 = q.shape[1]
        if l0 % plan.q_tile[0] or l0 % plan.kv_tile[0] or q.stride(0) != l0 * q.stride(1):
            return False
    return True


def _desc5(t: torch.Tensor, ndim: int, tile: tuple[int, ...]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = t.shape[-1]
    h = t.shape[-2]
    s = t.stride()
    if ndim == 1:
        shape = [t.shape[0], t.shape[1], 1, h, d]
        strides = [s[0], s[1], s[1], s[2], 1]
        block = [1, tile[0], 1, 1, d]
    elif ndim == 2:
        shape = [t.shape[0], t.shape[1], t.shape[2], h, d]
        strides = [s[0], s[1], s[2], s[3], 1]
        block = [1, tile[0], tile[1], 1, d]
    else:
        shape = [t.shape[0] * t.shape[1], t.shape[2], t.shape[3], h, d]
        strides = [s[1], s[2], s[3], s[4], 1]
        block = [tile[0], tile[1], tile[2], 1, d]
    return TensorDescriptor(t, shape, strides, block)


def na_forward_tma_inplace(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
    extra_k: torch.Tensor | None, extra_v: torch.Tensor | None, need_lse: bool,
    num_warps: int = 8, num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward for `tma_inplace_ok` problems; same contract as `triton_fwd.na_forward` (spatial layout).
    8 warps / 3 stages at 128x128 tiles won the H100 sweep (`bench --tma`, NOTES.md)."""
    nd = plan.ndim
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(out.shape[:-1], dtype=torch.float32, device=q.device) if need_lse else out
    dq, dk, dv = _desc5(q, nd, plan.q_tile), _desc5(k, nd, plan.kv_tile), _desc5(v, nd, plan.kv_tile)
    do = _desc5(out, nd, plan.q_tile)
    tabs = axis_tables(plan, q.device)
    ax = plan.axes
    nq = _pad3([a.n_q_tiles for a in ax], 1)
    ls = _pad3([a.length for a in ax], 1)
    tq = _pad3(list(plan.q_tile), 1)
    tk = _pad3(list(plan.kv_tile), 1)
    ls_strides = _pad3([lse.stride(1 + i) for i in range(nd)], 0) if need_lse else [0, 0, 0]
    if extra_k is not None:
        assert extra_v is not None
        ea = [extra_k.stride(0), extra_k.stride(2), extra_k.stride(1), extra_k.shape[1]]
        ek, ev = extra_k, extra_v
    else:
        ea, ek, ev = [0, 0, 0, 0], q, q
    grid = (nq[0] * nq[1] * nq[2], b * h)
    _na_fwd_tma_inplace_kernel[grid](
        dq, dk, dv, do, lse, ek, ev, tabs[1], tabs[4], tabs[7],
        nq[0], nq[1], nq[2], ls[0], ls[1], ls[2], h,
        lse.stride(0) if need_lse else 0, *ls_strides, *ea,
        scale * LOG2E,
        NDIM=nd, TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2], HEAD_DIM=d,
        HAS_EXTRA=extra_k is not None, WRITE_LSE=need_lse, num_warps=num_warps, num_stages=num_stages,
    )
    return out, (lse if need_lse else None)
