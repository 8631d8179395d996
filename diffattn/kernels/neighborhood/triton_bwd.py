"""Triton backward for neighborhood attention (FlashAttention-2 style, recomputing P from the saved lse).

Three kernels:
- dQ: one program per query tile, visiting the same key-tile box as the forward (mask-free inner box + masked slabs)
  and the text tokens;
- dK/dV: one program per key tile, visiting the query tiles whose box contains it (the inverse relation,
  `AxisPlan.kv_tab`), again mask-free where the pair is full;
- dK/dV of the text tokens: one program per text tile, visiting every query tile of every dilation group.
delta = rowsum(dO * O) - dlse (dlse: gradient flowing into the returned lse) comes first, from the block-sparse
backward's fused delta kernel (one launch, no float32 copies of O and dO).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from .tiling import Plan
from .triton_fwd import (LOG2E, addressing, axis_tables, cdiv, group_len, inside, intra, pad3, program_coords,
                         row_windows, tile_range, window_ok)

logger = logging.getLogger("diffattn")


@triton.jit
def _dq_box(
    dq, q, do, lse2, delta, K, V, kv_base,
    lo0, hi0, lo1, hi1, lo2, hi2,
    n0, n1, n2, offs_d, dmask,
    k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
    lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
    NDIM: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr, MASKED: tl.constexpr,
    FIRST: tl.constexpr = False,
):
    """Accumulate dQ of one query tile over the key tiles in [lo, hi) per axis.

    FIRST (the box whose `dq` comes in as constant zeros): the loop runs at least once, an empty box as one visit
    of tile `lo` with lse = +inf (P = 0 exactly, so it adds nothing). Why: a loop that may run zero times makes
    LLVM re-create the zero accumulator on the skip path, laid out between the loop's last wgmma and its wait;
    ptxas then serializes every wgmma of the kernel (C7515, seen on sm90 at the FLUX-4K and HunyuanVideo-GNA tiles)."""
    c1 = hi1 - lo1
    c2 = hi2 - lo2
    count = (hi0 - lo0) * c1 * c2
    visits = count
    if FIRST:
        visits = tl.maximum(count, 1)
        lse2 = tl.where(count > 0, lse2, float("inf"))
    for it in range(0, visits):
        k2 = lo2 + it % c2
        k1 = lo1 + (it // c2) % c1
        k0 = lo0 + it // (c2 * c1)
        off = kv_base + k0 * k_ts0 + n0 * k_is0
        if NDIM > 1:
            off += k1 * k_ts1 + n1 * k_is1
        if NDIM > 2:
            off += k2 * k_ts2 + n2 * k_is2
        ptr = off[:, None] + offs_d[None, :]
        y0 = k0 * TK0 + n0
        kvalid = y0 < lg0
        if NDIM > 1:
            y1 = k1 * TK1 + n1
            kvalid &= y1 < lg1
        if NDIM > 2:
            y2 = k2 * TK2 + n2
            kvalid &= y2 < lg2
        kk = tl.load(K + ptr, mask=kvalid[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(V + ptr, mask=kvalid[:, None] & dmask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(kk)) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            ok = window_ok(y0, st0, ln0)
            if NDIM > 1:
                ok &= window_ok(y1, st1, ln1)
            if NDIM > 2:
                ok &= window_ok(y2, st2, ln2)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(vv))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kk.dtype), kk, dq)
    return dq


@triton.jit
def _na_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, EK, EV,
    R0, QT0, R1, QT1, R2, QT2,
    sq_b, sq_h, q_gs0, q_gs1, q_gs2, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2,
    sk_b, sk_h, k_gs0, k_gs1, k_gs2, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
    so_b, so_h, o_gs0, o_gs1, o_gs2, o_ts0, o_ts1, o_ts2, o_is0, o_is1, o_is2,
    sl_b, sl_h, l_gs0, l_gs1, l_gs2, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2,
    se_b, se_h, se_t, n_extra,
    H, G, L0, L1, L2, DL0, DL1, DL2, NQ0, NQ1, NQ2, X0, X1, X2,
    qk_scale, scale, head_dim,
    NDIM: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_EXTRA: tl.constexpr,
):
    """Q, DO and DQ share q's addressing ("q_*"; DO/DQ made contiguous like q by the host: "o_*")."""
    BLOCK_M: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_N: tl.constexpr = TK0 * TK1 * TK2
    b, h, g0, g1, g2, qt0, qt1, qt2 = program_coords(tl.program_id(0), tl.program_id(1), H, G, DL0, DL1, DL2,
                                                     NQ0, NQ1, NQ2)
    lg0 = group_len(L0, g0, DL0)
    lg1 = group_len(L1, g1, DL1)
    lg2 = group_len(L2, g2, DL2)
    lo0, hi0, ilo0, ihi0 = tile_range(QT0, g0, NQ0, qt0)
    lo1, hi1, ilo1, ihi1 = tile_range(QT1, g1, NQ1, qt1)
    lo2, hi2, ilo2, ihi2 = tile_range(QT2, g2, NQ2, qt2)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    m0, m1, m2 = intra(offs_m, TQ1, TQ2)
    n0, n1, n2 = intra(offs_n, TK1, TK2)
    x0 = qt0 * TQ0 + m0
    x1 = qt1 * TQ1 + m1
    x2 = qt2 * TQ2 + m2
    qvalid = inside(x0, x1, x2, lg0, lg1, lg2, NDIM)
    b64 = b.to(tl.int64)
    Q += b64 * sq_b + h * sq_h
    DO += b64 * so_b + h * so_h
    DQ += b64 * so_b + h * so_h
    LSE += b64 * sl_b + h * sl_h
    DELTA += b64 * sl_b + h * sl_h
    K += b64 * sk_b + h * sk_h
    V += b64 * sk_b + h * sk_h
    q_off = g0 * q_gs0 + qt0 * q_ts0 + m0 * q_is0
    o_off = g0 * o_gs0 + qt0 * o_ts0 + m0 * o_is0
    l_off = g0 * l_gs0 + qt0 * l_ts0 + m0 * l_is0
    kv_base = g0 * k_gs0
    if NDIM > 1:
        q_off += g1 * q_gs1 + qt1 * q_ts1 + m1 * q_is1
        o_off += g1 * o_gs1 + qt1 * o_ts1 + m1 * o_is1
        l_off += g1 * l_gs1 + qt1 * l_ts1 + m1 * l_is1
        kv_base += g1 * k_gs1
    if NDIM > 2:
        q_off += g2 * q_gs2 + qt2 * q_ts2 + m2 * q_is2
        o_off += g2 * o_gs2 + qt2 * o_ts2 + m2 * o_is2
        l_off += g2 * l_gs2 + qt2 * l_ts2 + m2 * l_is2
        kv_base += g2 * k_gs2
    qmask = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + o_off[:, None] + offs_d[None, :], mask=qmask, other=0.0)
    lse2 = tl.load(LSE + l_off, mask=qvalid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_off, mask=qvalid, other=0.0)
    st0, ln0, st1, ln1, st2, ln2 = row_windows(R0, R1, R2, g0, g1, g2, X0, X1, X2, x0, x1, x2, NDIM)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, ilo0, ihi0, ilo1, ihi1, ilo2, ihi2, n0, n1, n2, offs_d,
                 dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                 qk_scale, NDIM, TK0, TK1, TK2, False, True)
    dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, lo0, ilo0, lo1, hi1, lo2, hi2, n0, n1, n2, offs_d,
                 dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                 qk_scale, NDIM, TK0, TK1, TK2, True)
    dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, ihi0, hi0, lo1, hi1, lo2, hi2, n0, n1, n2, offs_d,
                 dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                 qk_scale, NDIM, TK0, TK1, TK2, True)
    if NDIM > 1:
        dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, ilo0, ihi0, lo1, ilo1, lo2, hi2, n0, n1, n2, offs_d,
                     dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                     qk_scale, NDIM, TK0, TK1, TK2, True)
        dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, ilo0, ihi0, ihi1, hi1, lo2, hi2, n0, n1, n2, offs_d,
                     dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                     qk_scale, NDIM, TK0, TK1, TK2, True)
    if NDIM > 2:
        dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, ilo0, ihi0, ilo1, ihi1, lo2, ilo2, n0, n1, n2, offs_d,
                     dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                     qk_scale, NDIM, TK0, TK1, TK2, True)
        dq = _dq_box(dq, q, do, lse2, delta, K, V, kv_base, ilo0, ihi0, ilo1, ihi1, ihi2, hi2, n0, n1, n2, offs_d,
                     dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2, lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2,
                     qk_scale, NDIM, TK0, TK1, TK2, True)
    if HAS_EXTRA:
        EK += b64 * se_b + h * se_h
        EV += b64 * se_b + h * se_h
        for j in range(0, tl.cdiv(n_extra, BLOCK_N)):
            cols = j * BLOCK_N + offs_n
            cvalid = cols < n_extra
            ptr = cols[:, None] * se_t + offs_d[None, :]
            kk = tl.load(EK + ptr, mask=cvalid[:, None] & dmask[None, :], other=0.0)
            vv = tl.load(EV + ptr, mask=cvalid[:, None] & dmask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(kk)) * qk_scale
            p = tl.math.exp2(qk - lse2[:, None])
            p = tl.where(cvalid[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(vv))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kk.dtype), kk, dq)
    dq = dq * scale
    tl.store(DQ + o_off[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _window_ok_t(y, st, ln):
    """`window_ok` for a [keys, rows] tile: st[row] <= y[key] < st[row] + ln[row]."""
    return (y[:, None] - st[None, :]).to(tl.uint32) < ln[None, :].to(tl.uint32)


@triton.jit
def _dkv_box(
    dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2,
    g0, g1, g2, X0, X1, X2,
    lo0, hi0, lo1, hi1, lo2, hi2,
    m0, m1, m2, y0, y1, y2, offs_d, dmask,
    q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2,
    o_base, o_ts0, o_ts1, o_ts2, o_is0, o_is1, o_is2,
    l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2,
    lg0, lg1, lg2, qk_scale,
    NDIM: tl.constexpr, TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    MASKED: tl.constexpr, WINDOW: tl.constexpr, Q_SPLIT: tl.constexpr,
):
    """Accumulate dK/dV of one key tile over the query tiles in [lo, hi) per axis. WINDOW=False: no window test
    (text tokens); MASKED=False: the pairs are full (no per-element test). Q_SPLIT > 1 visits each query tile as
    Q_SPLIT slices of its rows (m0, m1, m2 are then the coordinates of the first slice's rows), so the [rows, keys]
    score and gradient tiles are Q_SPLIT times smaller: less register pressure, same arithmetic."""
    ROWS: tl.constexpr = TQ0 * TQ1 * TQ2 // Q_SPLIT
    c1 = hi1 - lo1
    c2 = hi2 - lo2
    count = (hi0 - lo0) * c1 * c2
    for it in range(0, count * Q_SPLIT):
        t = it
        r0, r1, r2 = m0, m1, m2
        if Q_SPLIT > 1:  # query tile `t`, its row slice `it % Q_SPLIT` (a contiguous run of the tile's rows)
            t = it // Q_SPLIT
            r0, r1, r2 = intra((it % Q_SPLIT) * ROWS + tl.arange(0, ROWS), TQ1, TQ2)
        qt2 = lo2 + t % c2
        qt1 = lo1 + (t // c2) % c1
        qt0 = lo0 + t // (c2 * c1)
        x0 = qt0 * TQ0 + r0
        qvalid = x0 < lg0
        q_off = q_base + qt0 * q_ts0 + r0 * q_is0
        o_off = o_base + qt0 * o_ts0 + r0 * o_is0
        l_off = l_base + qt0 * l_ts0 + r0 * l_is0
        if NDIM > 1:
            x1 = qt1 * TQ1 + r1
            qvalid &= x1 < lg1
            q_off += qt1 * q_ts1 + r1 * q_is1
            o_off += qt1 * o_ts1 + r1 * o_is1
            l_off += qt1 * l_ts1 + r1 * l_is1
        if NDIM > 2:
            x2 = qt2 * TQ2 + r2
            qvalid &= x2 < lg2
            q_off += qt2 * q_ts2 + r2 * q_is2
            o_off += qt2 * o_ts2 + r2 * o_is2
            l_off += qt2 * l_ts2 + r2 * l_is2
        qmask = qvalid[:, None] & dmask[None, :]
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + o_off[:, None] + offs_d[None, :], mask=qmask, other=0.0)
        lse2 = tl.load(LSE + l_off, mask=qvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_off, mask=qvalid, other=0.0)
        # transposed scores [keys, rows]: P^T and dS^T come out of the MMA as the A operands of dV and dK, with
        # no register transpose (one through shared memory each, per step, otherwise)
        qk_t = tl.dot(kk, tl.trans(q)) * qk_scale
        p_t = tl.math.exp2(qk_t - lse2[None, :])
        if MASKED:
            if WINDOW:
                st0 = tl.load(R0 + (g0 * X0 + x0) * 2)
                ln0 = tl.load(R0 + (g0 * X0 + x0) * 2 + 1)
                ok = _window_ok_t(y0, st0, ln0)
                if NDIM > 1:
                    st1 = tl.load(R1 + (g1 * X1 + x1) * 2)
                    ln1 = tl.load(R1 + (g1 * X1 + x1) * 2 + 1)
                    ok &= _window_ok_t(y1, st1, ln1)
                if NDIM > 2:
                    st2 = tl.load(R2 + (g2 * X2 + x2) * 2)
                    ln2 = tl.load(R2 + (g2 * X2 + x2) * 2 + 1)
                    ok &= _window_ok_t(y2, st2, ln2)
                p_t = tl.where(ok, p_t, 0.0)
        # padded query rows have dO = 0 and delta = 0, so they contribute nothing below
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(vv, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _na_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    R0, KT0, R1, KT1, R2, KT2,
    sq_b, sq_h, q_gs0, q_gs1, q_gs2, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2,
    sk_b, sk_h, k_gs0, k_gs1, k_gs2, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
    so_b, so_h, o_gs0, o_gs1, o_gs2, o_ts0, o_ts1, o_ts2, o_is0, o_is1, o_is2,
    sl_b, sl_h, l_gs0, l_gs1, l_gs2, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2,
    sd_b, sd_h, d_gs0, d_gs1, d_gs2, d_ts0, d_ts1, d_ts2, d_is0, d_is1, d_is2,
    H, G, L0, L1, L2, DL0, DL1, DL2, NK0, NK1, NK2, X0, X1, X2,
    qk_scale, scale, head_dim,
    NDIM: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    BLOCK_D: tl.constexpr, Q_SPLIT: tl.constexpr = 1,
):
    """One program per key tile; DK/DV use the "d_*" addressing (contiguous like k)."""
    BLOCK_M: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_N: tl.constexpr = TK0 * TK1 * TK2
    b, h, g0, g1, g2, kt0, kt1, kt2 = program_coords(tl.program_id(0), tl.program_id(1), H, G, DL0, DL1, DL2,
                                                     NK0, NK1, NK2)
    lg0 = group_len(L0, g0, DL0)
    lg1 = group_len(L1, g1, DL1)
    lg2 = group_len(L2, g2, DL2)
    lo0, hi0, ilo0, ihi0 = tile_range(KT0, g0, NK0, kt0)
    lo1, hi1, ilo1, ihi1 = tile_range(KT1, g1, NK1, kt1)
    lo2, hi2, ilo2, ihi2 = tile_range(KT2, g2, NK2, kt2)

    offs_m = tl.arange(0, BLOCK_M // Q_SPLIT)  # the first row slice (see `_dkv_box`)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    m0, m1, m2 = intra(offs_m, TQ1, TQ2)
    n0, n1, n2 = intra(offs_n, TK1, TK2)
    y0 = kt0 * TK0 + n0
    y1 = kt1 * TK1 + n1
    y2 = kt2 * TK2 + n2
    kvalid = inside(y0, y1, y2, lg0, lg1, lg2, NDIM)
    b64 = b.to(tl.int64)
    Q += b64 * sq_b + h * sq_h
    DO += b64 * so_b + h * so_h
    LSE += b64 * sl_b + h * sl_h
    DELTA += b64 * sl_b + h * sl_h
    K += b64 * sk_b + h * sk_h
    V += b64 * sk_b + h * sk_h
    DK += b64 * sd_b + h * sd_h
    DV += b64 * sd_b + h * sd_h
    k_off = g0 * k_gs0 + kt0 * k_ts0 + n0 * k_is0
    d_off = g0 * d_gs0 + kt0 * d_ts0 + n0 * d_is0
    q_base = g0 * q_gs0
    o_base = g0 * o_gs0
    l_base = g0 * l_gs0
    if NDIM > 1:
        k_off += g1 * k_gs1 + kt1 * k_ts1 + n1 * k_is1
        d_off += g1 * d_gs1 + kt1 * d_ts1 + n1 * d_is1
        q_base += g1 * q_gs1
        o_base += g1 * o_gs1
        l_base += g1 * l_gs1
    if NDIM > 2:
        k_off += g2 * k_gs2 + kt2 * k_ts2 + n2 * k_is2
        d_off += g2 * d_gs2 + kt2 * d_ts2 + n2 * d_is2
        q_base += g2 * q_gs2
        o_base += g2 * o_gs2
        l_base += g2 * l_gs2
    kmask = kvalid[:, None] & dmask[None, :]
    kk = tl.load(K + k_off[:, None] + offs_d[None, :], mask=kmask, other=0.0)
    vv = tl.load(V + k_off[:, None] + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                      ilo0, ihi0, ilo1, ihi1, ilo2, ihi2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                      q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0, o_is1,
                      o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                      NDIM, TQ0, TQ1, TQ2, False, True, Q_SPLIT)
    dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                      lo0, ilo0, lo1, hi1, lo2, hi2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                      q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0, o_is1,
                      o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                      NDIM, TQ0, TQ1, TQ2, True, True, Q_SPLIT)
    dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                      ihi0, hi0, lo1, hi1, lo2, hi2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                      q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0, o_is1,
                      o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                      NDIM, TQ0, TQ1, TQ2, True, True, Q_SPLIT)
    if NDIM > 1:
        dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                          ilo0, ihi0, lo1, ilo1, lo2, hi2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                          q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0,
                          o_is1, o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                          NDIM, TQ0, TQ1, TQ2, True, True, Q_SPLIT)
        dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                          ilo0, ihi0, ihi1, hi1, lo2, hi2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                          q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0,
                          o_is1, o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                          NDIM, TQ0, TQ1, TQ2, True, True, Q_SPLIT)
    if NDIM > 2:
        dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                          ilo0, ihi0, ilo1, ihi1, lo2, ilo2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                          q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0,
                          o_is1, o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                          NDIM, TQ0, TQ1, TQ2, True, True, Q_SPLIT)
        dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, R0, R1, R2, g0, g1, g2, X0, X1, X2,
                          ilo0, ihi0, ilo1, ihi1, ihi2, hi2, m0, m1, m2, y0, y1, y2, offs_d, dmask,
                          q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2, o_is0,
                          o_is1, o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2, lg0, lg1, lg2, qk_scale,
                          NDIM, TQ0, TQ1, TQ2, True, True, Q_SPLIT)
    dmask2 = kvalid[:, None] & dmask[None, :]
    tl.store(DK + d_off[:, None] + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=dmask2)
    tl.store(DV + d_off[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=dmask2)


@triton.jit
def _na_bwd_extra_kernel(
    Q, EK, EV, DO, LSE, DELTA, DEK, DEV,
    sq_b, sq_h, q_gs0, q_gs1, q_gs2, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2,
    so_b, so_h, o_gs0, o_gs1, o_gs2, o_ts0, o_ts1, o_ts2, o_is0, o_is1, o_is2,
    sl_b, sl_h, l_gs0, l_gs1, l_gs2, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2,
    se_b, se_h, se_t, sde_b, sde_h, sde_t, n_extra,
    H, L0, L1, L2, DL0, DL1, DL2, NQ0, NQ1, NQ2,
    qk_scale, scale, head_dim,
    NDIM: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, Q_SPLIT: tl.constexpr = 1,
):
    """dK/dV of the text tokens: one program per (text tile, batch, head), all query tiles of all groups."""
    BLOCK_M: tl.constexpr = TQ0 * TQ1 * TQ2
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    b = pid_bh // H
    offs_m = tl.arange(0, BLOCK_M // Q_SPLIT)  # the first row slice (see `_dkv_box`)
    offs_n = pid_t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    m0, m1, m2 = intra(offs_m, TQ1, TQ2)
    cvalid = offs_n < n_extra
    b64 = b.to(tl.int64)
    Q += b64 * sq_b + h * sq_h
    DO += b64 * so_b + h * so_h
    LSE += b64 * sl_b + h * sl_h
    DELTA += b64 * sl_b + h * sl_h
    EK += b64 * se_b + h * se_h
    EV += b64 * se_b + h * se_h
    DEK += b64 * sde_b + h * sde_h
    DEV += b64 * sde_b + h * sde_h
    emask = cvalid[:, None] & dmask[None, :]
    kk = tl.load(EK + offs_n[:, None] * se_t + offs_d[None, :], mask=emask, other=0.0)
    vv = tl.load(EV + offs_n[:, None] * se_t + offs_d[None, :], mask=emask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g0 in range(0, DL0):
        for g1 in range(0, DL1):
            for g2 in range(0, DL2):
                lg0 = group_len(L0, g0, DL0)
                lg1 = group_len(L1, g1, DL1)
                lg2 = group_len(L2, g2, DL2)
                q_base = g0 * q_gs0 + g1 * q_gs1 + g2 * q_gs2
                o_base = g0 * o_gs0 + g1 * o_gs1 + g2 * o_gs2
                l_base = g0 * l_gs0 + g1 * l_gs1 + g2 * l_gs2
                dk, dv = _dkv_box(dk, dv, kk, vv, Q, DO, LSE, DELTA, Q, Q, Q, g0, g1, g2, 0, 0, 0,
                                  0, tl.cdiv(lg0, TQ0), 0, tl.cdiv(lg1, TQ1), 0, tl.cdiv(lg2, TQ2),
                                  m0, m1, m2, offs_n, offs_n, offs_n, offs_d, dmask,
                                  q_base, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2, o_base, o_ts0, o_ts1, o_ts2,
                                  o_is0, o_is1, o_is2, l_base, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2,
                                  lg0, lg1, lg2, qk_scale, NDIM, TQ0, TQ1, TQ2, False, False, Q_SPLIT)
    optr = offs_n[:, None] * sde_t + offs_d[None, :]
    tl.store(DEK + optr, (dk * scale).to(DEK.dtype.element_ty), mask=emask)
    tl.store(DEV + optr, dv.to(DEV.dtype.element_ty), mask=emask)


ENV_Q_SPLIT = "DIFFATTN_NA_BWD_QSPLIT"


def dkv_q_split(plan: Plan, q_split: int | None = None) -> int:
    """How many row slices the dK/dV kernels cut each query tile into (1 = whole tiles).

    Why: a dK/dV program holds two [keys, d] fp32 accumulators plus the [keys, rows] score and gradient tiles; with
    128-row query tiles at d=128 ptxas spills (sm90, Triton 3.9: 992 / 1,528 spill stores at the FLUX-4K /
    HunyuanVideo NA tiles) and 64-row slices do not (32 / 75). Measured on an H100 (NOTES.md, session 12), 2 slices
    at 2 stages is the fastest setting at every production tile: the default wherever the slices keep >= 16 rows.

    An explicit `q_split` must fit the plan's query tile (a power of two leaving >= 16 rows); the environment
    variable `DIFFATTN_NA_BWD_QSPLIT` is a process-wide preference, so it is lowered to what each tile allows."""
    rows = plan.block_m

    def fits(n: int) -> bool:  # whole tiles, or a power of two that cuts the tile into slices of >= 16 rows
        return type(n) is int and (n == 1 or (n > 1 and not n & (n - 1) and not rows % n and rows // n >= 16))

    if q_split is not None:
        if not fits(q_split):
            raise ValueError(f"q_split must be 1 or a power of two that leaves at least 16 rows of the {rows}-row query "
                             f"tile, got {q_split!r}")
        return q_split
    raw = os.environ.get(ENV_Q_SPLIT, "").strip()
    try:
        wanted = int(raw) if raw else 2
    except ValueError:
        raise ValueError(f"{ENV_Q_SPLIT} must be an integer, got {raw!r}") from None
    if wanted < 1 or wanted & (wanted - 1):
        raise ValueError(f"{ENV_Q_SPLIT} must be a power of two >= 1, got {raw!r}")
    q_split = wanted
    while not fits(q_split):
        q_split //= 2
    if q_split != wanted:
        logger.debug("neighborhood backward: %d row slices of the %d-row query tile (asked %d)", q_split, rows, wanted)
    return q_split


def _delta(out: torch.Tensor, d_out: torch.Tensor, lse: torch.Tensor, d_lse: torch.Tensor | None) -> torch.Tensor:
    """rowsum(dO * O) - dLSE, float32 shaped and laid out like `lse` (`[B, *spatial, H]`), in one kernel: the
    block-sparse backward's, on `[B, H, S, ...]` views of the spatial tensors."""
    from ..block_sparse.triton_bwd import bwd_delta

    nd = lse.dim() - 2

    def bhs(t: torch.Tensor) -> torch.Tensor:  # [B, *spatial, H, ...] -> [B, H, S, ...] (a view when contiguous)
        t = t if t.is_contiguous() else t.contiguous()
        return t.reshape(t.shape[0], -1, *t.shape[1 + nd:]).transpose(1, 2)

    delta = bwd_delta(bhs(out), bhs(d_out), bhs(lse), None if d_lse is None else bhs(d_lse),
                      interpret=not out.is_cuda)
    return delta.transpose(1, 2).reshape(lse.shape)


def na_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor | None, ev: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor | None, plan: Plan,
    scale: float, num_warps: int = 8, num_stages: int = 2, q_split: int | None = None,
    dkv_stages: int | None = None,
):
    """Gradients (dq, dk, dv, d_extra_k, d_extra_v) for the spatial layout `[B, *spatial, H, D]`.

    q_split: the dK/dV kernels visit each query tile in this many row slices (see `_dkv_box`); None reads
    `DIFFATTN_NA_BWD_QSPLIT`, else 2 where the tile allows (see `dkv_q_split`).
    dkv_stages: software-pipeline stages of the dK/dV kernels (None: `num_stages`). Separate because the two
    kernels' buffers differ: at d=128 on sm90, dQ needs 262,144 B of shared memory at 3 stages (does not fit),
    dK/dV with 64-row slices 166,912 B (fits; Triton 3.6 CPU compile)."""
    nd = plan.ndim
    q_split = dkv_q_split(plan, q_split)
    dkv_stages = num_stages if dkv_stages is None else dkv_stages
    if q_split > 2 and dkv_stages > 1 and q.is_cuda:
        # measured: 32-row slices software-pipelined gave gradients 0.2-0.6 off on an H100 (Triton 3.6, 2026-12-05,
        # the earlier un-transposed kernel) while 1 stage agreed exactly; refuse rather than risk it unverified
        raise ValueError(f"q_split={q_split} needs 1 dK/dV stage on CUDA (with {dkv_stages} it gave wrong "
                         "gradients on an H100, Triton 3.6)")
    b, h, d = q.shape[0], q.shape[1 + nd], q.shape[-1]
    d_out = d_out.contiguous()
    delta = _delta(out, d_out, lse, d_lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    qa = addressing(q, "spatial", plan, plan.q_tile)
    ka = addressing(k, "spatial", plan, plan.kv_tile)
    oa = addressing(d_out, "spatial", plan, plan.q_tile)
    la = addressing(lse, "spatial", plan, plan.q_tile)
    da = addressing(dk, "spatial", plan, plan.kv_tile)
    ax = plan.axes
    tq = pad3(list(plan.q_tile), 1)
    tk = pad3(list(plan.kv_tile), 1)
    nq = pad3([a.n_q_tiles for a in ax], 1)
    nk = pad3([a.n_kv_tiles for a in ax], 1)
    xs = pad3([a.n_q_tiles * a.q_tile for a in ax], 1)
    ls = pad3([a.length for a in ax], 1)
    dl = pad3([a.dilation for a in ax], 1)
    block_d = max(16, triton.next_power_of_2(d))
    tabs = axis_tables(plan, q.device)
    has_extra = ek is not None
    if has_extra:
        assert ev is not None
        ea = [ek.stride(0), ek.stride(2), ek.stride(1), ek.shape[1]]
    else:
        ea = [0, 0, 0, 0]
    consts = dict(NDIM=nd, TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], BLOCK_D=block_d, num_warps=num_warps)
    _na_bwd_dq_kernel[(nq[0] * nq[1] * nq[2], b * plan.groups * h)](
        q, k, v, d_out, lse, delta, dq, ek if has_extra else q, ev if has_extra else q,
        tabs[0], tabs[1], tabs[3], tabs[4], tabs[6], tabs[7],
        *qa, *ka, *oa, *la, *ea,
        h, plan.groups, *ls, *dl, *nq, *xs,
        scale * LOG2E, scale, d,
        TK0=tk[0], TK1=tk[1], TK2=tk[2], HAS_EXTRA=has_extra, num_stages=num_stages, **consts,
    )
    _na_bwd_dkv_kernel[(nk[0] * nk[1] * nk[2], b * plan.groups * h)](
        q, k, v, d_out, lse, delta, dk, dv,
        tabs[0], tabs[2], tabs[3], tabs[5], tabs[6], tabs[8],
        *qa, *ka, *oa, *la, *da,
        h, plan.groups, *ls, *dl, *nk, *xs,
        scale * LOG2E, scale, d,
        TK0=tk[0], TK1=tk[1], TK2=tk[2], Q_SPLIT=q_split, num_stages=dkv_stages, **consts,
    )
    dek = dev = None
    if has_extra:
        dek = torch.empty_like(ek, memory_format=torch.contiguous_format)
        dev = torch.empty_like(ev, memory_format=torch.contiguous_format)
        block_n = 64
        _na_bwd_extra_kernel[(cdiv(ek.shape[1], block_n), b * h)](
            q, ek, ev, d_out, lse, delta, dek, dev,
            *qa, *oa, *la, ek.stride(0), ek.stride(2), ek.stride(1), dek.stride(0), dek.stride(2), dek.stride(1),
            ek.shape[1], h, *ls, *dl, *nq,
            scale * LOG2E, scale, d, BLOCK_N=block_n, Q_SPLIT=q_split, num_stages=dkv_stages, **consts,
        )
    return dq, dk, dv, dek, dev
