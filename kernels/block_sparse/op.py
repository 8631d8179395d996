"""Front door: validation, backend choice, and the torch.library custom ops (forward, backward, autograd).

Backends (`kernels.common`, the same vocabulary as `neighborhood_attention`):
- None (default): "triton" where it runs (CUDA tensors, or CPU tensors when `TRITON_INTERPRET=1` was set before
  triton was imported, which is how tests run the kernels without a GPU), "blocked" elsewhere.
- "triton": the Triton kernels.
- "blocked": plain PyTorch, one query block at a time over its kept key blocks (`blocked.py`): the CPU path.
- "reference": masked SDPA over the whole score matrix in plain PyTorch (`reference.py`): the ground truth.
The environment variable `DIFFATTN_BLOCK_SPARSE_BACKEND` sets the backend used when `backend=None`.

The Triton path is registered as `torch.ops.diffattn.block_sparse_attn_fwd/_bwd` (custom ops with fake impls and
`register_autograd`), so `torch.compile` traces through it without a graph break, and a call does no host
synchronisation (index lists are built on the device; kernel configs come from a table, not autotuning).
"""

from __future__ import annotations

import logging
import math

import torch

from ..common import BACKENDS, default_backend, interpreting, resolve_backend
from .blocked import block_sparse_attention_blocked
from .checks import check_inputs
from .index import get_block_index
from .reference import block_sparse_attention_reference

logger = logging.getLogger("diffattn")

ENV_BACKEND = "DIFFATTN_BLOCK_SPARSE_BACKEND"

__all__ = ["BACKENDS", "ENV_BACKEND", "block_sparse_attention", "default_backend"]


def _resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    return resolve_backend(backend, q.device, ENV_BACKEND)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("diffattn::block_sparse_attn_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_fwd

    index = get_block_index(block_mask)
    ek = _last_contig(extra_k) if extra_k is not None else None
    ev = _last_contig(extra_v) if extra_v is not None else None
    return triton_fwd.forward(
        _last_contig(q), _last_contig(k), _last_contig(v), index.kv_idx, index.kv_cnt, block_size, scale, ek, ev,
        interpret=interpreting(),
    )


@_fwd_op.register_fake
def _fwd_fake(q, k, v, block_mask, extra_k, extra_v, block_size, scale):
    B, H, Sq, D = q.shape
    return q.new_empty((B, H, Sq, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("diffattn::block_sparse_attn_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_mask: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton_bwd

    index = get_block_index(block_mask)
    ek = _last_contig(extra_k) if extra_k is not None else None
    ev = _last_contig(extra_v) if extra_v is not None else None
    return triton_bwd.backward(
        do, _last_contig(q), _last_contig(k), _last_contig(v), out, lse, dlse,
        index.kv_idx, index.kv_cnt, index.q_idx, index.q_cnt, block_size, scale, ek, ev, interpret=interpreting(),
    )


@_bwd_op.register_fake
def _bwd_fake(do, dlse, q, k, v, out, lse, block_mask, extra_k, extra_v, block_size, scale):
    B, H, _, D = q.shape
    T = extra_k.shape[2] if extra_k is not None else 0
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty((B, H, T, D)),
        q.new_empty((B, H, T, D)),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, block_mask, extra_k, extra_v, block_size, scale = inputs
    out, lse = output
    ctx.block_size = block_size
    ctx.scale = scale
    ctx.has_extra = extra_k is not None
    ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient (fewer kernels per backward)
    ctx.save_for_backward(q, k, v, out, lse, block_mask, extra_k, extra_v)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_mask, extra_k, extra_v = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dek, dev = _bwd_op(
        grad_out, grad_lse, q, k, v, out, lse, block_mask, extra_k, extra_v, ctx.block_size, ctx.scale
    )
    if not ctx.has_extra:
        dek = dev = None
    return dq, dk, dv, None, dek, dev, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query block over the key blocks its mask row selects, plus optional extra keys.

    Args:
        q, k, v: `[B, H, S, D]` (the layout of `F.scaled_dot_product_attention`); Sq and Sk may differ and need not
            be multiples of `block_size` (the partial tail block is masked in-kernel). float16, bfloat16 or float32
            (float64 on the reference backend only); head dim up to 256 (64 and 128 are the tuned ones).
        block_mask: bool `[B or 1, H or 1, ceil(Sq/block_size), ceil(Sk/block_size)]`. Entry (i, j) lets query tokens
            `[i*block_size, (i+1)*block_size)` attend key tokens `[j*block_size, (j+1)*block_size)`, blocks counted from
            token 0. Size-1 batch/head dims broadcast.
        block_size: tokens per block; any positive multiple of 16 (64 and 128 are the fast ones).
        scale: softmax scale, default `1/sqrt(D)`.
        extra_k, extra_v: `[B, H, T, D]` keys/values that every query attends in addition to its masked keys
            (text tokens), with no mask; fused into the same softmax.
        return_lse: also return the log-sum-exp (natural log, float32 `[B, H, Sq]`), for merging partial results
            with `merge_attention_states`. It is differentiable.
        backend: None (default: Triton on CUDA or under TRITON_INTERPRET=1, "blocked" elsewhere; the env var
            `DIFFATTN_BLOCK_SPARSE_BACKEND` overrides this default), "triton", "blocked" (plain PyTorch, one query
            block at a time over its kept key blocks: the CPU path) or "reference" (plain PyTorch over the whole
            masked score matrix: the ground truth).

    A query with no key at all (every block of its row masked and no extra keys) gets output 0 and lse -inf, and
    its gradients are 0; never NaN.

    Returns:
        out `[B, H, Sq, D]` in q's dtype, or `(out, lse)` if `return_lse`.
    """
    name = _resolve_backend(backend, q)
    check_inputs(q, k, v, block_mask, block_size, scale, extra_k, extra_v, name)
    D = q.shape[-1]
    scale_f = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if extra_k is not None and extra_k.shape[2] == 0:
        extra_k = extra_v = None
    if name == "reference":
        out, lse = block_sparse_attention_reference(
            q, k, v, block_mask, block_size=block_size, scale=scale_f, extra_k=extra_k, extra_v=extra_v
        )
    elif name == "blocked":
        out, lse = block_sparse_attention_blocked(
            q, k, v, block_mask, block_size=block_size, scale=scale_f, extra_k=extra_k, extra_v=extra_v,
            need_lse=return_lse,
        )
    else:
        out, lse = _fwd_op(q, k, v, block_mask, extra_k, extra_v, block_size, scale_f)
    return (out, lse) if return_lse else out
