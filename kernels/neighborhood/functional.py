"""Front door: `neighborhood_attention` validates once, picks the backend, and wires autograd."""

from __future__ import annotations

import logging
import os

import torch

from .checks import check_qkv, normalize_params, spatial_shape
from .reference import neighborhood_attention_reference
from .tiling import Plan, choose_tiles, make_plan

logger = logging.getLogger("diffattn")

BACKENDS = ("triton", "reference")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreting()


def get_plan(shape, kernel_size, stride, dilation, is_causal, q_tile=None, kv_tile=None) -> Plan:
    """The tile plan the kernel will use (tiles chosen by simulated cost unless given)."""
    p = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    if q_tile is None or kv_tile is None:
        cq, ck = choose_tiles(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
        q_tile = cq if q_tile is None else q_tile
        kv_tile = ck if kv_tile is None else kv_tile
    q_tile, kv_tile = tuple(int(t) for t in q_tile), tuple(int(t) for t in kv_tile)
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        n = 1
        for x in t:
            n *= x
        if len(t) != p.ndim or any(x < 1 or x & (x - 1) for x in t) or n < 16:
            raise ValueError(f"{name} must be {p.ndim} powers of two with a product >= 16, got {t}")
    return make_plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, q_tile, kv_tile)


class _NAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ek, ev, plan: Plan, scale: float, need_lse: bool):
        from .triton_fwd import na_forward

        out, lse = na_forward(q, k, v, plan, scale, ek, ev, need_lse=True)
        ctx.save_for_backward(q, k, v, ek, ev, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, ek, ev, out, lse = ctx.saved_tensors
        plan: Plan = ctx.plan
        from .triton_bwd import na_backward

        dq, dk, dv, dek, dev = na_backward(q, k, v, ek, ev, out, lse, d_out, d_lse, plan, ctx.scale)
        return dq, dk, dv, dek, dev, None, None, None


def neighborhood_attention(
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
    backend: str | None = None,
    q_tile=None,
    kv_tile=None,
):
    """Generalized neighborhood attention with NATTEN's semantics and layout.

    q, k, v: `[B, *spatial, H, D]` with 1 to 3 spatial axes (fp16, bf16 or fp32; head dim <= 256).
    kernel_size, stride, dilation: an int or one int per axis (kernel_size -1 = the whole axis);
    is_causal: a bool or one per axis. extra_k/extra_v `[B, T, H, D]`: keys every query attends (text tokens).
    Returns the output `[B, *spatial, H, D]`, and with `return_lse` also the natural-log log-sum-exp,
    float32 `[B, *spatial, H]`. Differentiable (Triton backward).

    backend: None (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; otherwise the reference), "triton" or
    "reference" (dense-mask PyTorch, small problems only). q_tile/kv_tile: override the tile shapes (powers of two).
    """
    check_qkv(q, k, v, extra_k, extra_v, scale)
    shape = spatial_shape(q)
    params = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        backend = "triton" if _triton_ok(q.device) else "reference"
    if backend == "reference":
        return neighborhood_attention_reference(
            q, k, v, params.kernel_size, params.stride, params.dilation, params.is_causal,
            scale=scale, extra_k=extra_k, extra_v=extra_v, return_lse=return_lse)
    if not _triton_ok(q.device):
        raise ValueError(f"backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got device {q.device}")
    if extra_k is not None and extra_k.shape[1] == 0:
        extra_k = extra_v = None
    plan = get_plan(shape, params.kernel_size, params.stride, params.dilation, params.is_causal, q_tile, kv_tile)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    if extra_k is not None:
        assert extra_v is not None
        if extra_k.stride(-1) != 1 or extra_k.stride() != extra_v.stride():
            extra_k, extra_v = extra_k.contiguous(), extra_v.contiguous()
    out, lse = _NAFunction.apply(q, k, v, extra_k, extra_v, plan, scale, return_lse)
    return (out, lse) if return_lse else out
