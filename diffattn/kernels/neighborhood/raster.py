"""Neighborhood attention on raster-ordered tokens in SDPA's layout: what methods hold (`[B, H, S, D]` with the
visual tokens in (frame, row, column) order) mapped to NATTEN's layout `[B, *shape, H, D]` and back."""

from __future__ import annotations

from typing import Any

import torch

from .functional import neighborhood_attention

__all__ = ["grid_neighborhood_attention"]


def grid_neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: tuple[int, ...],
    kernel_size: Any,
    stride: Any = 1,
    dilation: Any = 1,
    is_causal: Any = False,
    *,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Neighborhood attention of raster-ordered tokens `[B, H, S, D]` over the token grid `shape` (S = prod(shape)):
    the layout change to NATTEN's `[B, *shape, H, D]` and back, text keys `[B, H, T, D]` as extra keys."""
    b, h, _, d = q.shape

    def to_grid(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], h, *shape, d).movedim(1, -2)

    ek = None if extra_k is None else extra_k.transpose(1, 2)
    ev = None if extra_v is None else extra_v.transpose(1, 2)
    out = neighborhood_attention(
        to_grid(q), to_grid(k), to_grid(v), kernel_size, stride, dilation, is_causal, scale=scale, extra_k=ek, extra_v=ev
    )
    return out.movedim(-2, 1).reshape(q.shape)
