"""Plain-PyTorch neighborhood attention: the ground truth the Triton kernel is tested against.

Written directly from NATTEN's window formulas, one query at a time per axis, deliberately independent of the
tiling code the kernel and the simulator share (`tiling.py`). It builds a dense `[N, N]` boolean mask, so it is
for small problems (tests, CPU) only.
"""

from __future__ import annotations

import math

import torch

from .checks import check_qkv, normalize_params, spatial_shape


def axis_mask(length: int, kernel_size: int, stride: int, dilation: int, causal: bool) -> torch.Tensor:
    """Boolean `[length, length]`: entry (i, j) is True when query i attends key j along this axis.

    Per NATTEN: dilation splits the axis into groups by coordinate mod dilation; inside a group (local index x,
    group length Lg) non-causal queries share the window of their stride group's leader
    g = min(x//s*s + s//2, Lg-1), starting at clamp(g - K//2, 0, Lg - K), K keys long.
    Causal: g = min(x//s*s + s-1, Lg-1), keys [max(g-K+1, 0), x].
    """
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        grp = i % dilation
        x = i // dilation
        group_len = len(range(grp, length, dilation))
        if causal:
            leader = min(x // stride * stride + stride - 1, group_len - 1)
            lo, hi = max(leader - kernel_size + 1, 0), x + 1
        else:
            leader = min(x // stride * stride + stride // 2, group_len - 1)
            lo = min(max(leader - kernel_size // 2, 0), group_len - kernel_size)
            hi = lo + kernel_size
        for xk in range(lo, hi):
            mask[i, xk * dilation + grp] = True
    return mask


def neighborhood_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> torch.Tensor:
    """Boolean `[N, N]` mask over row-major flattened tokens: the AND of the per-axis masks."""
    p = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    full = torch.ones(1, 1, dtype=torch.bool)
    for i in range(p.ndim):
        m = axis_mask(p.shape[i], p.kernel_size[i], p.stride[i], p.dilation[i], p.is_causal[i])
        n_prev = full.shape[0]
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(n_prev * m.shape[0], n_prev * m.shape[1])
    return full


def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    *,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Reference forward (differentiable through autograd). Same signature and layout as `neighborhood_attention`.

    Computes in float32 (float64 if the inputs are float64) and returns the output in q's dtype; lse is natural-log
    float32 `[B, *spatial, H]`.
    """
    if q.dtype != torch.float64:
        check_qkv(q, k, v, extra_k, extra_v, scale)
    spatial = spatial_shape(q)
    mask = neighborhood_mask(spatial, kernel_size, stride, dilation, is_causal).to(q.device)
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    n = math.prod(spatial)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5 if scale is None else float(scale)

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, h, d).transpose(1, 2).to(cdt)

    qf, kf, vf = heads_first(q), heads_first(k), heads_first(v)
    if extra_k is not None:
        kf = torch.cat([kf, heads_first(extra_k)], dim=2)
        vf = torch.cat([vf, heads_first(extra_v)], dim=2)
        mask = torch.cat([mask, torch.ones(n, extra_k.shape[1], dtype=torch.bool, device=mask.device)], dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, N]
    out = torch.softmax(scores, dim=-1) @ vf  # [B, H, N, D]
    out = out.transpose(1, 2).reshape(q.shape).to(q.dtype)
    if return_lse:
        return out, lse.transpose(1, 2).reshape(b, *spatial, h).float()
    return out
