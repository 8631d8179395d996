"""Where the adapters call the fused pre-attention prologue (`diffattn.kernels.qk_norm_rope`): which stock norm
modules it reproduces, with which rounding, and when it must not run.

The kernel runs only where it is a drop-in: CUDA half-precision inputs, an `RMSNorm` whose weight has the input's
dtype (or none), a power-of-two head dim, no autograd, and not switched off with `DIFFATTN_PROLOGUE_BACKEND=reference`.
Everywhere else the adapters run the stock op sequence, so float32 and CPU runs stay bit-identical to stock.
"""

from __future__ import annotations

import torch

from ..kernels.prologue import fused_supported, fused_supported_device, qk_norm_rope


def _norm_params(norm: torch.nn.Module | None) -> tuple[torch.Tensor | None, float, bool] | None:
    """(weight, eps, round_before_weight) of a stock q/k norm the kernel reproduces, else None."""
    if norm is None:
        return None
    if type(norm) is torch.nn.RMSNorm:
        # CUDA's fused rms_norm computes x * rstd * w in float32 and rounds once
        if norm.eps is None:
            return None
        return norm.weight, float(norm.eps), False
    from diffusers.models.normalization import RMSNorm

    if type(norm) is RMSNorm and getattr(norm, "bias", None) is None:
        # Diffusers' RMSNorm rounds x * rstd to a half-precision weight's dtype before multiplying
        return norm.weight, float(norm.eps), True
    return None


def may_fuse(x: torch.Tensor) -> bool:
    """A cheap test on a projection's input (device, dtype) before projecting: False means the stock path."""
    return fused_supported_device(x)


def can_fuse(norm: torch.nn.Module | None, x: torch.Tensor, heads: int, mode: str,
             cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> bool:
    """Whether `fused_norm_rope` reproduces `norm` (+ RoPE) on `x` here; callers with several projections ask for
    all of them first, so one call never mixes the fused and the stock path."""
    params = _norm_params(norm)
    if params is None:
        return False
    weight = params[0]
    if mode == "head" and weight is not None and weight.shape[0] * heads != x.shape[-1]:
        return False
    if cos is not None and (cos.dtype != torch.float32 or sin is None or sin.dtype != torch.float32):
        return False  # the stock RoPE computes in the tables' dtype; the kernel in float32
    return fused_supported(x, weight, heads)


def fused_norm_rope(
    norm: torch.nn.Module | None,
    x: torch.Tensor,
    heads: int,
    mode: str,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_offset: int = 0,
) -> torch.Tensor:
    """`norm(x)` (across heads or per head, `mode`), RoPE with `cos`/`sin` on the first `cos.shape[0]` tokens and the
    `[B, H, S, D]` layout in one pass (into `out` at `out_offset` when given). Check `can_fuse` first."""
    weight, eps, round_w = _norm_params(norm)
    return qk_norm_rope(x, weight, heads=heads, eps=eps, norm=mode, cos=cos, sin=sin, round_before_weight=round_w,
                        out=out, out_offset=out_offset)
