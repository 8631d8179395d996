"""Triton forward for neighborhood attention over multi-dimensional tiles.

One program = one query tile (a box of TQ0 x TQ1 x TQ2 tokens of one dilation group) of one (batch, head).
It visits the box of key tiles that `tiling.AxisPlan.q_tab` gives, in seven sub-boxes: the inner sub-box, where
every query of the tile sees every key of the tile, runs with no per-element mask at all; the six slabs around it
apply the window test per element (start <= key < start + length, read from per-row tables). A perfectly
block-sparse problem has empty slabs, so it runs mask-free. Text tokens (`extra_k/extra_v`) are one more dense
loop with the same online softmax (no separate pass, no merge).

Tiles are addressed through strides, so the same kernel reads either the caller's `[B, *spatial, H, D]` tensors
in place (no permutation copy) or NATTEN-style permuted `[B, G, H, N_pad, D]` tensors (each tile contiguous).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def intra(r, T1: tl.constexpr, T2: tl.constexpr):
    """Row index inside a tile -> per-axis intra-tile coordinates (row-major over the tile shape)."""
    i0 = r // (T1 * T2)
    i1 = (r // T2) % T1
    i2 = r % T2
    return i0, i1, i2


@triton.jit
def window_ok(y, st, ln):
    """Per-element window test along one axis: st[row] <= y[col] < st[row] + ln[row]."""
    return (y[None, :] - st[:, None]).to(tl.uint32) < ln[:, None].to(tl.uint32)


@triton.jit
def program_coords(pid_t, pid_bgh, H, G, DL0, DL1, DL2, N0, N1, N2):
    """One program's (batch, head, per-axis dilation group, per-axis tile) from its grid position
    (tiles, batch * groups * heads); tiles and groups are row-major over the axes."""
    h = pid_bgh % H
    bg = pid_bgh // H
    g = bg % G
    b = bg // G
    g2 = g % DL2
    g1 = (g // DL2) % DL1
    g0 = g // (DL2 * DL1)
    t2 = pid_t % N2
    t1 = (pid_t // N2) % N1
    t0 = pid_t // (N2 * N1)
    return b, h, g0, g1, g2, t0, t1, t2


@triton.jit
def group_len(L, g, DL):
    """Length of dilation group g along an axis of length L."""
    return (L - g + DL - 1) // DL


@triton.jit
def tile_range(TAB, g, N, t):
    """(lo, hi, inner lo, inner hi) of tile t of group g in a `[G, N, 4]` table (`AxisPlan.q_tab` / `kv_tab`)."""
    row = TAB + (g * N + t) * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def inside(x0, x1, x2, lg0, lg1, lg2, NDIM: tl.constexpr):
    """Which group-local coordinates lie inside the group (rows of padding tiles do not)."""
    ok = x0 < lg0
    if NDIM > 1:
        ok &= x1 < lg1
    if NDIM > 2:
        ok &= x2 < lg2
    return ok


@triton.jit
def row_windows(R0, R1, R2, g0, g1, g2, X0, X1, X2, x0, x1, x2, NDIM: tl.constexpr):
    """Per query row and axis, its key window (start, length) from the `rows` tables (unused axes repeat axis 0)."""
    st0 = tl.load(R0 + (g0 * X0 + x0) * 2)
    ln0 = tl.load(R0 + (g0 * X0 + x0) * 2 + 1)
    st1 = st0
    ln1 = ln0
    st2 = st0
    ln2 = ln0
    if NDIM > 1:
        st1 = tl.load(R1 + (g1 * X1 + x1) * 2)
        ln1 = tl.load(R1 + (g1 * X1 + x1) * 2 + 1)
    if NDIM > 2:
        st2 = tl.load(R2 + (g2 * X2 + x2) * 2)
        ln2 = tl.load(R2 + (g2 * X2 + x2) * 2 + 1)
    return st0, ln0, st1, ln1, st2, ln2


@triton.jit
def _softmax_step(acc, m_i, l_i, qk, vv, qk_scale):
    """One online-softmax update from raw scores `qk` (masked entries -inf; `qk_scale` = scale * log2 e, > 0).

    The scale is folded into the max and into one FMA per score (exp2(qk * scale - m)), as FA2/FA3 do."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(vv.dtype), vv, acc)
    return acc, m_new, l_i


@triton.jit
def _extra_tokens(acc, m_i, l_i, q, EK, EV, e_base, se_t, n_extra, offs_n, offs_d, dmask, qk_scale,
                  BLOCK_N: tl.constexpr):
    """Text tokens: keys every query attends, one more dense loop in the same online softmax (no LSE merge)."""
    for j in range(0, tl.cdiv(n_extra, BLOCK_N)):
        cols = j * BLOCK_N + offs_n
        cvalid = cols < n_extra
        ptr = e_base + cols[:, None] * se_t + offs_d[None, :]
        kk = tl.load(EK + ptr, mask=cvalid[:, None] & dmask[None, :], other=0.0)
        vv = tl.load(EV + ptr, mask=cvalid[:, None] & dmask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(kk))
        qk = tl.where(cvalid[None, :], qk, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, vv, qk_scale)
    return acc, m_i, l_i


@triton.jit
def _finish(acc, m_i, l_i):
    """Normalised output and natural-log LSE (rows with no key at all give 0 and m_i, not NaN)."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    return acc / l_safe[:, None], (m_i + tl.math.log2(l_safe)) * 0.6931471805599453


@triton.jit
def _tma_tile(desc, b, h, t0, t1, t2, L0, NDIM: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr,
              T2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Tile (t0, t1, t2) of one (batch, head) as a [rows, D] block: one TMA box of the 5-D view of
    `[B, *spatial, H, D]` built by `triton_fwd_tma.descriptor` (3-D folds the batch into axis 0)."""
    if NDIM == 1:
        x = desc.load([b, t0 * T0, 0, h, 0])
    elif NDIM == 2:
        x = desc.load([b, t0 * T0, t1 * T1, h, 0])
    else:
        x = desc.load([b * L0 + t0 * T0, t1 * T1, t2 * T2, h, 0])
    return x.reshape(T0 * T1 * T2, HEAD_DIM)


@triton.jit
def _fwd_box(
    acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra,
    lo0, hi0, lo1, hi1, lo2, hi2,
    n0, n1, n2, offs_d, dmask,
    k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
    lg0, lg1, lg2,
    st0, ln0, st1, ln1, st2, ln2,
    qk_scale,
    NDIM: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c1 = hi1 - lo1
    c2 = hi2 - lo2
    count = (hi0 - lo0) * c1 * c2
    for it in range(0, count):
        k2 = lo2 + it % c2
        k1 = lo1 + (it // c2) % c1
        k0 = lo0 + it // (c2 * c1)
        if MASKED:
            y0 = k0 * TK0 + n0
            y1 = k1 * TK1 + n1
            y2 = k2 * TK2 + n2
        if TMA:
            # keys past an axis end come back as zeros and fail the window test below
            kk = _tma_tile(desc_k, b, h, k0, k1, k2, L0, NDIM, TK0, TK1, TK2, BLOCK_D)
            vv = _tma_tile(desc_v, b, h, k0, k1, k2, L0, NDIM, TK0, TK1, TK2, BLOCK_D)
        else:
            tile_off = kv_base + k0 * k_ts0
            if NDIM > 1:
                tile_off += k1 * k_ts1
            if NDIM > 2:
                tile_off += k2 * k_ts2
            ptr = tile_off + kv_intra
            if MASKED:
                kvalid = y0 < lg0
                if NDIM > 1:
                    kvalid &= y1 < lg1
                if NDIM > 2:
                    kvalid &= y2 < lg2
                kk = tl.load(K + ptr, mask=kvalid[:, None] & dmask[None, :], other=0.0)
                vv = tl.load(V + ptr, mask=kvalid[:, None] & dmask[None, :], other=0.0)
            elif EVEN_D:
                kk = tl.load(K + ptr)
                vv = tl.load(V + ptr)
            else:
                kk = tl.load(K + ptr, mask=dmask[None, :], other=0.0)
                vv = tl.load(V + ptr, mask=dmask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(kk))
        if MASKED:
            ok = window_ok(y0, st0, ln0)
            if NDIM > 1:
                ok &= window_ok(y1, st1, ln1)
            if NDIM > 2:
                ok &= window_ok(y2, st2, ln2)
            qk = tl.where(ok, qk, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk, vv, qk_scale)
    return acc, m_i, l_i


@triton.jit
def _na_fwd_kernel(
    Q, K, V, O, LSE, EK, EV, desc_q, desc_k, desc_v, desc_o,
    R0, QT0, R1, QT1, R2, QT2,
    sq_b, sq_h, q_gs0, q_gs1, q_gs2, q_ts0, q_ts1, q_ts2, q_is0, q_is1, q_is2,
    sk_b, sk_h, k_gs0, k_gs1, k_gs2, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
    so_b, so_h, o_gs0, o_gs1, o_gs2, o_ts0, o_ts1, o_ts2, o_is0, o_is1, o_is2,
    sl_b, sl_h, l_gs0, l_gs1, l_gs2, l_ts0, l_ts1, l_ts2, l_is0, l_is1, l_is2,
    se_b, se_h, se_t, n_extra,
    H, G, L0, L1, L2, DL0, DL1, DL2, NQ0, NQ1, NQ2, X0, X1, X2,
    qk_scale, head_dim,
    NDIM: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_EXTRA: tl.constexpr, WRITE_LSE: tl.constexpr,
    TMA: tl.constexpr, TMA_STORE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TQ0 * TQ1 * TQ2
    BLOCK_N: tl.constexpr = TK0 * TK1 * TK2
    b, h, g0, g1, g2, qt0, qt1, qt2 = program_coords(tl.program_id(0), tl.program_id(1), H, G, DL0, DL1, DL2,
                                                     NQ0, NQ1, NQ2)
    # group-local axis lengths
    lg0 = group_len(L0, g0, DL0)
    lg1 = group_len(L1, g1, DL1)
    lg2 = group_len(L2, g2, DL2)

    # key-tile box per axis: [lo, hi) with the mask-free [ilo, ihi) inside
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
    # batch/head bases in 64-bit pointer arithmetic; offsets inside one (batch, head) stay 32-bit
    b64 = b.to(tl.int64)
    Q += b64 * sq_b + h * sq_h
    O += b64 * so_b + h * so_h
    LSE += b64 * sl_b + h * sl_h
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
    if TMA:
        q = _tma_tile(desc_q, b, h, qt0, qt1, qt2, L0, NDIM, TQ0, TQ1, TQ2, BLOCK_D)
    else:
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=qvalid[:, None] & dmask[None, :], other=0.0)
    # loop-invariant part of every key tile's element offsets
    kv_rows = n0 * k_is0
    if NDIM > 1:
        kv_rows += n1 * k_is1
    if NDIM > 2:
        kv_rows += n2 * k_is2
    kv_intra = kv_rows[:, None] + offs_d[None, :]

    # per-row windows (group-local key coordinates), for the masked slabs
    st0, ln0, st1, ln1, st2, ln2 = row_windows(R0, R1, R2, g0, g1, g2, X0, X1, X2, x0, x1, x2, NDIM)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # 1) mask-free inner box
    acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, ilo0, ihi0, ilo1, ihi1, ilo2, ihi2,
                             n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                             lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                             NDIM, TK0, TK1, TK2, False, EVEN_D, TMA, BLOCK_D)
    # 2) slabs outside the inner range along axis 0
    acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, lo0, ilo0, lo1, hi1, lo2, hi2,
                             n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                             lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                             NDIM, TK0, TK1, TK2, True, False, TMA, BLOCK_D)
    acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, ihi0, hi0, lo1, hi1, lo2, hi2,
                             n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                             lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                             NDIM, TK0, TK1, TK2, True, False, TMA, BLOCK_D)
    if NDIM > 1:
        # 3) inside along axis 0, outside along axis 1
        acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, ilo0, ihi0, lo1, ilo1, lo2, hi2,
                                 n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                                 lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                                 NDIM, TK0, TK1, TK2, True, False, TMA, BLOCK_D)
        acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, ilo0, ihi0, ihi1, hi1, lo2, hi2,
                                 n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                                 lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                                 NDIM, TK0, TK1, TK2, True, False, TMA, BLOCK_D)
    if NDIM > 2:
        # 4) inside along axes 0 and 1, outside along axis 2
        acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, ilo0, ihi0, ilo1, ihi1, lo2, ilo2,
                                 n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                                 lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                                 NDIM, TK0, TK1, TK2, True, False, TMA, BLOCK_D)
        acc, m_i, l_i = _fwd_box(acc, m_i, l_i, q, K, V, desc_k, desc_v, b, h, L0, kv_base, kv_intra, ilo0, ihi0, ilo1, ihi1, ihi2, hi2,
                                 n0, n1, n2, offs_d, dmask, k_ts0, k_ts1, k_ts2, k_is0, k_is1, k_is2,
                                 lg0, lg1, lg2, st0, ln0, st1, ln1, st2, ln2, qk_scale,
                                 NDIM, TK0, TK1, TK2, True, False, TMA, BLOCK_D)
    if HAS_EXTRA:
        acc, m_i, l_i = _extra_tokens(acc, m_i, l_i, q, EK, EV, b64 * se_b + h * se_h, se_t, n_extra, offs_n, offs_d,
                                      dmask, qk_scale, BLOCK_N)
    out, lse = _finish(acc, m_i, l_i)
    if TMA_STORE:  # TMA stores clip rows past an axis end (padding of the last tile)
        out = out.to(desc_o.dtype)
        if NDIM == 1:
            desc_o.store([b, qt0 * TQ0, 0, h, 0], out.reshape(1, TQ0, 1, 1, BLOCK_D))
        elif NDIM == 2:
            desc_o.store([b, qt0 * TQ0, qt1 * TQ1, h, 0], out.reshape(1, TQ0, TQ1, 1, BLOCK_D))
        else:
            desc_o.store([b * L0 + qt0 * TQ0, qt1 * TQ1, qt2 * TQ2, h, 0], out.reshape(TQ0, TQ1, TQ2, 1, BLOCK_D))
    else:
        tl.store(O + o_off[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=qvalid[:, None] & dmask[None, :])
    if WRITE_LSE:
        tl.store(LSE + l_off, lse, mask=qvalid)


# ----------------------------------------------------------------------------------------------------------------
# Host side

import math  # noqa: E402

import torch  # noqa: E402

from .tiling import Plan  # noqa: E402


def addressing(t: torch.Tensor, layout: str, plan: Plan, tile: tuple[int, ...]) -> list[int]:
    """Strides that map (batch, head, dilation group, tile, intra-tile coordinate) to an element offset.

    Returns [s_b, s_h, gs0, gs1, gs2, ts0, ts1, ts2, is0, is1, is2] (unused axes 0). `layout` is "spatial"
    (`[B, *spatial, H, ...]`, read in place) or "permuted" (`[B, G, H, N_pad, ...]` from `permute_tokens`).
    """
    nd = plan.ndim
    dil = [a.dilation for a in plan.axes]
    gs, ts, is_ = [0, 0, 0], [0, 0, 0], [0, 0, 0]
    if layout == "spatial":
        s_b, s_h = t.stride(0), t.stride(1 + nd)
        for i in range(nd):
            s = t.stride(1 + i)
            gs[i], is_[i], ts[i] = s, dil[i] * s, tile[i] * dil[i] * s
    elif layout == "permuted":
        s_b, s_h, s_g, rs = t.stride(0), t.stride(2), t.stride(1), t.stride(3)
        n_t = [cdiv(cdiv(a.length, a.dilation), tile[i]) for i, a in enumerate(plan.axes)]
        per_tile = math.prod(tile)
        for i in range(nd):
            ts[i] = math.prod(n_t[i + 1:]) * per_tile * rs
            is_[i] = math.prod(tile[i + 1:]) * rs
            gs[i] = math.prod(dil[i + 1:]) * s_g
    else:
        raise ValueError(f"layout must be 'spatial' or 'permuted', got {layout!r}")
    return [s_b, s_h, *gs, *ts, *is_]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad3(vals: list, fill) -> list:
    return list(vals) + [fill] * (3 - len(vals))


_DUMMY: dict[str, list[torch.Tensor]] = {}


def axis_tables(plan: Plan, device: torch.device) -> list[torch.Tensor]:
    """[rows0, qtab0, kvtab0, rows1, ...] padded to 3 axes with trivial tables (one tile covering [0, 1))."""
    tabs = list(plan.tables(device))
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = [torch.zeros(1, 1, 2, dtype=torch.int32, device=device),
                       torch.tensor([[[0, 1, 0, 1]]], dtype=torch.int32, device=device),
                       torch.tensor([[[0, 1, 0, 1]]], dtype=torch.int32, device=device)]
    while len(tabs) < 9:
        tabs += _DUMMY[key]
    return tabs


def launch_config(block_m: int, block_n: int, head_dim: int) -> tuple[int, int]:
    """(num_warps, num_stages) defaults for the forward."""
    # H100, fp16, d=128 (bench.py sweep, NOTES.md): 128x128 tiles, 8 warps, 3 stages beat 2 stages by 2-5%.
    warps = 8 if block_m * block_n >= 128 * 64 and block_m >= 64 else 4
    stages = 3 if block_n * head_dim <= 128 * 128 else 2
    return warps, stages


def na_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
    extra_k: torch.Tensor | None, extra_v: torch.Tensor | None, need_lse: bool,
    layout: str = "spatial", num_warps: int | None = None, num_stages: int | None = None, tma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward. Spatial layout: q/k/v `[B, *spatial, H, D]` (last dim contiguous, k and v with equal
    strides); returns out like q and lse `[B, *spatial, H]` float32. Permuted layout: q `[B, G, H, Nq_pad, D]`
    permuted with the plan's q tile, k/v with its kv tile; returns out `[B, G, H, Nq_pad, D]`, lse `[B, G, H, Nq_pad]`.
    tma: load q/k/v tiles and store out as TMA boxes read in place (Hopper+, spatial layout, problems that pass
    `triton_fwd_tma.tma_inplace_ok`); the window masks, text tokens and lse are the same code either way.
    """
    nd = plan.ndim
    b, h, d = q.shape[0], (q.shape[1 + nd] if layout == "spatial" else q.shape[2]), q.shape[-1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(out.shape[:-1], dtype=torch.float32, device=q.device) if need_lse else out  # dummy if unused
    qa = addressing(q, layout, plan, plan.q_tile)
    ka = addressing(k, layout, plan, plan.kv_tile)
    oa = addressing(out, layout, plan, plan.q_tile)
    la = addressing(lse, layout, plan, plan.q_tile) if need_lse else [0] * 11
    if extra_k is not None:
        assert extra_v is not None and extra_k.stride() == extra_v.stride()
        ea = [extra_k.stride(0), extra_k.stride(2), extra_k.stride(1), extra_k.shape[1]]
        ek, ev = extra_k, extra_v
    else:
        ea = [0, 0, 0, 0]
        ek, ev = q, q
    ax = plan.axes
    tq = pad3(list(plan.q_tile), 1)
    tk = pad3(list(plan.kv_tile), 1)
    nq = pad3([a.n_q_tiles for a in ax], 1)
    xs = pad3([a.n_q_tiles * a.q_tile for a in ax], 1)
    ls = pad3([a.length for a in ax], 1)
    dl = pad3([a.dilation for a in ax], 1)
    block_d = max(16, triton.next_power_of_2(d))
    w, s = launch_config(plan.block_m, plan.block_n, block_d)
    grid = (nq[0] * nq[1] * nq[2], b * plan.groups * h)
    tabs = axis_tables(plan, q.device)
    descs = [q, k, v, out]  # unused placeholders unless tma
    if tma:
        from .triton_fwd_tma import descriptor

        if layout != "spatial" or plan.groups != 1 or block_d != d:
            raise ValueError("the TMA forward reads the spatial layout in place, without dilation, with a power-of-two "
                             "head dim")
        descs = [descriptor(q, nd, plan.q_tile), descriptor(k, nd, plan.kv_tile), descriptor(v, nd, plan.kv_tile),
                 descriptor(out, nd, plan.q_tile)]
    # 3-D folds the batch into axis 0: a query tile that runs past an axis-0 end (batch > 1, L0 not a multiple of the
    # tile) would store its padding rows into the next batch element, so such outputs go through masked pointer
    # stores; its loads are harmless (padding queries are not stored, padding keys fail the window test)
    tma_store = tma and not (nd == 3 and b > 1 and q.shape[1] % plan.q_tile[0])
    _na_fwd_kernel[grid](
        q, k, v, out, lse, ek, ev, *descs,
        tabs[0], tabs[1], tabs[3], tabs[4], tabs[6], tabs[7],
        *qa, *ka, *oa, *la, *ea,
        h, plan.groups, *ls, *dl, *nq, *xs,
        scale * LOG2E, d,
        NDIM=nd, TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2],
        BLOCK_D=block_d, EVEN_D=block_d == d, HAS_EXTRA=extra_k is not None, WRITE_LSE=need_lse, TMA=tma, TMA_STORE=tma_store,
        num_warps=num_warps or w, num_stages=num_stages or s,
    )
    return out, (lse if need_lse else None)
