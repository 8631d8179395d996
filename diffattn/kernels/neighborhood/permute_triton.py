"""Token permutation for the block-sparse lowering as one Triton row gather per tensor (forward only).

Why: the torch permute copies of `lowering.permute_rows` / `unpermute_rows` measured 2.12 ms (FLUX-4K) and 4.63 ms
(HunyuanVideo) for q, k, v in and the output back on the H200 (round 1): ~1.5 TB/s, a third of the copy bandwidth
(4.2 TB/s; floor 0.76 / 1.33 ms). The permutation is a gather of whole token rows (H*D elements), so one kernel that
reads a [rows, heads, D] block through a precomputed row table and writes it contiguously runs at copy speed.

`gather_rows(src, table, ...)`: dst[b, r] = src row `table[r]` of batch b (zeros where the table says -1), with the
source addressed by strides (batch, group, token, head), so the same kernel permutes `[B, *spatial, H, D]` inputs
into token-major tile order and un-permutes a `[B*G, H, N_pad, D]` output of any block-sparse backend (token-major
FA4 memory or head-major Gluon/Triton memory). Not differentiable: the lowering uses it only without autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src, dst, table, R, NP, H, stride_b, stride_g, stride_n, stride_h,
                        BR: tl.constexpr, BH: tl.constexpr, D: tl.constexpr):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2)
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < R
    j = tl.load(table + rows, mask=rmask, other=-1)
    valid = (j >= 0) & rmask
    jj = tl.where(valid, j, 0).to(tl.int64)
    src_row = b * stride_b + (jj // NP) * stride_g + (jj % NP) * stride_n  # [BR]
    hs = pid_h * BH + tl.arange(0, BH)
    hmask = hs < H
    d = tl.arange(0, D)
    src_off = src_row[:, None, None] + (hs.to(tl.int64) * stride_h)[None, :, None] + d[None, None, :]
    lmask = valid[:, None, None] & hmask[None, :, None]
    x = tl.load(src + src_off, mask=lmask, other=0.0)
    dst_row = (b * R + rows.to(tl.int64)) * (H * D)
    dst_off = dst_row[:, None, None] + (hs * D)[None, :, None] + d[None, None, :]
    tl.store(dst + dst_off, x, mask=rmask[:, None, None] & hmask[None, :, None])


def gather_rows(src: torch.Tensor, table: torch.Tensor, batch: int, heads: int, head_dim: int, np_: int,
                stride_b: int, stride_g: int, stride_n: int, stride_h: int) -> torch.Tensor:
    """`[batch, R, heads, head_dim]` contiguous: row r of batch b is the source row `table[r]` = (g, n) with
    g = table[r] // np_, n = table[r] % np_ (element (h, d) at b*stride_b + g*stride_g + n*stride_n + h*stride_h + d),
    zeros where table[r] < 0."""
    R = table.numel()
    dst = torch.empty(batch, R, heads, head_dim, dtype=src.dtype, device=src.device)
    if R == 0 or batch == 0:
        return dst
    BH = min(triton.next_power_of_2(heads), max(1, 4096 // head_dim))
    BR = max(1, 8192 // (BH * head_dim))
    grid = (triton.cdiv(R, BR), batch, triton.cdiv(heads, BH))
    _gather_rows_kernel[grid](src, dst, table, R, np_, heads, stride_b, stride_g, stride_n, stride_h,
                              BR=BR, BH=BH, D=head_dim, num_warps=4)
    return dst


def token_stride(x: torch.Tensor) -> int | None:
    """For `[B, *spatial, H, D]`: the one stride of its tokens in row-major order when the spatial axes collapse, the
    d stride is 1, the heads' rows are 16-byte aligned and the head dim is a power of two >= 16 (what
    `gather_rows` addresses); None otherwise (the caller uses the torch copies)."""
    d = x.shape[-1]
    if x.stride(-1) != 1 or d & (d - 1) or d < 16 or (x.stride(-2) * x.element_size()) % 16:
        return None
    axes = [i for i in range(1, x.dim() - 2) if x.shape[i] > 1]
    for a, b in zip(axes, axes[1:]):
        if x.stride(a) != x.stride(b) * x.shape[b]:
            return None
    return x.stride(axes[-1]) if axes else 0
