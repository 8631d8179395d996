"""The fused prologue kernel: one program per token row reads the row's `H*D` projections once, normalises them
(across heads or per head), applies the weight and the interleaved RoPE in float32, and writes the row into the
heads-first `[B, H, S, D]` output (at a sequence offset, so joint sequences are assembled in place).

Memory-bound: one read of `x` (plus the row's cos/sin) and one write per element; the stock path makes about eight
passes (norm, unflatten copy, four RoPE element-wise ops with float32 temporaries, two strided writes).
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_CODES = {"none": 0, "across": 1, "head": 2}


@triton.jit
def _prologue_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    S, H, n_rope, out_offset,
    stride_xb, stride_xs,
    stride_ob, stride_oh, stride_os,
    n_norm, eps,
    D: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, ROUND_W: tl.constexpr,
    ROPE: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row - b * S
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    hmask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + offs_h[:, None] * D + offs_d[None, :]
    xin = tl.load(x_ptrs, mask=hmask, other=0.0)
    x = xin.to(tl.float32)
    if NORM == 1:
        ss = tl.sum(tl.sum(x * x, axis=1), axis=0)
        y = x * (1.0 / tl.sqrt(ss / n_norm + eps))
    elif NORM == 2:
        ss = tl.sum(x * x, axis=1)
        y = x * (1.0 / tl.sqrt(ss / n_norm + eps))[:, None]
    else:
        y = x
    if HAS_W:
        if NORM == 1:
            w = tl.load(w_ptr + offs_h[:, None] * D + offs_d[None, :], mask=hmask, other=0.0).to(tl.float32)
        else:
            w = tl.load(w_ptr + offs_d).to(tl.float32)[None, :]
        if ROUND_W:
            y = y.to(xin.dtype).to(tl.float32) * w
        else:
            y = y * w
    y = y.to(xin.dtype)
    if ROPE:
        yf = y.to(tl.float32)
        rmask = (offs_d * 0 + s) < n_rope  # rows past the tables: cos 1, sin 0 (no rotation)
        cs = tl.load(cos_ptr + s.to(tl.int64) * D + offs_d, mask=rmask, other=1.0)
        sn = tl.load(sin_ptr + s.to(tl.int64) * D + offs_d, mask=rmask, other=0.0)
        ye, yo = tl.split(tl.reshape(yf, [BLOCK_H, D // 2, 2]))
        ce, co = tl.split(tl.reshape(cs, [D // 2, 2]))
        se, so = tl.split(tl.reshape(sn, [D // 2, 2]))
        oe = ye * ce[None, :] - yo * se[None, :]
        oo = yo * co[None, :] + ye * so[None, :]
        y = tl.reshape(tl.join(oe, oo), [BLOCK_H, D]).to(xin.dtype)
    o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + offs_h[:, None].to(tl.int64) * stride_oh
              + (out_offset + s).to(tl.int64) * stride_os + offs_d[None, :])
    tl.store(o_ptrs, y, mask=hmask)


def launch(x, weight, cos, sin, out, out_offset: int, heads: int, eps: float, norm: str, round_before_weight: bool):
    """Run the kernel; arguments are already validated by the front door (`x` `[B, S, H*D]` with unit last
    stride, `out` `[B, H, S_total, D]` with unit last stride, cos/sin float32 `[S_rope, D]` contiguous)."""
    B, S, inner = x.shape
    D = inner // heads
    block_h = triton.next_power_of_2(heads)
    n_norm = float(inner if norm == "across" else D)
    rope = cos is not None
    dummy = x
    _prologue_kernel[(B * S,)](
        x, weight if weight is not None else dummy, cos if rope else dummy, sin if rope else dummy, out,
        S, heads, cos.shape[0] if rope else 0, out_offset,
        x.stride(0), x.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        n_norm, eps,
        D=D, BLOCK_H=block_h, NORM=NORM_CODES[norm], HAS_W=weight is not None, ROUND_W=round_before_weight,
        ROPE=rope, num_warps=8 if block_h * D >= 4096 else 4,
    )
