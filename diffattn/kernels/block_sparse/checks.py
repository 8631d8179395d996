"""Validation of every argument of `block_sparse_attention`, in one place (NATTEN-style).

Each check raises `TypeError` (wrong kind or dtype) or `ValueError` (wrong shape or value) naming the argument and
what is accepted, so callers never reach a kernel with inputs it would silently mis-read.
"""

from __future__ import annotations

import math

import torch

from ..common import (
    check_dtype,
    check_extra_pair,
    check_head_dim,
    check_like_q,
    check_scale,
    check_tensors,
)


def check_block_size(block_size: int) -> None:
    """block_size must be a positive multiple of 16 (64 and 128 are the tuned ones)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0 or block_size % 16 != 0 or block_size > 1024:
        raise ValueError(f"block_size must be a positive multiple of 16 up to 1024 (64 or 128 are fastest), got {block_size}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    backend: str | None = None,
) -> None:
    """Validate all arguments; see `block_sparse_attention` for the accepted forms (the checks both front doors
    share are `kernels.common`'s). The dtype is checked against what any backend takes (float16/bfloat16/float32,
    float64 on the PyTorch ones) unless `backend` names one; which backend takes which dtype is the registry's
    business (`diffattn/kernels/backends.py`)."""
    check_tensors(q=q, k=k, v=v, block_mask=block_mask)
    check_block_size(block_size)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D] (the layout of F.scaled_dot_product_attention), got shape {tuple(t.shape)}")
    check_dtype(q, backend)
    check_like_q(q, k=k, v=v)
    B, H, Sq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"k and v must have q's batch and heads {(B, H)}, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-1] != D:
        raise ValueError(f"k head dim {k.shape[-1]} must equal q head dim {D}")
    if v.shape[-1] != D:
        raise ValueError(f"v head dim {v.shape[-1]} must equal q head dim {D} (different value dims are not supported)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    check_head_dim(D)
    if B == 0 or H == 0:
        raise ValueError(f"q must have a non-empty batch and heads, got shape {tuple(q.shape)}")
    Sk = k.shape[2]
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")
    nq, nk = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
    if block_mask.dim() != 4:
        raise ValueError(f"block_mask must be 4-D [B or 1, H or 1, ceil(Sq/block_size), ceil(Sk/block_size)], got shape {tuple(block_mask.shape)}")
    mb, mh, mq, mk = block_mask.shape
    if mb not in (1, B) or mh not in (1, H) or (mq, mk) != (nq, nk):
        raise ValueError(
            f"block_mask shape must be [{B} or 1, {H} or 1, {nq}, {nk}] for Sq={Sq}, Sk={Sk}, block_size={block_size}, "
            f"got {tuple(block_mask.shape)}"
        )
    check_extra_pair(extra_k, extra_v)
    if extra_k is not None and extra_v is not None:
        for name, t in (("extra_k", extra_k), ("extra_v", extra_v)):
            if t.dim() != 4 or t.shape[:2] != (B, H) or t.shape[-1] != D:
                raise ValueError(f"{name} must be [B={B}, H={H}, T, D={D}], got {tuple(t.shape)}")
        check_like_q(q, extra_k=extra_k, extra_v=extra_v)
        if extra_k.shape[2] != extra_v.shape[2]:
            raise ValueError(f"extra_k and extra_v must have the same length, got {extra_k.shape[2]} and {extra_v.shape[2]}")
    check_scale(scale)


def check_out_affine(
    out_scale: torch.Tensor | None, out_bias: torch.Tensor | None, q: torch.Tensor, block_size: int
) -> None:
    """`out_scale` `[B or 1, H or 1, nq]` and `out_bias` `[B or 1, H or 1, nq, D]` (float tensors on q's device),
    given together or not at all: the per-query-block epilogue `out = scale * attention + bias`."""
    if out_scale is None and out_bias is None:
        return
    if (out_scale is None) != (out_bias is None):
        raise ValueError("out_scale and out_bias must be given together (pass ones / zeros for the one you do not need)")
    B, H, Sq, D = q.shape
    nq = math.ceil(Sq / block_size)
    for name, t, tail in (("out_scale", out_scale, (nq,)), ("out_bias", out_bias, (nq, D))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dim() != 2 + len(tail) or t.shape[0] not in (1, B) or t.shape[1] not in (1, H) or tuple(t.shape[2:]) != tail:
            want = ", ".join(map(str, tail))
            raise ValueError(f"{name} must be [{B} or 1, {H} or 1, {want}] (one row per query block of {block_size}), "
                             f"got {tuple(t.shape)}")
