"""Triton forward of block-sparse attention: FlashAttention-2 online softmax over each query tile's key-block list.

One program computes one query tile (`BLOCK_M` rows, inside one query block) of one (batch, head). It walks the
padded-CSR list of that query block's key blocks (see `index.py`), `BLOCK_SIZE // BLOCK_N` key tiles per block,
then the extra (text) keys, which every query attends. Only the partial tail key block and the extra keys pay for
per-element masks: the list is ascending, so the tail block, if set, is its last entry and is handled after the
unmasked main loop. Scores are scaled into base 2 (`exp2`), accumulation is float32.

Configs are chosen by `fwd_config` (a fixed table per head dim / block size, tuned on an H100), not by
`triton.autotune`, so a call never benchmarks or synchronises (CUDA-graph friendly).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ..common import DescriptorCopier, RecordedLaunch, replay_allowed, run_with_fallbacks

LOG2E = 1.4426950408889634
logger = logging.getLogger("diffattn")
# Triton's CPU interpreter (3.9) mis-computes bfloat16 `tl.dot` (operands read as raw integers), so under
# TRITON_INTERPRET=1 the dot operands are upcast to float32; compiled kernels never take this branch.
_INTERP_UPCAST = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    if _INTERP_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot0(a, b, IEEE: tl.constexpr):
    if _INTERP_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def kv_list(KV_IDX, KV_CNT, b, h, qblk, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch, NKB,
            EVEN_K: tl.constexpr):
    """Query block `qblk`'s key-block list: (its row in `KV_IDX`, how many entries are whole blocks, whether the
    last entry is the partial tail block). The list is ascending, so the tail block, if kept, is the last entry;
    with EVEN_K there is none."""
    row = KV_IDX + b * stride_ib + h * stride_ih + qblk * stride_ir
    cnt = tl.load(KV_CNT + b * stride_cb + h * stride_ch + qblk)
    n_full = cnt
    has_tail = cnt < 0  # never true; only read when not EVEN_K
    if not EVEN_K:
        last = tl.load(row + tl.maximum(cnt - 1, 0))
        has_tail = (cnt > 0) & (last == NKB - 1)
        n_full = cnt - has_tail.to(tl.int32)
    return row, n_full, has_tail


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k, v, qk_scale, key_ok, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax. k, v: [BLOCK_N, BLOCK_D]."""
    qk = dot0(q, tl.trans(k), IEEE) * qk_scale
    if MASKED:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_ij
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(p.to(v.dtype), v, acc, IEEE)
    return acc, l_i, m_ij


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, EK, EV, O, LSE, KV_IDX, KV_CNT, K_DESC, V_DESC, RS, RB,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ekb, stride_ekh, stride_eks,
    stride_evb, stride_evh, stride_evs,
    stride_ob, stride_oh, stride_os,
    stride_ib, stride_ih, stride_ir,
    stride_cb, stride_ch,
    stride_rsb, stride_rsh, stride_rbb, stride_rbh, stride_rbq,
    H, Sq, Sk, T, D, NKB, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, RECTIFY: tl.constexpr = False,
):
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid_m = tl.program_id(0)
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

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    row, n_full, has_tail = kv_list(KV_IDX, KV_CNT, b, h, qblk, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                                    NKB, EVEN_K)

    for it in tl.range(0, n_full * N_SUB, warp_specialize=WARP_SPEC):
        kb = tl.load(row + it // N_SUB)
        start_n = kb * BLOCK_SIZE + (it % N_SUB) * BLOCK_N
        kv_off = (start_n + offs_n)[:, None]
        if USE_TMA:
            k = K_DESC.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V_DESC.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif EVEN_D:
            k = tl.load(k_base + kv_off * stride_ks + offs_d[None, :])
            v = tl.load(v_base + kv_off * stride_vs + offs_d[None, :])
        else:
            k = tl.load(k_base + kv_off * stride_ks + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + kv_off * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, qk_scale, offs_n, False, IEEE)

    if not EVEN_K:
        if has_tail:
            for j in range(0, N_SUB):
                start_n = (NKB - 1) * BLOCK_SIZE + j * BLOCK_N
                n_ok = (start_n + offs_n) < Sk
                kv_off = (start_n + offs_n)[:, None]
                ld_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + kv_off * stride_ks + offs_d[None, :], mask=ld_mask, other=0.0)
                v = tl.load(v_base + kv_off * stride_vs + offs_d[None, :], mask=ld_mask, other=0.0)
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, qk_scale, n_ok, True, IEEE)

    if HAS_EXTRA:
        ek_base = EK + b * stride_ekb + h * stride_ekh
        ev_base = EV + b * stride_evb + h * stride_evh
        # one stage: pipelining this short loop (a few text tiles) ran the 4-warp 128-row kernel out of registers
        # where a key tail also exists, and ptxas then serialized every wgmma of the kernel (C7512, sm90)
        for start_n in tl.range(0, T, BLOCK_N, num_stages=1):
            n_ok = (start_n + offs_n) < T
            kv_off = (start_n + offs_n)[:, None]
            ld_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(ek_base + kv_off * stride_eks + offs_d[None, :], mask=ld_mask, other=0.0)
            v = tl.load(ev_base + kv_off * stride_evs + offs_d[None, :], mask=ld_mask, other=0.0)
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k, v, qk_scale, n_ok, True, IEEE)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    if RECTIFY:  # epilogue: out = scale[qblk] * out + bias[qblk, :] (one scale and bias row per query block)
        r = tl.load(RS + b * stride_rsb + h * stride_rsh + qblk)
        c = tl.load(RB + b * stride_rbb + h * stride_rbh + qblk * stride_rbq + offs_d, mask=d_ok, other=0.0)
        out = out * r + c[None, :]
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * Sq + offs_m, lse, mask=m_ok)


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n (n is a multiple of 16, so at least 16)."""
    d = 16
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (plain Python: `triton.cdiv` is a JIT function in newer Triton, slow to call)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def head_dim_pad(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def fwd_config(d: int, block_size: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes, warps, pipeline depth and Hopper options for the forward.

    Tuned on an H100 (bf16, D=128, block 128; see NOTES.md): BLOCK_M 128 x BLOCK_N 64 with 4 warps, 2 stages, K/V
    through TMA tensor descriptors and a warp-specialized key loop was fastest (522 TFLOP/s dense at Wan-1.3B);
    8 warps / BLOCK_N 128 ran ~12% slower. fp32 inputs get small tiles (correctness path, not tuned).
    `tma` and `warp_specialize` are dropped automatically on pre-Hopper GPUs and under the interpreter.
    """
    bd = head_dim_pad(d)
    if interpret:
        return dict(BLOCK_M=pow2_divisor(block_size, 64), BLOCK_N=pow2_divisor(block_size, 32), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if bd <= 64:
            return dict(BLOCK_M=pow2_divisor(block_size, 64), BLOCK_N=pow2_divisor(block_size, 64), num_warps=4, num_stages=2)
        if bd <= 128:
            return dict(BLOCK_M=pow2_divisor(block_size, 64), BLOCK_N=pow2_divisor(block_size, 32), num_warps=4, num_stages=2)
        return dict(BLOCK_M=pow2_divisor(block_size, 32), BLOCK_N=pow2_divisor(block_size, 32), num_warps=4, num_stages=1)
    if bd <= 64:  # D=64: 424 TFLOP/s dense at Wan-1.3B (BLOCK_N 64: 378)
        return dict(BLOCK_M=pow2_divisor(block_size, 128), BLOCK_N=pow2_divisor(block_size, 128), num_warps=4, num_stages=2,
                    tma=True, warp_specialize=True)
    if bd <= 128:
        return dict(BLOCK_M=pow2_divisor(block_size, 128), BLOCK_N=pow2_divisor(block_size, 64), num_warps=4, num_stages=2,
                    tma=True, warp_specialize=True)
    return dict(BLOCK_M=pow2_divisor(block_size, 64), BLOCK_N=pow2_divisor(block_size, 32), num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=None)
def is_hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def hopper_variants(tma: bool, ws: bool, launch: Callable[[bool, bool], Any]) -> list[tuple[str, Callable[[], Any]]]:
    """The variants `kernels.common.run_with_fallbacks` tries, best first: as asked, then without warp
    specialization, then without TMA (the portable one, last, whose errors propagate).

    Triton 3.6's Hopper warp-specialization pass fails on some specializations (seen: the forward with a
    block-aligned key length); `run_with_fallbacks` remembers a failure per key so later calls do not recompile."""
    chain = [(tma, ws)] + ([(tma, False)] if ws else []) + ([(False, False)] if tma else [])
    return [(f"tma={t}, warp_specialize={w}", functools.partial(launch, t, w)) for t, w in dict.fromkeys(chain)]


def rect_strides(out_scale: torch.Tensor | None, out_bias: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """(scale b, scale h, bias b, bias h, bias q-block) strides; zeros when there is no rectification."""
    if out_scale is None or out_bias is None:
        return (0, 0, 0, 0, 0)
    return (out_scale.stride(0), out_scale.stride(1), out_bias.stride(0), out_bias.stride(1), out_bias.stride(2))


def strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _ptr_or(*ts: torch.Tensor | None) -> int:
    """OR of the data pointers (16-byte alignment of all of them is `_ptr_or(...) % 16 == 0`)."""
    p = 0
    for t in ts:
        if t is not None:
            p |= t.data_ptr()
    return p


def launch_key(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret, out_scale, out_bias) -> tuple:
    """Everything a forward launch specializes on, from tensor metadata only (no sync): the `_launches` key."""
    ex = None if extra_k is None else (extra_k.shape, extra_k.stride(), extra_v.shape, extra_v.stride())
    rect = None if out_scale is None else (out_scale.shape, out_scale.stride(), out_bias.stride(), out_scale.dtype)
    aligned = _ptr_or(q, k, v, extra_k, extra_v, kv_idx, kv_cnt, out_scale, out_bias) % 16 == 0
    return (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, kv_idx.shape, kv_idx.stride(),
            kv_cnt.stride(), block_size, scale, ex, rect, interpret, aligned)


class FwdLaunch:
    """The per-specialization part of a forward launch, built once per `launch_key`: config, grid, strides,
    constexprs, and (after its first call) the recorded compiled kernel (`kernels.common.RecordedLaunch`), so a
    steady call only allocates out/lse, builds the two TMA descriptors and launches."""

    SLOTS = ("Q", "K", "V", "EK", "EV", "O", "LSE", "KV_IDX", "KV_CNT", "K_DESC", "V_DESC", "RS", "RB")

    def __init__(self, q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret, config,
                 out_scale, out_bias, record: bool):
        B, H, Sq, D = q.shape
        Sk = k.shape[2]
        self.out_shape, self.lse_shape, self.dtype, self.device = (B, H, Sq, D), (B, H, Sq), q.dtype, q.device
        self.empty = Sq == 0
        cfg = dict(config) if config else fwd_config(D, block_size, q.dtype, interpret)
        BLOCK_M, BLOCK_N = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        hopper = q.is_cuda and not interpret and is_hopper_or_newer(_index(q.device))
        self.use_tma = bool(cfg.pop("tma", False)) and (hopper or interpret) and tma_ok(k, v, D)
        warp_spec = bool(cfg.pop("warp_specialize", False)) and (hopper or interpret)
        if Sk % block_size == 0 and not interpret:
            warp_spec = False  # Triton 3.6 fails to warp-specialize this specialization (no tail branch); see NOTES.md
        self.warp_spec = warp_spec
        self.block = [1, 1, BLOCK_N, head_dim_pad(D)]
        has_extra = extra_k is not None and extra_k.shape[2] > 0
        self.has_extra = has_extra
        T = extra_k.shape[2] if has_extra else 0
        ek = extra_k if has_extra else q
        ev = extra_v if has_extra else q
        nkb = math.ceil(Sk / block_size)
        ib = kv_idx.stride(0) if kv_idx.shape[0] > 1 else 0
        ih = kv_idx.stride(1) if kv_idx.shape[1] > 1 else 0
        cb = kv_cnt.stride(0) if kv_cnt.shape[0] > 1 else 0
        ch = kv_cnt.stride(1) if kv_cnt.shape[1] > 1 else 0
        self.grid = (cdiv(Sq, BLOCK_M), B * H)
        rectify = out_scale is not None
        out_strides = (H * Sq * D, Sq * D, D)  # out is allocated contiguous
        self.ints = (*strides3(q), *strides3(k), *strides3(v), *strides3(ek), *strides3(ev), *out_strides,
                     ib, ih, kv_idx.stride(2), cb, ch, *rect_strides(out_scale, out_bias),
                     H, Sq, Sk, T, D, nkb, scale * LOG2E)
        self.constexprs = dict(
            BLOCK_SIZE=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=head_dim_pad(D),
            EVEN_K=(Sk % block_size == 0), EVEN_D=(D == head_dim_pad(D)), HAS_EXTRA=has_extra,
            IEEE=(q.dtype == torch.float32), RECTIFY=rectify, **cfg,
        )
        key = ("fwd", q.dtype, D, block_size, BLOCK_M, BLOCK_N, Sk % block_size == 0, has_extra, tuple(sorted(cfg.items())))
        self.fallback_key = key + (("rectify",) if rectify else ())
        self.record = record and q.is_cuda and not interpret
        self.recorded: RecordedLaunch | None = None
        self.rec_tma = False
        self._copy = None  # DescriptorCopier pair, once built

    def _descs(self, k, v, tma: bool):
        if not tma:
            return None, None
        if self._copy is None:  # the first call builds (and validates) them; later ones copy with a new base
            from triton.tools.tensor_descriptor import TensorDescriptor

            kd = TensorDescriptor(k, list(k.shape), list(k.stride()), self.block)
            vd = TensorDescriptor(v, list(v.shape), list(v.stride()), self.block)
            self._copy = (DescriptorCopier(kd), DescriptorCopier(vd))
            return kd, vd
        return self._copy[0](k), self._copy[1](v)

    def __call__(self, q, k, v, kv_idx, kv_cnt, extra_k, extra_v, out_scale=None, out_bias=None):
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        if self.empty:
            return out, lse
        ek = extra_k if self.has_extra else q
        ev = extra_v if self.has_extra else q
        rec = self.recorded
        if rec is not None and replay_allowed(rec.device):
            kd, vd = self._descs(k, v, self.rec_tma)
            rec((q, k, v, ek, ev, out, lse, kv_idx, kv_cnt, kd, vd, out_scale, out_bias))
            return out, lse

        def launch(tma_: bool, ws_: bool) -> None:
            kd, vd = self._descs(k, v, tma_)
            args = (q, k, v, ek, ev, out, lse, kv_idx, kv_cnt, kd, vd, out_scale, out_bias, *self.ints)
            kwargs = dict(self.constexprs, USE_TMA=tma_, WARP_SPEC=ws_)
            if self.record and self.recorded is None:
                _, r = RecordedLaunch.record(_bsa_fwd_kernel, self.grid, args, kwargs, self.SLOTS, _index(q.device))
                self.recorded, self.rec_tma, self.record = r, tma_, r is not None
            else:
                _bsa_fwd_kernel[self.grid](*args, **kwargs)

        run_with_fallbacks("block_sparse forward", self.fallback_key, hopper_variants(self.use_tma, self.warp_spec, launch))
        return out, lse


_launches: dict[tuple, FwdLaunch] = {}
_LAUNCH_CACHE = 64


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def prepare(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret=False, config=None,
            out_scale=None, out_bias=None) -> FwdLaunch:
    """The cached `FwdLaunch` of these inputs' specialization (a fresh, unrecorded one for an explicit `config`)."""
    if config is not None:
        return FwdLaunch(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret, config,
                         out_scale, out_bias, record=False)
    key = launch_key(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret, out_scale, out_bias)
    fl = _launches.get(key)
    if fl is None:
        fl = FwdLaunch(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret, None,
                       out_scale, out_bias, record=key[-1])
        if len(_launches) >= _LAUNCH_CACHE:
            _launches.pop(next(iter(_launches)))
        _launches[key] = fl
    return fl


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    block_size: int,
    scale: float,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    interpret: bool = False,
    config: dict | None = None,
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q/k/v `[B,H,S,D]` with unit last stride; returns (out `[B,H,Sq,D]`, lse f32 `[B,H,Sq]`).

    With `out_scale` float32 `[B, H, nq]` and `out_bias` float32 `[B, H, nq, D]` (both or neither; size-1 batch/head
    dims may be expanded with stride 0) the epilogue writes `out_scale[i] * out + out_bias[i]` for query block i;
    lse stays that of the sparse softmax. Without them the kernel compiles exactly as before (`RECTIFY=False`).
    Steady calls of one specialization reuse its `FwdLaunch` (see `prepare`)."""
    if extra_k is not None and extra_k.shape[2] == 0:
        extra_k = extra_v = None
    fl = prepare(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v, interpret, config, out_scale, out_bias)
    return fl(q, k, v, kv_idx, kv_cnt, extra_k, extra_v, out_scale, out_bias)


def clear_launches() -> None:
    """Forget the cached launches (tests; after changing Triton settings)."""
    _launches.clear()


def tma_ok(k: torch.Tensor, v: torch.Tensor, d: int) -> bool:
    """TMA (tensor descriptors) needs 16-byte aligned base and strides and a unit last stride."""
    if d != head_dim_pad(d):
        return False
    for t in (k, v):
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True
