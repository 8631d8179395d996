"""Hopper (sm90) forward of block-sparse attention in Triton's Gluon dialect, in FlashAttention-3's structure.

One CTA computes one query block (`block_size` = 128 rows) of one (batch, head):
- a producer warp walks the block's key-block list (`index.py`'s padded CSR), then the extra (text) keys, and
  TMA-loads each K/V tile into a `NUM_STAGES`-deep shared-memory ring (mbarriers: `k_ready`/`v_ready` filled by
  the copy engine, `kv_empty` released by both consumers);
- two consumer warpgroups each own 64 rows of the query block and share every K/V tile. Each runs the online
  softmax with exp2 and the scale folded into one FMA, with the next tile's S = QK^T issued (async wgmma) together
  with the previous tile's O += PV, so the softmax of tile j runs while PV of tile j-1 is on the tensor cores
  (FA3's intra-warpgroup overlap). With `PINGPONG` the two warpgroups also take turns issuing their wgmmas
  (two mbarriers), so one's softmax overlaps the other's matmuls (FA3's inter-warpgroup ping-pong).
Only the partial tail key block and the last text tile pay for a per-element mask (a run-time branch).
Output: `out` in q's dtype, `lse` float32 natural log; a query with no keys gets out 0 and lse -inf.

Needs Triton with Gluon (3.6 API: `warp_specialize(functions_and_args, worker_num_warps, worker_num_regs)`) and an
sm90 GPU; `unsupported_reason` says why not otherwise. Written from the Gluon tutorials' API, not their code.
"""

from __future__ import annotations

import functools
import math

import torch

from ..common import DescriptorCopier, RecordedLaunch, replay_allowed

LOG2E = 1.4426950408889634
# Key-tile rows (one key block per tile), rows per consumer warpgroup, and the query rows of one CTA.
BLOCK_N = 128
BM = 64
SUPPORTED_BLOCK = 128
SUPPORTED_HEAD_DIMS = (64, 128)

try:  # Gluon is experimental: absent from old Triton, and its module paths move between releases.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 names the TMA load `async_copy_global_to_shared`; later releases renamed it `async_load`.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    GLUON_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the installed Triton
    GLUON_ERROR = f"{type(e).__name__}: {e}"


if GLUON_ERROR is None:

    @gluon.jit
    def _tile_start(row, i, n_main, BLOCK_SIZE: gl.constexpr, N_SUB: gl.constexpr, BLOCK_N: gl.constexpr):
        """First key of tile i: a tile of a listed key block (i < n_main) or of the extra keys."""
        if i < n_main:
            kb = gl.load(row + i // N_SUB)
            start = kb * BLOCK_SIZE + (i % N_SUB) * BLOCK_N
        else:
            start = (i - n_main) * BLOCK_N
        return start

    @gluon.jit
    def _tile_info(t, n_m, H, T, KV_IDX, KV_CNT, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                   BM: gl.constexpr, BLOCK_SIZE: gl.constexpr, N_SUB: gl.constexpr, BLOCK_N: gl.constexpr,
                   HAS_EXTRA: gl.constexpr):
        """Work item t (query-row tile pid_m of head (b, h)): its key-block list and its number of key tiles."""
        pid_m = t % n_m
        bh = t // n_m
        b = bh // H
        h = bh % H
        qblk = (pid_m * 2 * BM) // BLOCK_SIZE
        row = KV_IDX + b * stride_ib + h * stride_ih + qblk * stride_ir
        n_main = gl.load(KV_CNT + b * stride_cb + h * stride_ch + qblk) * N_SUB
        n_iter = n_main
        if HAS_EXTRA:
            n_iter = n_main + (T + BLOCK_N - 1) // BLOCK_N
        return pid_m, b, h, row, n_main, n_iter

    @gluon.jit
    def _producer(k_desc, v_desc, ek_desc, ev_desc, k_smem, v_smem, k_ready, v_ready, kv_empty,
                  num_tiles, n_m, H, T, KV_IDX, KV_CNT, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                  BM: gl.constexpr, BLOCK_SIZE: gl.constexpr, N_SUB: gl.constexpr, BLOCK_N: gl.constexpr,
                  NUM_STAGES: gl.constexpr, HAS_EXTRA: gl.constexpr):
        c = 0  # ring slots used so far (over all work items of this program)
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m, b, h, row, n_main, n_iter = _tile_info(t, n_m, H, T, KV_IDX, KV_CNT, stride_ib, stride_ih,
                                                          stride_ir, stride_cb, stride_ch, BM, BLOCK_SIZE, N_SUB,
                                                          BLOCK_N, HAS_EXTRA)
            for i in range(n_iter):
                s = (c + i) % NUM_STAGES
                ph = ((c + i) // NUM_STAGES) & 1
                # a fresh barrier counts as having completed the phase before phase 0: the first lap does not wait
                mbarrier.wait(kv_empty.index(s), ph ^ 1)
                start = _tile_start(row, i, n_main, BLOCK_SIZE, N_SUB, BLOCK_N)
                mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
                mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
                if HAS_EXTRA and i >= n_main:
                    _tma_load(ek_desc, [b, h, start, 0], k_ready.index(s), k_smem.index(s))
                    _tma_load(ev_desc, [b, h, start, 0], v_ready.index(s), v_smem.index(s))
                else:
                    _tma_load(k_desc, [b, h, start, 0], k_ready.index(s), k_smem.index(s))
                    _tma_load(v_desc, [b, h, start, 0], v_ready.index(s), v_smem.index(s))
            c += n_iter

    @gluon.jit
    def _softmax_step(qk, m_i, l_i, row, i, n_main, Sk, T, qk_scale, s_layout: gl.constexpr,
                      BLOCK_SIZE: gl.constexpr, N_SUB: gl.constexpr, BLOCK_N: gl.constexpr, EVEN_K: gl.constexpr):
        """Online-softmax update for score tile i (scaled to base 2 here): returns p (f32), alpha, m, l."""
        if not EVEN_K or i >= n_main:
            start = _tile_start(row, i, n_main, BLOCK_SIZE, N_SUB, BLOCK_N)
            lim = gl.where(i >= n_main, T, Sk) - start
            if lim < BLOCK_N:  # the partial tail key block or the last text tile
                cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                qk = gl.where(gl.expand_dims(cols < lim, 0), qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _consumer(q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, O, LSE,
                  num_tiles, n_m, H, Sq, Sk, T, KV_IDX, KV_CNT, stride_ib, stride_ih, stride_ir, stride_cb,
                  stride_ch, stride_ob, stride_oh, stride_os, qk_scale,
                  WG: gl.constexpr, BM: gl.constexpr, BLOCK_SIZE: gl.constexpr, N_SUB: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
                  EVEN_K: gl.constexpr, HAS_EXTRA: gl.constexpr, PINGPONG: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        c = 0  # ring slots consumed so far (over all work items of this program)
        tc = 0  # turns taken so far (ping-pong: the two warpgroups alternate through one sequence of turns)
        n_done = 0  # work items done (phase of q_bar)
        if PINGPONG and WG == 1:
            mbarrier.arrive(turn.index(0))  # warpgroup 0 takes the first turn
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m, b, h, row, n_main, n_iter = _tile_info(t, n_m, H, T, KV_IDX, KV_CNT, stride_ib, stride_ih,
                                                          stride_ir, stride_cb, stride_ch, BM, BLOCK_SIZE, N_SUB,
                                                          BLOCK_N, HAS_EXTRA)
            start_m = pid_m * (2 * BM) + WG * BM
            # q_smem is free: every wgmma of the previous work item has completed
            mbarrier.expect(q_bar, q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, h, start_m, 0], q_bar, q_smem)
            mbarrier.wait(q_bar, n_done & 1)
            n_done += 1
            q = q_smem.reshape([BM, HEAD_D])

            m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
            l_i = gl.full([BM], 0.0, gl.float32, layout=row_s)
            acc = gl.zeros([BM, HEAD_D], gl.float32, layout=o_layout)
            if n_iter > 0:
                # key tile 0: scores only
                s0 = c % NUM_STAGES
                if PINGPONG:
                    mbarrier.wait(turn.index(WG), tc & 1)
                mbarrier.wait(k_ready.index(s0), (c // NUM_STAGES) & 1)
                kt = k_smem.index(s0).reshape([BLOCK_N, HEAD_D]).permute((1, 0))
                qk = warpgroup_mma(q, kt, gl.zeros([BM, BLOCK_N], gl.float32, layout=s_layout), use_acc=False,
                                   is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - WG))
                qk = warpgroup_mma_wait(0, deps=(qk, ))
                p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, row, 0, n_main, Sk, T, qk_scale, s_layout,
                                                   BLOCK_SIZE, N_SUB, BLOCK_N, EVEN_K)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                for j in range(1, n_iter):
                    # S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together; softmax of j under the PV
                    s = (c + j) % NUM_STAGES
                    ph = ((c + j) // NUM_STAGES) & 1
                    sp = (c + j - 1) % NUM_STAGES
                    php = ((c + j - 1) // NUM_STAGES) & 1
                    if PINGPONG:
                        mbarrier.wait(turn.index(WG), (tc + j) & 1)
                    mbarrier.wait(k_ready.index(s), ph)
                    kt = k_smem.index(s).reshape([BLOCK_N, HEAD_D]).permute((1, 0))
                    qk = warpgroup_mma(q, kt, gl.zeros([BM, BLOCK_N], gl.float32, layout=s_layout),
                                       use_acc=False, is_async=True)
                    mbarrier.wait(v_ready.index(sp), php)
                    acc = warpgroup_mma(p_op, v_smem.index(sp).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
                    if PINGPONG:
                        mbarrier.arrive(turn.index(1 - WG))
                    qk = warpgroup_mma_wait(1, deps=(qk, ))
                    p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, row, j, n_main, Sk, T, qk_scale, s_layout,
                                                       BLOCK_SIZE, N_SUB, BLOCK_N, EVEN_K)
                    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
                    mbarrier.arrive(kv_empty.index(sp))
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                # the last key tile's PV
                sl = (c + n_iter - 1) % NUM_STAGES
                phl = ((c + n_iter - 1) // NUM_STAGES) & 1
                if PINGPONG:
                    mbarrier.wait(turn.index(WG), (tc + n_iter) & 1)
                mbarrier.wait(v_ready.index(sl), phl)
                acc = warpgroup_mma(p_op, v_smem.index(sl).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - WG))
                acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
                mbarrier.arrive(kv_empty.index(sl))
                tc += n_iter + 1
            c += n_iter

            has = l_i > 0.0
            l_safe = gl.where(has, l_i, 1.0)
            out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
            offs_m = start_m + gl.arange(0, BM, layout=row_o)
            offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
            o_base = O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh  # > 2**31 elements at video sizes
            ptrs = o_base + gl.expand_dims(offs_m, 1) * stride_os + gl.expand_dims(offs_d, 0)
            gl.store(ptrs, out.to(dtype), mask=gl.expand_dims(offs_m < Sq, 1))
            lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            offs_ms = start_m + gl.arange(0, BM, layout=row_s)
            gl.store(LSE + (b * H + h).to(gl.int64) * Sq + offs_ms, lse, mask=offs_ms < Sq)

    @gluon.jit
    def _bsa_fwd_gluon(q_desc, k_desc, v_desc, ek_desc, ev_desc, O, LSE, KV_IDX, KV_CNT,
                       stride_ob, stride_oh, stride_os,
                       stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                       H, Sq, Sk, T, qk_scale, n_m, num_tiles,
                       BLOCK_SIZE: gl.constexpr, BM: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                       NUM_STAGES: gl.constexpr, EVEN_K: gl.constexpr, HAS_EXTRA: gl.constexpr,
                       PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """Programs stride over the `num_tiles` work items (n_m query tiles x B*H heads, query tile fastest):
        one item each when the grid covers them all, several when the grid is persistent (one program per SM)."""
        N_SUB: gl.constexpr = BLOCK_SIZE // BLOCK_N
        dtype: gl.constexpr = q_desc.dtype
        q_smem0 = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
        q_smem1 = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            mbarrier.init(kv_empty.index(s), count=2)
        for w in gl.static_range(2):
            mbarrier.init(q_bar.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (q_desc, q_smem0, q_bar.index(0), k_smem, v_smem, k_ready, v_ready, kv_empty, turn, O, LSE,
                         num_tiles, n_m, H, Sq, Sk, T, KV_IDX, KV_CNT, stride_ib, stride_ih, stride_ir, stride_cb,
                         stride_ch, stride_ob, stride_oh, stride_os, qk_scale,
                         0, BM, BLOCK_SIZE, N_SUB, BLOCK_N, HEAD_D, NUM_STAGES, EVEN_K, HAS_EXTRA, PINGPONG)),
            (_consumer, (q_desc, q_smem1, q_bar.index(1), k_smem, v_smem, k_ready, v_ready, kv_empty, turn, O, LSE,
                         num_tiles, n_m, H, Sq, Sk, T, KV_IDX, KV_CNT, stride_ib, stride_ih, stride_ir, stride_cb,
                         stride_ch, stride_ob, stride_oh, stride_os, qk_scale,
                         1, BM, BLOCK_SIZE, N_SUB, BLOCK_N, HEAD_D, NUM_STAGES, EVEN_K, HAS_EXTRA, PINGPONG)),
            (_producer, (k_desc, v_desc, ek_desc, ev_desc, k_smem, v_smem, k_ready, v_ready, kv_empty,
                         num_tiles, n_m, H, T, KV_IDX, KV_CNT, stride_ib, stride_ih, stride_ir, stride_cb, stride_ch,
                         BM, BLOCK_SIZE, N_SUB, BLOCK_N, NUM_STAGES, HAS_EXTRA)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ---- host side ---------------------------------------------------------------------------------------------------
@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def _aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                       extra_k: torch.Tensor | None = None, need_lse: bool = False) -> str | None:
    """Why this backend cannot run these inputs (None: it can). lse is always produced, so `need_lse` is free."""
    if GLUON_ERROR is not None:
        return f"Triton's Gluon dialect is not importable ({GLUON_ERROR})"
    if not q.is_cuda:
        return f"needs CUDA tensors, got {q.device}"
    cap = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if cap[0] != 9:
        return f"needs an sm90 (Hopper) GPU (wgmma); this GPU is sm{cap[0]}{cap[1]}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype must be float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
    if block_size != SUPPORTED_BLOCK:
        return f"block_size must be {SUPPORTED_BLOCK}, got {block_size}"
    tensors = [q, k, v] + ([extra_k] if extra_k is not None else [])
    if not all(_aligned(t) for t in tensors):
        return "TMA needs a unit last stride and 16-byte aligned base and strides for q, k, v (and extra keys)"
    return None


def config(d: int, stages: int | None = None, pingpong: bool = True, persistent: bool | int = False) -> dict:
    """Launch table (per head dim): ring depth, ping-pong, register split (consumers 240, producer 24 as in FA3),
    and the grid: one program per work item (`persistent=False`), one per SM (`True`) or at most that many (int)."""
    smem_per_stage = 2 * BLOCK_N * d * 2  # one K and one V tile
    q_bytes = 2 * BM * d * 2
    if stages is None:  # as deep as 227 KB of shared memory allows (less ~2 KB for barriers and reserved), 2..4
        stages = max(2, min(4, (232448 - 2048 - q_bytes) // smem_per_stage))
    return dict(NUM_STAGES=stages, PINGPONG=pingpong, CONSUMER_REGS=240, PRODUCER_REGS=24, PERSISTENT=persistent)


def _desc(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    d = t.shape[-1]
    block = [1, 1, rows, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16 if t.dtype == torch.float16 else gl.bfloat16)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def _row_strides(idx: torch.Tensor) -> tuple[int, int]:
    return (idx.stride(0) if idx.shape[0] > 1 else 0, idx.stride(1) if idx.shape[1] > 1 else 0)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
            block_size: int, scale: float, extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
            cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same inputs and outputs as `triton_fwd.forward` (without the rectification epilogue)."""
    reason = unsupported_reason(q, k, v, block_size, extra_k)
    if reason is not None:
        raise ValueError(f"gluon block-sparse forward: {reason}")
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    out = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if Sq == 0:
        return out, lse
    has_extra = extra_k is not None and extra_k.shape[2] > 0
    T = extra_k.shape[2] if has_extra else 0
    k_desc, v_desc = _desc(k, BLOCK_N), _desc(v, BLOCK_N)
    # no extra keys: no descriptors (None is a constexpr to Triton; each descriptor costs host time per launch)
    ek_desc, ev_desc = (_desc(extra_k, BLOCK_N), _desc(extra_v, BLOCK_N)) if has_extra else (None, None)
    c = dict(config(D)) if cfg is None else dict(cfg)
    persistent = c.pop("PERSISTENT", False)
    n_m = math.ceil(Sq / (2 * BM))
    num_tiles = n_m * B * H
    grid = (min(num_tiles, _num_sms(q.device) if persistent is True else int(persistent or num_tiles)),)
    _bsa_fwd_gluon[grid](
        _desc(q, BM), k_desc, v_desc, ek_desc, ev_desc, out, lse, kv_idx, kv_cnt,
        out.stride(0), out.stride(1), out.stride(2),
        *_row_strides(kv_idx), kv_idx.stride(2), *_row_strides(kv_cnt),
        H, Sq, Sk, T, scale * LOG2E, n_m, num_tiles,
        BLOCK_SIZE=block_size, BM=BM, BLOCK_N=BLOCK_N, HEAD_D=D, EVEN_K=(Sk % block_size == 0),
        HAS_EXTRA=has_extra, num_warps=4, **c,
    )
    return out, lse


def compile_for_sm90(dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, *, even_k: bool = False,
                     has_extra: bool = True, cfg: dict | None = None):
    """Compile the kernel for sm90 without a GPU (CPU-side check of layouts and lowering; ptxas ships with Triton).

    Returns Triton's compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata`)."""
    if GLUON_ERROR is not None:
        raise RuntimeError(f"Triton's Gluon dialect is not importable ({GLUON_ERROR})")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    t = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    idx = torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    cnt = torch.zeros(1, 1, 2, dtype=torch.int32)
    c = dict(config(head_dim)) if cfg is None else dict(cfg)
    c.pop("PERSISTENT", None)  # a launch choice, not a kernel parameter
    args = dict(q_desc=_desc(t, BM), k_desc=_desc(t, BLOCK_N), v_desc=_desc(t, BLOCK_N), O=t, LSE=t.float(),
                KV_IDX=idx, KV_CNT=cnt)
    if has_extra:  # as `forward` launches it: without extra keys their descriptors are None (constexprs)
        args.update(ek_desc=_desc(t, BLOCK_N), ev_desc=_desc(t, BLOCK_N))
    signature = {name: mangle_type(a) for name, a in args.items()}
    for name in ("stride_ob", "stride_oh", "stride_os", "stride_ib", "stride_ih", "stride_ir", "stride_cb",
                 "stride_ch", "H", "Sq", "Sk", "T", "n_m", "num_tiles"):
        signature[name] = "i32"
    signature["qk_scale"] = "fp32"
    constexprs = dict(BLOCK_SIZE=SUPPORTED_BLOCK, BM=BM, BLOCK_N=BLOCK_N, HEAD_D=head_dim, EVEN_K=even_k,
                      HAS_EXTRA=has_extra, **({} if has_extra else dict(ek_desc=None, ev_desc=None)), **c)
    names = list(_bsa_fwd_gluon.arg_names)  # the signature must follow the kernel's parameter order
    assert set(names) == set(signature) | set(constexprs), set(names) ^ (set(signature) | set(constexprs))
    signature = {n: signature.get(n, "constexpr") for n in names}
    src = GluonASTSource(_bsa_fwd_gluon, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


@functools.lru_cache(maxsize=None)
def _layout(rows: int, d: int, half: bool):
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], gl.float16 if half else gl.bfloat16)


class GluonLaunch:
    """The per-specialization part of a Gluon forward, built once per call signature by `prepare` (the front door
    keeps it in its plan): config, grid, strides, the shared layouts and, after the first call, the recorded
    compiled kernel (`kernels.common.RecordedLaunch`); a steady call allocates out/lse, builds the descriptors and
    launches. Only for inputs `unsupported_reason` accepts (the plan key includes the 16-byte alignment)."""

    SLOTS = ("q_desc", "k_desc", "v_desc", "ek_desc", "ev_desc", "O", "LSE", "KV_IDX", "KV_CNT")

    def __init__(self, q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v):
        B, H, Sq, D = q.shape
        Sk = k.shape[2]
        self.out_shape, self.lse_shape, self.dtype, self.device = (B, H, Sq, D), (B, H, Sq), q.dtype, q.device
        self.has_extra = extra_k is not None and extra_k.shape[2] > 0
        T = extra_k.shape[2] if self.has_extra else 0
        half = q.dtype == torch.float16
        self.q_layout, self.kv_layout = _layout(BM, D, half), _layout(BLOCK_N, D, half)
        c = dict(config(D))
        persistent = c.pop("PERSISTENT", False)
        n_m = math.ceil(Sq / (2 * BM))
        num_tiles = n_m * B * H
        self.grid = (min(num_tiles, _num_sms(q.device) if persistent is True else int(persistent or num_tiles)),)
        self.ints = (H * Sq * D, Sq * D, D, *_row_strides(kv_idx), kv_idx.stride(2), *_row_strides(kv_cnt),
                     H, Sq, Sk, T, scale * LOG2E, n_m, num_tiles)
        self.constexprs = dict(BLOCK_SIZE=block_size, BM=BM, BLOCK_N=BLOCK_N, HEAD_D=D, EVEN_K=(Sk % block_size == 0),
                               HAS_EXTRA=self.has_extra, num_warps=4, **c)
        self.empty = Sq == 0
        self.recorded = None
        self.record = True
        self._copy: dict = {}

    def _d(self, t, rows_layout, rows):
        key = (id(rows_layout), rows, t.shape, t.stride())  # q and k/v (and the extra keys) differ in shape
        cp = self._copy.get(key)
        if cp is None:  # built and validated once per shape; later calls copy it with a new base
            d = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]], rows_layout)
            self._copy[key] = DescriptorCopier(d)
            return d
        return cp(t)

    def __call__(self, q, k, v, kv_idx, kv_cnt, extra_k, extra_v):
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        if self.empty:
            return out, lse
        kl = self.kv_layout
        kd, vd = self._d(k, kl, BLOCK_N), self._d(v, kl, BLOCK_N)
        ekd, evd = (self._d(extra_k, kl, BLOCK_N), self._d(extra_v, kl, BLOCK_N)) if self.has_extra else (None, None)
        vals = (self._d(q, self.q_layout, BM), kd, vd, ekd, evd, out, lse, kv_idx, kv_cnt)
        rec = self.recorded
        if rec is not None and replay_allowed(rec.device):
            rec(vals)
            return out, lse
        args = (*vals, *self.ints)
        if self.record:
            dev = q.device.index if q.device.index is not None else torch.cuda.current_device()
            _, rec = RecordedLaunch.record(_bsa_fwd_gluon, self.grid, args, self.constexprs, self.SLOTS, dev)
            self.recorded, self.record = rec, rec is not None
        else:
            _bsa_fwd_gluon[self.grid](*args, **self.constexprs)
        return out, lse


def prepare(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v) -> GluonLaunch:
    """The prepared launch for these inputs' signature (the caller caches it; see `GluonLaunch`)."""
    reason = unsupported_reason(q, k, v, block_size, extra_k)
    if reason is not None:
        raise ValueError(f"gluon block-sparse forward: {reason}")
    return GluonLaunch(q, k, v, kv_idx, kv_cnt, block_size, scale, extra_k, extra_v)
