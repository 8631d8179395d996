"""Rectified SpaAttn's block selection (pooling, pooled map, top-p threshold, k_min floor, forced blocks, GAPR, R, C)
as Triton kernels, with the plain-PyTorch path (`rectified_select_torch`) that is both the reference and the
differentiable/CPU implementation.

Per call (q `[B, H, Sq, D]`, k/v `[B, H, Sk, D]`, block size b, nq/nk blocks, optional text keys `[B, H, T, D]`):

1. `block_pool` (Triton, one program per (block, batch*head)): the mean of each block over its real tokens (a short
   last block is averaged over its n_j tokens) and, for GAPR, the mean absolute deviation from it (a D-vector).
   The block is read once into registers; q, k, v are read once in their own dtype (no float32 copies).
2. Small cuBLAS bmm's in float32: pooled logits `qm km^T`, GAPR's error terms `|dq km^T| + |qm dk^T|`, and the
   text scores `qm ek^T`, `[B*H, nq, nk]` (tens of MiB). They follow PyTorch's global TF32 setting (IEEE by
   default); the flag is not switched here because mixing its legacy and new APIs raises in torch >= 2.9.
3. `_select_rows` (Triton, one program per `BM` query-block rows of one (batch, head), the whole key row in
   registers): `softmax(scale * logit + ln n_j)` with the valid text keys token-level in the same softmax, the text
   mass, the kept set by an exact bisection on the float32 bit pattern of the threshold (32 row reductions in
   registers, no sort; kept = `p >= t` for the smallest t whose mass strictly above is <= tau - text mass, or that
   has fewer than k_min entries above), forced blocks, GAPR's unsafe test, `R = 1 - sum_{compensated} p`, the
   compensated probabilities `pc`, and (one prefix sum of the kept row) the block-sparse forward's index lists of
   the kept set, so that the kernel's front door need not sort the mask again.
4. `C = pc @ vm` (one more bmm).

Floors at Wan2.1-14B 720p (40 heads, 75,600 tokens, D 128, bf16, 591 blocks; H200 4.8 TB/s, ~67 TFLOP/s fp32):
pooling reads q, k, v once: 3 x 75,600 x 40 x 128 x 2 B = 2.32 GB -> 0.48 ms. The pooled maps are
40 x 591 x 591 x 4 B = 56 MB each (logits, err, p, pc: a few hundred MB moved in all, ~0.1 ms); the four bmm's are
4 x 2 x 40 x 591^2 x 128 = 7.2 GFLOP -> ~0.1 ms at fp32 rate. Floor ~0.7 ms, against a ~70 ms sparse kernel (1%).
The bisection is 32 x (compare + two row sums) over 40 x 591 x 1024 registers (~2.5 G simple ops: ~0.1 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import triton_runs_on

__all__ = [
    "POOL_CONFIG",
    "Selection",
    "block_pool",
    "block_pool_torch",
    "rectified_select",
    "rectified_select_torch",
    "sorted_select",
    "threshold_select",
    "triton_select_supported",
]

_F32_INF_BITS = 0x7F800000
MAX_KEY_BLOCKS = 4096  # the Triton row kernel holds a whole key row in registers (next power of two)
MAX_TEXT = 1024


@dataclass
class Selection:
    """One call's selection: kernel mask, GAPR's unsafe blocks, the epilogue's R and C, and the pooled map.

    keep, unsafe: bool `[B, H, nq, nk]`; out_scale (R) float `[B, H, nq]`; out_bias (C) float `[B, H, nq, D]`;
    probs: the pooled map over video key blocks `[B, H, nq, nk]`; text_mass `[B, H, nq]`.
    kv_idx int32 `[B, H, nq, nk]`, kv_cnt int32 `[B, H, nq]`: the forward's index lists of `keep`, exactly as
    `kernels.block_sparse.build_block_index(keep)` makes them (emitted by the Triton row kernel; None from the
    PyTorch path)."""

    keep: torch.Tensor
    unsafe: torch.Tensor
    out_scale: torch.Tensor
    out_bias: torch.Tensor
    probs: torch.Tensor
    text_mass: torch.Tensor
    kv_idx: torch.Tensor | None = None
    kv_cnt: torch.Tensor | None = None


# ---- plain PyTorch ------------------------------------------------------------------------------------------------
def block_counts(n: int, block_size: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """Real tokens per block, `[ceil(n / block_size)]`."""
    nb = math.ceil(n / block_size)
    idx = torch.arange(nb, device=device)
    return torch.clamp(n - idx * block_size, max=block_size).to(dtype)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    B, H, S, D = x.shape
    nb = math.ceil(S / block_size)
    return torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - S)).view(B, H, nb, block_size, D)


def block_pool_torch(x: torch.Tensor, block_size: int, *, with_mad: bool = False, dtype=None):
    """(means, mean absolute deviations or None), `[B, H, nb, D]`, padding excluded, in `dtype` (default float32,
    float64 for float64 input). Differentiable."""
    cdt = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    S = x.shape[2]
    counts = block_counts(S, block_size, x.device, cdt)
    xb = _blocks(x.to(cdt), block_size)
    means = xb.sum(3) / counts[:, None]
    if not with_mad:
        return means, None
    real = (torch.arange(xb.shape[2] * block_size, device=x.device) < S).view(xb.shape[2], block_size, 1)
    mad = ((xb - means[:, :, :, None]).abs() * real).sum(3) / counts[:, None]
    return means, mad


def threshold_select(probs: torch.Tensor, budget: torch.Tensor, k_min: int) -> torch.Tensor:
    """Bool mask of the entries kept per row of non-negative `probs` `[..., n]` (float32), without sorting.

    Entry j is kept when the mass of the entries strictly above it is <= `budget` (per row, `[...]`), or when fewer
    than `k_min` entries are strictly above it. Both tests are monotone in the entry's value, so the kept set is
    `probs >= t` for the smallest float32 t passing either test at t; t is found exactly by bisection over its bit
    pattern (non-negative float32 order equals int32 order), 32 masked row sums. Tied entries are kept together.
    """
    bits = probs.contiguous().view(torch.int32).to(torch.int64)
    lo = torch.full(budget.shape, -1, dtype=torch.int64, device=probs.device)  # the test fails at lo (or lo = -1)
    hi = torch.full(budget.shape, _F32_INF_BITS + 1, dtype=torch.int64, device=probs.device)  # passes (or: keep none)
    for _ in range(32):  # hi - lo <= 2**31 + 2 at the start: 32 halvings reach hi - lo == 1
        mid = (lo + hi) // 2
        above = bits > mid[..., None]
        ok = ((probs * above).sum(-1) <= budget) | (above.sum(-1) < k_min)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return bits >= hi[..., None]


def sorted_select(probs: torch.Tensor, budget: torch.Tensor, k_min: int) -> torch.Tensor:
    """The same kept set as `threshold_select` (distinct values; ties are kept together) from one sort per row."""
    srt = probs.sort(-1, descending=True).values
    before = srt.cumsum(-1) - srt
    n = (before <= budget[..., None]).sum(-1).clamp(min=k_min)
    thr = srt.gather(-1, (n - 1).clamp(min=0)[..., None])
    return (probs >= thr) & (n > 0)[..., None]


def _pooled_scores(qm, km, extra_k, scale):
    logits = torch.matmul(qm, km.transpose(-1, -2))
    st = torch.matmul(qm, extra_k.to(qm.dtype).transpose(-1, -2)) if extra_k is not None else None
    return logits, st


def rectified_select_torch(
    q, k, v, *, block_size, tau, k_min, gapr, extra_k=None, extra_mask=None, forced_blocks=None, scale=None,
    selection="threshold",
) -> Selection:
    """The selection in plain PyTorch, differentiable in q, k, v, extra_k through R and C (float32, or float64 for
    float64 inputs). `selection`: "threshold" (bisection) or "sort" (same kept set)."""
    D, Sk = q.shape[-1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qm, dq = block_pool_torch(q, block_size, with_mad=gapr)
    km, dk = block_pool_torch(k, block_size, with_mad=gapr)
    vm, _ = block_pool_torch(v, block_size)
    ck = block_counts(Sk, block_size, q.device, qm.dtype)
    nk = ck.numel()
    logits, st = _pooled_scores(qm, km, extra_k, scale)
    scores = logits * scale + torch.log(ck)
    if st is not None:
        st = st * scale
        if extra_mask is not None:
            st = st.masked_fill(~extra_mask[:, None, None, :].to(q.device), float("-inf"))
        p = torch.softmax(torch.cat([scores, st], dim=-1), dim=-1)
        probs, text_mass = p[..., :nk], p[..., nk:].sum(-1)
    else:
        probs = torch.softmax(scores, dim=-1)
        text_mass = probs.new_zeros(probs.shape[:-1])
    with torch.no_grad():
        pd = probs.detach().float()
        select = sorted_select if selection == "sort" else threshold_select
        keep = select(pd, float(tau) - text_mass.detach().float(), int(k_min))
        if forced_blocks is not None:
            keep = keep | forced_blocks.to(q.device, torch.bool)
        if gapr:
            err = torch.matmul(dq, km.transpose(-1, -2)).abs() + torch.matmul(qm, dk.transpose(-1, -2)).abs()
            unsafe = (logits.abs() <= err) & ~keep
        else:
            unsafe = torch.zeros_like(keep)
        comp = ~(keep | unsafe)
    pc = probs * comp
    out_scale = 1.0 - pc.sum(-1)
    out_bias = torch.matmul(pc, vm)
    return Selection(keep, unsafe, out_scale, out_bias, probs, text_mass)


# ---- Triton ---------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_select_supported(q: torch.Tensor, nk: int, text: int) -> bool:
    """Whether the Triton selection runs here for these sizes (the row kernel keeps a key row in registers)."""
    return (triton_runs_on(q.device) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and nk <= MAX_KEY_BLOCKS and text <= MAX_TEXT and q.shape[-1] <= 256)


_kernels = None


def _get_kernels():
    """Compile-on-first-use, so importing this module never imports triton (CPU-only installs)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def pool_kernel(
        X, MEAN, MAD, S, nb,
        sxb, sxh, sxs, sxd, H,
        D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, WITH_MAD: tl.constexpr, ROWS: tl.constexpr,
    ):
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        cols = tl.arange(0, BLOCK_D)
        dok = cols < D
        base = X + b * sxb + h * sxh + cols[None, :] * sxd
        n = tl.minimum(S - j * BLOCK, BLOCK).to(tl.float32)
        if ROWS == BLOCK:  # the block in registers once: mean, then deviations from the same registers
            rows = j * BLOCK + tl.arange(0, BLOCK)
            m2 = (rows < S)[:, None] & dok[None, :]
            x = tl.load(base + rows[:, None] * sxs, mask=m2, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / n
            if WITH_MAD:
                mad = tl.sum(tl.where(m2, tl.abs(x - mean[None, :]), 0.0), axis=0) / n
        else:  # ROWS-row chunks (fewer registers, more programs resident); deviations re-read the block (L2)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for r0 in tl.static_range(0, BLOCK, ROWS):
                rows = j * BLOCK + r0 + tl.arange(0, ROWS)
                m2 = (rows < S)[:, None] & dok[None, :]
                acc += tl.sum(tl.load(base + rows[:, None] * sxs, mask=m2, other=0.0).to(tl.float32), axis=0)
            mean = acc / n
            if WITH_MAD:
                dacc = tl.zeros([BLOCK_D], dtype=tl.float32)
                for r0 in tl.static_range(0, BLOCK, ROWS):
                    rows = j * BLOCK + r0 + tl.arange(0, ROWS)
                    m2 = (rows < S)[:, None] & dok[None, :]
                    x = tl.load(base + rows[:, None] * sxs, mask=m2, other=0.0).to(tl.float32)
                    dacc += tl.sum(tl.where(m2, tl.abs(x - mean[None, :]), 0.0), axis=0)
                mad = dacc / n
        tl.store(MEAN + (bh * nb + j) * D + cols, mean, mask=dok)
        if WITH_MAD:
            tl.store(MAD + (bh * nb + j) * D + cols, mad, mask=dok)

    @triton.jit
    def select_kernel(
        LOGIT, ERR, TS, TVALID, FORCED, KEEP, UNSAFE, P, PC, R, TMASS, KVIDX, KVCNT,
        nq, nk, T, Sk, H, scale, tau, k_min,
        sfb, sfh, sfq, sfk,
        BM: tl.constexpr, NKP: tl.constexpr, TP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_TEXT: tl.constexpr, HAS_FORCED: tl.constexpr, GAPR: tl.constexpr, EMIT_INDEX: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid * BM + tl.arange(0, BM)
        cols = tl.arange(0, NKP)
        rok = rows < nq
        cok = cols < nk
        m2 = rok[:, None] & cok[None, :]
        off = (bh * nq + rows[:, None]) * nk + cols[None, :]
        logit = tl.load(LOGIT + off, mask=m2, other=0.0)
        n_j = tl.minimum(Sk - cols * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
        s = logit * scale + tl.log(tl.maximum(n_j, 1.0))[None, :]
        s = tl.where(m2, s, float("-inf"))
        m = tl.max(s, axis=1)
        if HAS_TEXT:
            tc = tl.arange(0, TP)
            tvalid = tl.load(TVALID + b * T + tc, mask=tc < T, other=0) != 0
            t2 = rok[:, None] & tvalid[None, :]
            st = tl.load(TS + (bh * nq + rows[:, None]) * T + tc[None, :], mask=t2, other=0.0) * scale
            st = tl.where(t2, st, float("-inf"))
            m = tl.maximum(m, tl.max(st, axis=1))
        m = tl.where(rok, m, 0.0)
        e = tl.where(m2, tl.exp(s - m[:, None]), 0.0)
        z = tl.sum(e, axis=1)
        if HAS_TEXT:
            et = tl.where(t2, tl.exp(st - m[:, None]), 0.0)
            zt = tl.sum(et, axis=1)
            z = z + zt
        z = tl.where(rok, z, 1.0)
        p = e / z[:, None]
        if HAS_TEXT:
            tmass = zt / z
        else:
            tmass = tl.zeros([BM], dtype=tl.float32)
        budget = tau - tmass
        # exact threshold by bisection over the float32 bit pattern (non-negative floats order like int32)
        bits = tl.where(m2, p.to(tl.int32, bitcast=True), -1)
        lo = tl.full([BM], -1, dtype=tl.int32)
        hi = tl.full([BM], 0x7F800001, dtype=tl.int32)
        for _ in range(32):
            mid = (lo + hi) >> 1
            above = bits > mid[:, None]
            mass = tl.sum(tl.where(above, p, 0.0), axis=1)
            cnt = tl.sum(above.to(tl.int32), axis=1)
            ok = (mass <= budget) | (cnt < k_min)
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        keep = (bits >= hi[:, None]) & m2
        if HAS_FORCED:
            fo = tl.load(FORCED + b * sfb + h * sfh + rows[:, None] * sfq + cols[None, :] * sfk, mask=m2, other=0)
            keep = keep | (fo != 0)
        if GAPR:
            err = tl.load(ERR + off, mask=m2, other=0.0)
            unsafe = (tl.abs(logit) <= err) & m2 & (~keep)
        else:
            unsafe = tl.zeros([BM, NKP], dtype=tl.int1)
        comp = m2 & (~keep) & (~unsafe)
        pc = tl.where(comp, p, 0.0)
        tl.store(KEEP + off, keep.to(tl.int8), mask=m2)
        tl.store(UNSAFE + off, unsafe.to(tl.int8), mask=m2)
        tl.store(P + off, p, mask=m2)
        tl.store(PC + off, pc, mask=m2)
        tl.store(R + bh * nq + rows, 1.0 - tl.sum(pc, axis=1), mask=rok)
        tl.store(TMASS + bh * nq + rows, tmass, mask=rok)
        if EMIT_INDEX:
            # the block-sparse kernels' padded CSR row (`kernels.block_sparse.index`): kept columns ascending, then
            # the others ascending, i.e. the stable sort of ~keep, from one prefix sum of the row in registers
            ki = keep.to(tl.int32)
            csum = tl.cumsum(ki, axis=1)
            cnt = tl.sum(ki, axis=1)
            pos = tl.where(keep, csum - 1, cnt[:, None] + cols[None, :] - csum)
            colv = tl.zeros([BM, NKP], dtype=tl.int32) + cols[None, :]
            tl.store(KVIDX + (bh * nq + rows[:, None]) * nk + pos, colv, mask=m2)
            tl.store(KVCNT + bh * nq + rows, cnt, mask=rok)

    _kernels = (pool_kernel, select_kernel)
    return _kernels


POOL_CONFIG: dict[str, int] = {"rows": 0, "num_warps": 0}  # 0: the defaults below (bench override)


def block_pool(x: torch.Tensor, block_size: int, *, with_mad: bool = False, rows: int | None = None,
               num_warps: int | None = None):
    """Triton `block_pool_torch` (float32 out; any strides, read once in x's dtype; the deviations re-read the
    block from L2 when `rows` < block_size)."""
    pool_kernel, _ = _get_kernels()
    B, H, S, D = x.shape
    nb = math.ceil(S / block_size)
    mean = torch.empty((B, H, nb, D), dtype=torch.float32, device=x.device)
    mad = torch.empty_like(mean) if with_mad else mean
    if nb and B * H:
        block_d = _next_pow2(D)
        rows = rows or POOL_CONFIG["rows"] or block_size
        rows = min(block_size, rows)
        warps = num_warps or POOL_CONFIG["num_warps"] or (8 if rows * block_d >= 8192 else 4)
        pool_kernel[(nb, B * H)](
            x, mean, mad, S, nb, *x.stride(), H,
            D=D, BLOCK=block_size, BLOCK_D=block_d, WITH_MAD=with_mad, ROWS=rows, num_warps=warps,
        )
    return mean, (mad if with_mad else None)


def _rows_per_program(nkp: int) -> int:
    return max(1, min(16, 4096 // nkp))


def rectified_select(
    q, k, v, *, block_size, tau, k_min, gapr, extra_k=None, extra_mask=None, forced_blocks=None, scale=None,
    emit_index: bool = True,
) -> Selection:
    """The selection with the Triton kernels (see the module docstring); same outputs as `rectified_select_torch`
    (R and C float32), not differentiable. Needs `triton_select_supported`. With `emit_index` the row kernel also
    writes the forward's index lists of the kept set (`Selection.kv_idx`, `kv_cnt`), which would otherwise take
    a sort of the whole mask."""
    _, select_kernel = _get_kernels()
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    qm, dq = block_pool(q, block_size, with_mad=gapr)
    km, dk = block_pool(k, block_size, with_mad=gapr)
    vm, _ = block_pool(v, block_size)
    nq, nk = qm.shape[2], km.shape[2]
    T = extra_k.shape[2] if extra_k is not None else 0
    logits = torch.matmul(qm, km.transpose(-1, -2))
    err = None
    if gapr:
        err = torch.matmul(dq, km.transpose(-1, -2)).abs_().add_(torch.matmul(qm, dk.transpose(-1, -2)).abs_())
    ts = torch.matmul(qm, extra_k.float().transpose(-1, -2)).contiguous() if T else None
    if T:
        tvalid = (extra_mask.to(dev) if extra_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev))
        tvalid = tvalid.to(torch.int8).contiguous()
    else:
        tvalid = None
    if forced_blocks is not None:
        fb = forced_blocks.to(dev, torch.bool)
        while fb.dim() < 4:
            fb = fb[None]
        fb = fb.expand(B, H, nq, nk).to(torch.int8)
        fstr = [fb.stride(i) if fb.shape[i] > 1 else 0 for i in range(4)]
    else:
        fb, fstr = None, [0, 0, 0, 0]
    keep = torch.empty((B, H, nq, nk), dtype=torch.int8, device=dev)
    unsafe = torch.empty_like(keep)
    probs = torch.empty((B, H, nq, nk), dtype=torch.float32, device=dev)
    pc = torch.empty_like(probs)
    r = torch.empty((B, H, nq), dtype=torch.float32, device=dev)
    tmass = torch.empty_like(r)
    kv_idx = torch.empty((B, H, nq, nk), dtype=torch.int32, device=dev) if emit_index else None
    kv_cnt = torch.empty((B, H, nq), dtype=torch.int32, device=dev) if emit_index else None
    if emit_index and not (nq and nk and B * H):
        kv_idx.zero_()
        kv_cnt.zero_()
    if nq and nk and B * H:
        nkp = _next_pow2(nk)
        bm = _rows_per_program(nkp)
        select_kernel[(-(-nq // bm), B * H)](
            logits, err if err is not None else logits, ts if ts is not None else logits,
            tvalid if tvalid is not None else keep, fb if fb is not None else keep,
            keep, unsafe, probs, pc, r, tmass,
            kv_idx if emit_index else r, kv_cnt if emit_index else r,
            nq, nk, T, Sk, H, scale, float(tau), int(k_min), *fstr,
            BM=bm, NKP=nkp, TP=_next_pow2(max(T, 1)), BLOCK_SIZE=block_size,
            HAS_TEXT=T > 0, HAS_FORCED=fb is not None, GAPR=gapr, EMIT_INDEX=emit_index,
            num_warps=8 if nkp * bm >= 4096 else 4,
        )
    out_bias = torch.matmul(pc, vm)
    return Selection(keep.view(torch.bool), unsafe.view(torch.bool), r, out_bias, probs, tmass, kv_idx, kv_cnt)
