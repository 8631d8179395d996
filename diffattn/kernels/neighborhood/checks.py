"""Argument validation for neighborhood attention, in one place (NATTEN's `utils/checks.py` plays this role).

Every public entry point (`neighborhood_attention`, the reference, the simulator) goes through
`normalize_params`, so a bad argument gets the same clear error everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]

from ..common import (
    check_dtype,
    check_extra_pair,
    check_head_dim,
    check_like_q,
    check_scale,
    check_tensors,
)

__all__ = ["NAParams", "check_qkv", "normalize_params", "spatial_shape"]


@dataclass(frozen=True)
class NAParams:
    """Per-axis neighborhood parameters after validation (all tuples have one entry per spatial axis)."""

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _per_axis(value: object, ndim: int, name: str, kind: type) -> tuple:
    if isinstance(value, bool) and kind is int:
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got a bool")
    if isinstance(value, kind):
        return (value,) * ndim
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{name} must have one entry per spatial axis ({ndim}), got {len(value)}: {value!r}")
        for v in value:
            ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
            if not ok:
                raise TypeError(f"{name} entries must be {kind.__name__}, got {v!r} in {value!r}")
        return tuple(value)
    raise TypeError(f"{name} must be a {kind.__name__} or a tuple of {ndim} {kind.__name__}s, got {type(value).__name__}")


def normalize_params(
    shape: Sequence[int],
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
) -> NAParams:
    """Validate and expand the neighborhood parameters for a spatial `shape` (1 to 3 axes).

    `kernel_size` may be -1 on an axis, meaning the whole axis (as in NATTEN/Cosmos configs).
    Limits (per axis): 1 <= kernel_size, kernel_size * dilation <= size, 1 <= stride <= kernel_size, dilation >= 1.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if not 1 <= ndim <= 3:
        raise ValueError(f"neighborhood attention supports 1 to 3 spatial axes, got {ndim} (shape {shape})")
    if any(s < 1 for s in shape):
        raise ValueError(f"spatial sizes must be >= 1, got {shape}")
    ks = _per_axis(kernel_size, ndim, "kernel_size", int)
    st = _per_axis(stride, ndim, "stride", int)
    dl = _per_axis(dilation, ndim, "dilation", int)
    ca = _per_axis(is_causal, ndim, "is_causal", bool)
    for i, d in enumerate(dl):
        if d < 1:
            raise ValueError(f"dilation must be >= 1 on every axis, got {dl}")
    ks = tuple(shape[i] // dl[i] if k == -1 else k for i, k in enumerate(ks))
    for i in range(ndim):
        if ks[i] < 1:
            raise ValueError(f"kernel_size must be >= 1 (or -1 for the whole axis) on every axis, got {ks}")
        if ks[i] * dl[i] > shape[i]:
            raise ValueError(
                f"kernel_size * dilation must be <= the spatial size on every axis; axis {i}: "
                f"{ks[i]} * {dl[i]} > {shape[i]} (shape {shape})"
            )
        if not 1 <= st[i] <= ks[i]:
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size on every axis; axis {i}: "
                             f"stride {st[i]}, kernel_size {ks[i]}")
    return NAParams(shape, ks, st, dl, ca)


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    scale: float | None,
    backend: str | None = None,
) -> None:
    """Check layouts `[B, *spatial, H, D]` (1-3 spatial axes), dtypes (those of `backend`; float64 only on the
    PyTorch backends), devices, head dim and the extra keys (the checks both front doors share are
    `kernels.common`'s)."""
    check_tensors(q=q, k=k, v=v)
    if not 4 <= q.dim() <= 6:
        raise ValueError(f"q must be [B, *spatial, H, D] with 1 to 3 spatial axes (4 to 6 dims), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, *spatial, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_dtype(q, backend)
    check_like_q(q, k=k, v=v)
    check_head_dim(q.shape[-1])
    if q.shape[0] < 1 or q.shape[-2] < 1:
        raise ValueError(f"batch and heads must be >= 1, got shape {tuple(q.shape)}")
    check_scale(scale)
    check_extra_pair(extra_k, extra_v)
    if extra_k is not None:
        assert extra_v is not None
        b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
        for name, t in (("extra_k", extra_k), ("extra_v", extra_v)):
            if t.dim() != 4 or t.shape[0] != b or t.shape[2] != h or t.shape[3] != d:
                raise ValueError(f"{name} must be [B, T, H, D] = [{b}, T, {h}, {d}], got {tuple(t.shape)}")
        check_like_q(q, extra_k=extra_k, extra_v=extra_v)
        if extra_k.shape != extra_v.shape:
            raise ValueError(f"extra_k and extra_v must have the same shape, got {tuple(extra_k.shape)} and {tuple(extra_v.shape)}")


def spatial_shape(q: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a `[B, *spatial, H, D]` tensor."""
    return tuple(q.shape[1:-2])
