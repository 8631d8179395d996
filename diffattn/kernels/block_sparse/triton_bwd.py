"""Triton backward of block-sparse attention (dq, dk, dv, and the extra keys' dk, dv), FlashAttention-2 style.

Two passes (7 matmuls per query-key tile pair), no atomics, by default:
- dK/dV: one program per key tile; it walks the *transposed* index list (the query blocks that attend its key
  block). Programs past the sparse key tiles own a tile of extra (text) keys and walk every query tile, since every
  query attends the extra keys.
- dQ: one program per query tile, walking the same key-block list as the forward, then the extra keys.
`DIFFATTN_BSA_BWD=atomic` runs the dK/dV pass alone and adds each step's dS K into a float32 dQ by atomics
(5 matmuls per pair, as FlashAttention-2/3 do; dQ's summation order then varies from run to run).
P is recomputed from the saved log-sum-exp. `delta = rowsum(dO * O) - dLSE` (the dLSE term makes `return_lse`
outputs differentiable, which LSE merging in training needs). A row that saw no key has lse -inf; it is treated as
+inf here so that its P, and with it every gradient it touches, is exactly 0.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

from ..common import LaunchCache, run_with_fallbacks
from .triton_fwd import (
    LOG2E, cdiv, dot, dot0, is_hopper_or_newer, kv_list, pow2_divisor, strides3, tma_ok, head_dim_pad, hopper_variants,
)

logger = logging.getLogger("diffattn")


@triton.jit
def _load_rows(base, offs, stride, n_lim, offs_d, d_ok):
    ok = offs < n_lim
    return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _dkdv_step(dk, dv, k, v, b, h, q_base, do_base, lse_base, delta_base, Q_DESC, DO_DESC, start_m, stride_qs,
               stride_dos, Sq, qk_scale, offs_m0, offs_d, d_ok, rs_base, dqa_base, sm_scale,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, RECTIFY: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_m = start_m + offs_m0
    m_ok = offs_m < Sq
    if USE_TMA:  # out-of-range rows come back as zeros
        q = Q_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = DO_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = _load_rows(q_base, offs_m, stride_qs, Sq, offs_d, d_ok)
        do = _load_rows(do_base, offs_m, stride_dos, Sq, offs_d, d_ok)
    if RECTIFY:  # the forward wrote scale * O_spa + bias: O_spa's gradient is scale * dO
        do = (do.to(tl.float32) * tl.load(rs_base + start_m // BLOCK_SIZE)).to(q.dtype)
    lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    qkT = dot0(k, tl.trans(q), IEEE) * qk_scale
    pT = tl.math.exp2(qkT - lse[None, :])
    dv = dot(pT.to(do.dtype), do, dv, IEEE)
    dpT = dot0(v, tl.trans(do), IEEE)
    dsT = pT * (dpT - delta[None, :])
    dk = dot(dsT.to(q.dtype), q, dk, IEEE)
    if ATOMIC_DQ:  # this key tile's share of dQ = dS K, added into the float32 accumulator
        dq = dot0(tl.trans(dsT.to(q.dtype)), k, IEEE) * sm_scale
        tl.atomic_add(dqa_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :],
                      sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n,
    Q, K, V, EK, EV, DO, LSE, DELTA, DK, DV, DEK, DEV, Q_IDX, Q_CNT, Q_DESC, DO_DESC, RS, DQA,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ekb, stride_ekh, stride_eks,
    stride_evb, stride_evh, stride_evs,
    stride_dob, stride_doh, stride_dos,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch, stride_rsb, stride_rsh,
    H, Sq, Sk, T, D, NKT, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, RECTIFY: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """dK/dV of key tile `pid_n` (past the sparse key tiles: a tile of extra keys) of head `program_id(1)`; with
    ATOMIC_DQ also its share of dQ, added into the float32 `[B*H, Sq, BLOCK_D]` accumulator DQA."""
    M_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh * Sq
    delta_base = DELTA + pid_bh * Sq
    dqa_base = DQA + pid_bh.to(tl.int64) * Sq * BLOCK_D
    rs_base = RS
    if RECTIFY:
        rs_base = RS + b * stride_rsb + h * stride_rsh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if pid_n < NKT:
        start_n = pid_n * BLOCK_N
        offs_n = start_n + offs_n0
        k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_ks, Sk, offs_d, d_ok)
        v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vs, Sk, offs_d, d_ok)
        kblk = start_n // BLOCK_SIZE
        row = Q_IDX + b * stride_ib + h * stride_ih + kblk * stride_ir
        cnt = tl.load(Q_CNT + b * stride_cb + h * stride_ch + kblk)
        for it in tl.range(0, cnt * M_SUB, warp_specialize=WARP_SPEC):
            qb = tl.load(row + it // M_SUB)
            start_m = qb * BLOCK_SIZE + (it % M_SUB) * BLOCK_M
            dk, dv = _dkdv_step(dk, dv, k, v, b, h, q_base, do_base, lse_base, delta_base, Q_DESC, DO_DESC, start_m,
                                stride_qs, stride_dos, Sq, qk_scale, offs_m0, offs_d, d_ok, rs_base, dqa_base, sm_scale,
                                BLOCK_M, BLOCK_D, USE_TMA, IEEE, BLOCK_SIZE, RECTIFY, ATOMIC_DQ)
        n_ok = offs_n < Sk
        st = n_ok[:, None] & d_ok[None, :]
        tl.store(DK + pid_bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=st)
        tl.store(DV + pid_bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=st)
    else:
        start_n = (pid_n - NKT) * BLOCK_N
        offs_n = start_n + offs_n0
        k = _load_rows(EK + b * stride_ekb + h * stride_ekh, offs_n, stride_eks, T, offs_d, d_ok)
        v = _load_rows(EV + b * stride_evb + h * stride_evh, offs_n, stride_evs, T, offs_d, d_ok)
        for start_m in range(0, Sq, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, b, h, q_base, do_base, lse_base, delta_base, Q_DESC, DO_DESC, start_m,
                                stride_qs, stride_dos, Sq, qk_scale, offs_m0, offs_d, d_ok, rs_base, dqa_base, sm_scale,
                                BLOCK_M, BLOCK_D, USE_TMA, IEEE, BLOCK_SIZE, RECTIFY, ATOMIC_DQ)
        n_ok = offs_n < T
        st = n_ok[:, None] & d_ok[None, :]
        tl.store(DEK + pid_bh * T * D + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DEK.dtype.element_ty), mask=st)
        tl.store(DEV + pid_bh * T * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DEV.dtype.element_ty), mask=st)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k, v, qk_scale, key_ok, MASKED: tl.constexpr, IEEE: tl.constexpr):
    qk = dot0(q, tl.trans(k), IEEE) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASKED:
        p = tl.where(key_ok[None, :], p, 0.0)
    dp = dot0(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    dq = dot(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit
def _dq_program(
    pid_m,
    Q, K, V, EK, EV, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, K_DESC, V_DESC, RS,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ekb, stride_ekh, stride_eks,
    stride_evb, stride_evh, stride_evs,
    stride_dob, stride_doh, stride_dos,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch, stride_rsb, stride_rsh,
    H, Sq, Sk, T, D, NKB, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr, RECTIFY: tl.constexpr,
):
    """dQ of query tile `pid_m` of head `program_id(1)`."""
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    qblk = start_m // BLOCK_SIZE
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Sq
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qs, Sq, offs_d, d_ok)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dos, Sq, offs_d, d_ok)
    if RECTIFY:  # O_spa's gradient is scale * dO (see the dK/dV kernel)
        do = (do.to(tl.float32) * tl.load(RS + b * stride_rsb + h * stride_rsh + qblk)).to(q.dtype)
    lse = tl.load(LSE + pid_bh * Sq + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * Sq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    row, n_full, has_tail = kv_list(KV_IDX, KV_CNT, b, h, qblk, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                                    NKB, EVEN_K)
    for it in tl.range(0, n_full * N_SUB, warp_specialize=WARP_SPEC):
        kb = tl.load(row + it // N_SUB)
        start_n = kb * BLOCK_SIZE + (it % N_SUB) * BLOCK_N
        if USE_TMA:
            k = K_DESC.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V_DESC.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            kv_off = (start_n + offs_n)[:, None]
            k = tl.load(k_base + kv_off * stride_ks + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + kv_off * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        dq = _dq_step(dq, q, do, lse, delta, k, v, qk_scale, offs_n, False, IEEE)
    if not EVEN_K:
        if has_tail:
            for j in range(0, N_SUB):
                start_n = (NKB - 1) * BLOCK_SIZE + j * BLOCK_N
                n_ok = (start_n + offs_n) < Sk
                k = _load_rows(k_base, start_n + offs_n, stride_ks, Sk, offs_d, d_ok)
                v = _load_rows(v_base, start_n + offs_n, stride_vs, Sk, offs_d, d_ok)
                dq = _dq_step(dq, q, do, lse, delta, k, v, qk_scale, n_ok, True, IEEE)
    if HAS_EXTRA:
        ek_base = EK + b * stride_ekb + h * stride_ekh
        ev_base = EV + b * stride_evb + h * stride_evh
        for start_n in range(0, T, BLOCK_N):
            n_ok = (start_n + offs_n) < T
            k = _load_rows(ek_base, start_n + offs_n, stride_eks, T, offs_d, d_ok)
            v = _load_rows(ev_base, start_n + offs_n, stride_evs, T, offs_d, d_ok)
            dq = _dq_step(dq, q, do, lse, delta, k, v, qk_scale, n_ok, True, IEEE)
    tl.store(DQ + pid_bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, EK, EV, DO, LSE, DELTA, DK, DV, DEK, DEV, Q_IDX, Q_CNT, Q_DESC, DO_DESC, RS, DQA,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob, stride_doh, stride_dos,
    stride_ib, stride_ih, stride_ir, stride_cb, stride_ch, stride_rsb, stride_rsh,
    H, Sq, Sk, T, D, NKT, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, RECTIFY: tl.constexpr = False,
    ATOMIC_DQ: tl.constexpr = False,
):
    _dkdv_program(tl.program_id(0), Q, K, V, EK, EV, DO, LSE, DELTA, DK, DV, DEK, DEV, Q_IDX, Q_CNT, Q_DESC, DO_DESC, RS,
                  DQA,
                  stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob, stride_doh,
                  stride_dos, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch, stride_rsb, stride_rsh,
                  H, Sq, Sk, T, D, NKT, qk_scale, sm_scale,
                  BLOCK_SIZE, BLOCK_M, BLOCK_N, BLOCK_D, IEEE, USE_TMA, WARP_SPEC, RECTIFY, ATOMIC_DQ)


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, EK, EV, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, K_DESC, V_DESC, RS,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob, stride_doh, stride_dos,
    stride_ib, stride_ih, stride_ir, stride_cb, stride_ch, stride_rsb, stride_rsh,
    H, Sq, Sk, T, D, NKB, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr, RECTIFY: tl.constexpr = False,
):
    _dq_program(tl.program_id(0), Q, K, V, EK, EV, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, K_DESC, V_DESC, RS,
                stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob, stride_doh,
                stride_dos, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch, stride_rsb, stride_rsh,
                H, Sq, Sk, T, D, NKB, qk_scale, sm_scale,
                BLOCK_SIZE, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_K, HAS_EXTRA, IEEE, USE_TMA, WARP_SPEC, RECTIFY)


@triton.jit
def _bsa_bwd_fused_kernel(
    Q, K, V, EK, EV, DO, LSE, DELTA, DQ, DK, DV, DEK, DEV, KV_IDX, KV_CNT, Q_IDX, Q_CNT,
    Q_DESC, DO_DESC, K_DESC, V_DESC, RS,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob, stride_doh, stride_dos,
    stride_kib, stride_kih, stride_kir, stride_kcb, stride_kch,
    stride_qib, stride_qih, stride_qir, stride_qcb, stride_qch, stride_rsb, stride_rsh,
    H, Sq, Sk, T, D, NKT, NKB, N_DKDV, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_K: tl.constexpr, HAS_EXTRA: tl.constexpr,
    IEEE: tl.constexpr, USE_TMA1: tl.constexpr, USE_TMA2: tl.constexpr, RECTIFY: tl.constexpr = False,
):
    """Both passes in one launch (as FlexAttention's backward): programs [0, N_DKDV) of axis 0 do the dK/dV tiles,
    the rest the dQ tiles. One launch instead of two, and the dQ programs fill the SMs the dK/dV pass's last
    wave leaves idle."""
    pid = tl.program_id(0)
    if pid < N_DKDV:
        _dkdv_program(pid, Q, K, V, EK, EV, DO, LSE, DELTA, DK, DV, DEK, DEV, Q_IDX, Q_CNT, Q_DESC, DO_DESC, RS, DQ,
                      stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                      stride_vs, stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob,
                      stride_doh, stride_dos, stride_qib, stride_qih, stride_qir, stride_qcb, stride_qch,
                      stride_rsb, stride_rsh, H, Sq, Sk, T, D, NKT, qk_scale, sm_scale,
                      BLOCK_SIZE, BLOCK_M1, BLOCK_N1, BLOCK_D, IEEE, USE_TMA1, False, RECTIFY, False)
    else:
        _dq_program(pid - N_DKDV, Q, K, V, EK, EV, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, K_DESC, V_DESC, RS,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                    stride_vs, stride_ekb, stride_ekh, stride_eks, stride_evb, stride_evh, stride_evs, stride_dob,
                    stride_doh, stride_dos, stride_kib, stride_kih, stride_kir, stride_kcb, stride_kch,
                    stride_rsb, stride_rsh, H, Sq, Sk, T, D, NKB, qk_scale, sm_scale,
                    BLOCK_SIZE, BLOCK_M2, BLOCK_N2, BLOCK_D, EVEN_K, HAS_EXTRA, IEEE, USE_TMA2, False, RECTIFY)


@triton.jit
def _bwd_delta_kernel(O, DO, LSE, DLSE, DELTA,
                      stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
                      stride_lb, stride_lh, stride_ls, stride_eb, stride_eh, stride_es,
                      H, Sq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(O * dO) in float32, minus dLSE where the row's lse is finite: one pass over O and dO (the
    torch expression it replaces was four or more kernels and two float32 copies). LSE and DELTA share the
    "e" strides, DLSE has its own ("l")."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    ld = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=ld,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        lse = tl.load(LSE + b * stride_eb + h * stride_eh + offs_m * stride_es, mask=m_ok, other=0.0)
        dl = tl.load(DLSE + b * stride_lb + h * stride_lh + offs_m * stride_ls, mask=m_ok, other=0.0).to(tl.float32)
        delta = delta - tl.where(tl.abs(lse) < float("inf"), dl, 0.0)
    tl.store(DELTA + b * stride_eb + h * stride_eh + offs_m * stride_es, delta, mask=m_ok)


_DELTA = LaunchCache(_bwd_delta_kernel)
_DKDV = LaunchCache(_bsa_bwd_dkdv_kernel)
_DQ = LaunchCache(_bsa_bwd_dq_kernel)
_FUSED = LaunchCache(_bsa_bwd_fused_kernel)


def bwd_delta(out: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
              interpret: bool = False) -> torch.Tensor:
    """`rowsum(out * do) - dlse` (dlse only where lse is finite), float32 `[B, H, Sq]` laid out like `lse` (any
    strides: the neighborhood backward passes views of its `[B, *spatial, H]` tensors), in one kernel."""
    B, H, Sq, D = out.shape
    delta = torch.empty_strided(lse.shape, lse.stride(), dtype=torch.float32, device=out.device)
    if Sq == 0:
        return delta
    bm = 64 if not interpret else 16
    grid = (cdiv(Sq, bm), B * H)
    dl = dlse if dlse is not None else lse
    _DELTA(grid, (out, do, lse, dl, delta, *strides3(out), *strides3(do), *strides3(dl), *strides3(lse), H, Sq, D),
           dict(BLOCK_M=bm, BLOCK_D=head_dim_pad(D), HAS_DLSE=dlse is not None, num_warps=4))
    return delta


def rectified_delta(do: torch.Tensor, out: torch.Tensor, out_bias: torch.Tensor, block_size: int) -> torch.Tensor:
    """`rowsum(dO * (out - bias of the row's query block))`, float32 `[B, H, Sq]`, without materialising the bias
    per token: rowsum(dO * out) - rowsum over D of (dO summed per row) * bias, done block-wise."""
    B, H, Sq, D = out.shape
    nq = math.ceil(Sq / block_size)
    full = (out.float() * do.float()).sum(-1)
    pad = nq * block_size - Sq
    d32 = torch.nn.functional.pad(do.float(), (0, 0, 0, pad)).view(B, H, nq, block_size, D)
    corr = torch.einsum("bhqsd,bhqd->bhqs", d32, out_bias.float().expand(B, H, nq, D)).reshape(B, H, nq * block_size)
    return (full - corr[..., :Sq]).contiguous()


def rectify_grads(
    do: torch.Tensor, delta: torch.Tensor, out_scale: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the epilogue's scale `[B, H, nq]` and bias `[B, H, nq, D]` (float32, full batch/head dims).

    d bias = dO summed over the block's rows; d scale = sum over the rows of rowsum(dO * O_spa), which is
    `delta / scale` (`delta` from `rectified_delta`). Where a scale is 0 the sparse output is not recoverable from
    the written output and its scale gradient is returned as 0."""
    B, H, Sq, D = do.shape
    nq = math.ceil(Sq / block_size)
    pad = nq * block_size - Sq
    dbias = torch.nn.functional.pad(do.float(), (0, 0, 0, pad)).view(B, H, nq, block_size, D).sum(3)
    dsum = torch.nn.functional.pad(delta.float(), (0, pad)).view(B, H, nq, block_size).sum(-1)
    sc = out_scale.float().expand(B, H, nq)
    dscale = torch.where(sc != 0, dsum / torch.where(sc != 0, sc, torch.ones_like(sc)), torch.zeros_like(dsum))
    return dscale, dbias


#: `DIFFATTN_BSA_BWD=fused|split|atomic`: both backward passes in one launch, the dK/dV and dQ kernels one after the
#: other, or the dK/dV pass alone with dQ added by atomics (see the module docstring). Fused is the default: on the
#: H200 (session 8, BENCHMARKS.md) it is faster in 7 of 9 measured cases and at least as fast as FlexAttention's
#: backward in all 9; split wins by <= 2% at Wan-14B radial and loses to Flex at FLUX 1024².
ENV_BWD = "DIFFATTN_BSA_BWD"
BWD_MODES = ("fused", "split", "atomic")
DEFAULT_BWD_MODE = "fused"


def bwd_mode() -> str:
    v = os.environ.get(ENV_BWD, "").strip().lower()
    if v in ("", "default"):
        return DEFAULT_BWD_MODE
    if v not in BWD_MODES:
        raise ValueError(f"{ENV_BWD} must be one of {', '.join(BWD_MODES)}, got {v!r}")
    return v


@functools.lru_cache(maxsize=None)
def bwd_config(d: int, block_size: int, dtype: torch.dtype, interpret: bool) -> dict:
    """(Cached: callers copy the parts they change.) Tiles for the two backward kernels: dkdv (BLOCK_M queries x BLOCK_N keys), dq (BLOCK_M queries x BLOCK_N keys).

    Tuned on an H100 (bf16, D=128): dkdv 64x128 with 8 warps, 3 stages; dq 128x64 with 8 warps, 2 stages; q/dO and
    k/v through TMA descriptors (319 TFLOP/s dense at Wan-1.3B; 308 without TMA; warp specialization: no gain). fp32 inputs get small tiles (correctness path, not tuned).
    """
    bd = head_dim_pad(d)
    p = pow2_divisor

    def cfg(m1, n1, w1, s1, m2, n2, w2, s2):
        return dict(dkdv=dict(BLOCK_M=p(block_size, m1), BLOCK_N=p(block_size, n1), num_warps=w1, num_stages=s1),
                    dq=dict(BLOCK_M=p(block_size, m2), BLOCK_N=p(block_size, n2), num_warps=w2, num_stages=s2))

    if interpret:
        return cfg(32, 32, 4, 1, 32, 32, 4, 1)
    if dtype == torch.float32:
        if bd <= 64:
            return cfg(32, 64, 4, 1, 64, 32, 4, 1)
        if bd <= 128:
            return cfg(32, 64, 8, 1, 64, 32, 8, 1)
        return cfg(16, 32, 8, 1, 32, 16, 8, 1)
    if bd <= 128:
        c = cfg(64, 128, 8, 3, 128, 64, 8, 2)
        for part in c.values():
            part["tma"] = True
        return c
    return cfg(32, 64, 8, 1, 64, 32, 8, 1)


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    block_size: int,
    scale: float,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    interpret: bool = False,
    config: dict | None = None,
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Returns (dq, dk, dv, d_extra_k, d_extra_v); the last two are `[B,H,0,D]` when there are no extra keys.

    With the forward's `out_scale`/`out_bias` (see `triton_fwd.forward`), `out` is the rectified output
    `scale * O_spa + bias` and `do` its gradient: the kernels scale dO by the query block's scale as they load it,
    and `delta = rowsum(dO * (out - bias))` equals `rowsum(dO_spa * O_spa)` with no division by the scale.
    `delta` may be passed precomputed (float32 `[B, H, Sq]`, before the dLSE term)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    has_extra = extra_k is not None and extra_k.shape[2] > 0
    T = extra_k.shape[2] if has_extra else 0
    dq = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Sk, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, H, Sk, D), dtype=q.dtype, device=q.device)
    dek = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dev = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if Sq == 0:
        dk.zero_(), dv.zero_(), dek.zero_(), dev.zero_()
        return dq, dk, dv, dek, dev
    do = do if do.stride(-1) == 1 else do.contiguous()
    rectify = out_scale is not None
    if delta is None and not rectify:
        delta = bwd_delta(out, do, lse, dlse, interpret)  # dlse fused
    else:
        if delta is None:
            delta = rectified_delta(do, out, out_bias, block_size)
        if dlse is not None:
            delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(dlse, dtype=torch.float32))
        delta = delta.contiguous()
    cfgs = config if config else bwd_config(D, block_size, q.dtype, interpret)
    ek = extra_k if has_extra else q
    ev = extra_v if has_extra else q

    def bstr(t: torch.Tensor) -> tuple[int, int]:
        return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)

    rstr = (out_scale.stride(0), out_scale.stride(1)) if rectify else (0, 0)
    common = (*strides3(q), *strides3(k), *strides3(v), *strides3(ek), *strides3(ev), *strides3(do))
    bd = head_dim_pad(D)
    ieee = q.dtype == torch.float32
    hopper = q.is_cuda and not interpret and is_hopper_or_newer(q.device.index if q.device.index is not None else torch.cuda.current_device())
    allow = hopper or interpret

    def desc(t: torch.Tensor, rows: int):
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, bd])

    mode = cfgs.get("mode") or bwd_mode()
    if mode not in BWD_MODES:
        raise ValueError(f"backward mode must be one of {', '.join(BWD_MODES)}, got {mode!r}")
    c1 = dict(cfgs["dkdv"])
    bm1, bn1 = c1.pop("BLOCK_M"), c1.pop("BLOCK_N")
    tma1 = bool(c1.pop("tma", False)) and allow and tma_ok(q, do, D)
    ws1 = bool(c1.pop("warp_specialize", False)) and allow
    nkt = cdiv(Sk, bn1)
    grid1 = (nkt + cdiv(T, bn1), B * H)
    atomic = mode == "atomic"
    dq_acc = torch.zeros((B, H, Sq, bd), dtype=torch.float32, device=q.device) if atomic else dq

    def launch1(tma_: bool, ws_: bool) -> None:
        _DKDV(grid1, (
            q, k, v, ek, ev, do, lse, delta, dk, dv, dek, dev, q_idx, q_cnt,
            desc(q, bm1) if tma_ else None, desc(do, bm1) if tma_ else None, out_scale, dq_acc,
            *common, *bstr(q_idx), q_idx.stride(2), *bstr(q_cnt), *rstr,
            H, Sq, Sk, T, D, nkt, scale * LOG2E, scale,
        ), dict(BLOCK_SIZE=block_size, BLOCK_M=bm1, BLOCK_N=bn1, BLOCK_D=bd, IEEE=ieee, USE_TMA=tma_, WARP_SPEC=ws_,
                RECTIFY=rectify, ATOMIC_DQ=atomic, **c1))

    if atomic:
        if grid1[0] > 0:
            _launch_with_fallback(launch1, tma1, ws1, ("dkdv", q.dtype, D, block_size, bm1, bn1, has_extra, rectify,
                                                       True, tuple(sorted(c1.items()))))
        dq.copy_(dq_acc[..., :D])
        return dq, dk, dv, dek, dev
    if mode == "fused":
        c2 = dict(cfgs["dq"])
        bm2, bn2 = c2.pop("BLOCK_M"), c2.pop("BLOCK_N")
        tma2 = bool(c2.pop("tma", False)) and allow and tma_ok(k, v, D)
        n_dkdv = grid1[0]
        gridf = (n_dkdv + cdiv(Sq, bm2), B * H)
        opts = {n: c1[n] for n in ("num_warps", "num_stages") if n in c1}  # one launch: the dK/dV pass's options

        def launchf(tma_: bool, ws_: bool) -> None:
            t1, t2 = tma_ and tma1, tma_ and tma2
            _FUSED(gridf, (
                q, k, v, ek, ev, do, lse, delta, dq, dk, dv, dek, dev, kv_idx, kv_cnt, q_idx, q_cnt,
                desc(q, bm1) if t1 else None, desc(do, bm1) if t1 else None,
                desc(k, bn2) if t2 else None, desc(v, bn2) if t2 else None, out_scale,
                *common, *bstr(kv_idx), kv_idx.stride(2), *bstr(kv_cnt), *bstr(q_idx), q_idx.stride(2), *bstr(q_cnt),
                *rstr, H, Sq, Sk, T, D, nkt, math.ceil(Sk / block_size), n_dkdv, scale * LOG2E, scale,
            ), dict(BLOCK_SIZE=block_size, BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, BLOCK_D=bd,
                    EVEN_K=(Sk % block_size == 0), HAS_EXTRA=has_extra, IEEE=ieee, USE_TMA1=t1, USE_TMA2=t2,
                    RECTIFY=rectify, **opts))

        _launch_with_fallback(launchf, tma1 or tma2, False, ("fused", q.dtype, D, block_size, bm1, bn1, bm2, bn2,
                                                           Sk % block_size == 0, has_extra, rectify,
                                                           tuple(sorted(opts.items()))))
        return dq, dk, dv, dek, dev
    if grid1[0] > 0:
        _launch_with_fallback(launch1, tma1, ws1, ("dkdv", q.dtype, D, block_size, bm1, bn1, has_extra, rectify, False,
                                                   tuple(sorted(c1.items()))))
    c2 = dict(cfgs["dq"])
    bm2, bn2 = c2.pop("BLOCK_M"), c2.pop("BLOCK_N")
    tma2 = bool(c2.pop("tma", False)) and allow and tma_ok(k, v, D)
    ws2 = bool(c2.pop("warp_specialize", False)) and allow
    grid2 = (cdiv(Sq, bm2), B * H)

    def launch2(tma_: bool, ws_: bool) -> None:
        _DQ(grid2, (
            q, k, v, ek, ev, do, lse, delta, dq, kv_idx, kv_cnt,
            desc(k, bn2) if tma_ else None, desc(v, bn2) if tma_ else None, out_scale,
            *common, *bstr(kv_idx), kv_idx.stride(2), *bstr(kv_cnt), *rstr,
            H, Sq, Sk, T, D, math.ceil(Sk / block_size), scale * LOG2E, scale,
        ), dict(BLOCK_SIZE=block_size, BLOCK_M=bm2, BLOCK_N=bn2, BLOCK_D=bd,
                EVEN_K=(Sk % block_size == 0), HAS_EXTRA=has_extra, IEEE=ieee, USE_TMA=tma_, WARP_SPEC=ws_,
                RECTIFY=rectify, **c2))

    _launch_with_fallback(launch2, tma2, ws2, ("dq", q.dtype, D, block_size, bm2, bn2, Sk % block_size == 0, has_extra, rectify, tuple(sorted(c2.items()))))
    return dq, dk, dv, dek, dev


def _launch_with_fallback(launch, tma: bool, ws: bool, key: tuple) -> None:
    """Launch with the Hopper options, falling back (remembered per specialization) if they fail to compile."""
    run_with_fallbacks("block_sparse backward", key, hopper_variants(tma, ws, launch))
