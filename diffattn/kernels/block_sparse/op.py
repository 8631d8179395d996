"""Front door: validation, backend choice (the registry in `diffattn/kernels/backends.py`), and the torch.library custom ops.

Backends (declared with their capabilities in `diffattn/kernels/backends.py`; `docs/backends.md` says how the choice is made):
- None (default): the fastest capable backend of the device kind's measured table (`diffattn/kernels/tuned/<kind>.json`),
  else "triton" where it runs (CUDA tensors, or CPU tensors when `TRITON_INTERPRET=1` was set before triton was
  imported, which is how tests run the kernels without a GPU), else "blocked".
- "triton": our Triton kernels. "gluon": the Gluon (Hopper) forward when built. "fa4": FlashAttention-4's
  CuTe-DSL block-sparse forward (optional extra `diffattn[fa4]`). Both reuse the Triton backward.
- "flex": torch FlexAttention on the same block lists (its own backward).
- "blocked": plain PyTorch, one query block at a time over its kept key blocks (`blocked.py`): the CPU path.
- "reference": masked SDPA over the whole score matrix in plain PyTorch (`reference.py`): the ground truth.
The environment variable `DIFFATTN_BLOCK_SPARSE_BACKEND` sets the backend used when `backend=None`.

The kernel path is registered as `torch.ops.diffattn.block_sparse_attn_fwd/_bwd` (custom ops with fake impls and
`register_autograd`; the forward takes the implementation's name), so `torch.compile` traces through it without a
graph break, and a call does no host synchronisation (index lists are built on the device; kernel configs come from
a table, not autotuning).
"""

from __future__ import annotations

import importlib
import logging
import math
import os

import torch

from .. import backends as registry
from ..common import default_backend, interpreting
from .blocked import block_sparse_attention_blocked
from .checks import check_inputs, check_out_affine
from .index import get_block_index
from .reference import block_sparse_attention_reference

logger = logging.getLogger("diffattn")

ENV_BACKEND = "DIFFATTN_BLOCK_SPARSE_BACKEND"

OP = "block_sparse"
#: every backend name `backend=` accepts (the registry's, in registration order)
BACKENDS: tuple[str, ...] = registry.names(OP)
#: backends that run inside the custom forward op (their out/lse feed the Triton backward)
KERNEL_IMPLS = ("triton", "gluon", "fa4")

__all__ = ["BACKENDS", "ENV_BACKEND", "block_sparse_attention", "default_backend"]


def _request(q: torch.Tensor, block_size: int, return_lse: bool, has_extra: bool, has_epilogue: bool,
             extra: tuple = ()) -> registry.Request:
    return registry.make_request(OP, q, head_dim=q.shape[-1], block_size=block_size, need_lse=return_lse,
                                 has_extra=has_extra, has_epilogue=has_epilogue, extra_tensors=extra)


def _resolve_backend(backend: str | None, q: torch.Tensor, block_size: int = 128, return_lse: bool = False,
                     has_extra: bool = False, has_epilogue: bool = False, extra: tuple = ()) -> str:
    """The backend the registry picks for this call (forced ones raise with the reason)."""
    return registry.choose(_request(q, block_size, return_lse, has_extra, has_epilogue, extra), backend)


def _gluon():
    """The Gluon forward module (written separately; imported by name so its absence is only a refusal)."""
    return importlib.import_module(registry.GLUON_MODULE)


def _gluon_reason(q, k, v, block_size, extra_k, need_lse) -> str | None:
    return _gluon().unsupported_reason(q, k, v, block_size, extra_k, need_lse)


def apply_epilogue(out: torch.Tensor, out_scale: torch.Tensor, out_bias: torch.Tensor, block_size: int) -> torch.Tensor:
    """`out_scale[i] * out + out_bias[i]` per query block i, in plain torch (for backends without a fused one)."""
    B, H, Sq, D = out.shape
    nq = out_scale.shape[-1]
    cdt = torch.float64 if out.dtype == torch.float64 else torch.float32
    o = torch.nn.functional.pad(out.to(cdt), (0, 0, 0, nq * block_size - Sq)).view(B, H, nq, block_size, D)
    o = o * out_scale.to(cdt)[..., None, None] + out_bias.to(cdt)[..., None, :]
    return o.reshape(B, H, nq * block_size, D)[:, :, :Sq].to(out.dtype)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    block_size: int,
    scale: float,
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    impl: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) by `impl` ("triton", "gluon" or "fa4"); all three mean the same out and lse, so the Triton
    backward serves each. The epilogue is fused in Triton and a torch pass after the others."""
    index = get_block_index(block_mask)
    ek = _last_contig(extra_k) if extra_k is not None else None
    ev = _last_contig(extra_v) if extra_v is not None else None
    qc, kc, vc = _last_contig(q), _last_contig(k), _last_contig(v)
    if impl == "triton":
        from . import triton_fwd

        return triton_fwd.forward(qc, kc, vc, index.kv_idx, index.kv_cnt, block_size, scale, ek, ev,
                                  interpret=interpreting(), out_scale=out_scale, out_bias=out_bias)
    if impl == "fa4":
        from . import fa4 as mod
    elif impl == "gluon":
        mod = _gluon()
    else:
        raise ValueError(f"impl must be one of {KERNEL_IMPLS}, got {impl!r}")
    out, lse = mod.forward(qc, kc, vc, index.kv_idx, index.kv_cnt, block_size, scale, ek, ev)
    if out_scale is not None and out_bias is not None:
        out = apply_epilogue(out, out_scale, out_bias, block_size)
    return out, lse


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
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    impl: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as a custom op (autograd and torch.compile see one opaque node); see `_fwd_impl`. The output
    layout is fixed per impl, as the fake says: FA4 writes `[B, S, H, D]` memory (a transposed view, no copy), the
    others `[B, H, S, D]`."""
    out, lse = _fwd_impl(q, k, v, block_mask, extra_k, extra_v, block_size, scale, out_scale, out_bias, impl)
    if impl == "fa4":
        return out.transpose(1, 2).contiguous().transpose(1, 2), lse  # no copy when FA4's layout already
    return out.contiguous(), lse.contiguous()


@_fwd_op.register_fake
def _fwd_fake(q, k, v, block_mask, extra_k, extra_v, block_size, scale, out_scale=None, out_bias=None, impl="triton"):
    B, H, Sq, D = q.shape
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    if impl == "fa4":
        return q.new_empty((B, Sq, H, D)).transpose(1, 2), lse
    return q.new_empty((B, H, Sq, D)), lse


def _bwd_impl(
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
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, d extra_k, d extra_v, and (with the epilogue) d out_scale, d out_bias (else empty)."""
    from . import triton_bwd

    index = get_block_index(block_mask)
    ek = _last_contig(extra_k) if extra_k is not None else None
    ev = _last_contig(extra_v) if extra_v is not None else None
    delta = None
    if out_scale is not None:
        delta = triton_bwd.rectified_delta(do, out, out_bias, block_size)
    grads = triton_bwd.backward(
        do, _last_contig(q), _last_contig(k), _last_contig(v), out, lse, dlse,
        index.kv_idx, index.kv_cnt, index.q_idx, index.q_cnt, block_size, scale, ek, ev, interpret=interpreting(),
        out_scale=out_scale, out_bias=out_bias, delta=delta,
    )
    if out_scale is None:
        return (*grads, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32))
    return (*grads, *triton_bwd.rectify_grads(do, delta, out_scale, block_size))


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
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as a custom op (for torch.compile); see `_bwd_impl`."""
    return _bwd_impl(do, dlse, q, k, v, out, lse, block_mask, extra_k, extra_v, block_size, scale, out_scale,
                     out_bias)


@_bwd_op.register_fake
def _bwd_fake(do, dlse, q, k, v, out, lse, block_mask, extra_k, extra_v, block_size, scale, out_scale=None,
              out_bias=None):
    B, H, _, D = q.shape
    T = extra_k.shape[2] if extra_k is not None else 0
    f32 = dict(dtype=torch.float32)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty((B, H, T, D)),
        q.new_empty((B, H, T, D)),
        q.new_empty(tuple(out_scale.shape), **f32) if out_scale is not None else q.new_empty((0,), **f32),
        q.new_empty(tuple(out_bias.shape), **f32) if out_bias is not None else q.new_empty((0,), **f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, block_mask, extra_k, extra_v, block_size, scale, out_scale, out_bias, _impl = inputs
    out, lse = output
    ctx.block_size = block_size
    ctx.scale = scale
    ctx.has_extra = extra_k is not None
    ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient (fewer kernels per backward)
    ctx.save_for_backward(q, k, v, out, lse, block_mask, extra_k, extra_v, out_scale, out_bias)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_mask, extra_k, extra_v, out_scale, out_bias = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dek, dev, dscale, dbias = _bwd_op(
        grad_out, grad_lse, q, k, v, out, lse, block_mask, extra_k, extra_v, ctx.block_size, ctx.scale,
        out_scale, out_bias,
    )
    if not ctx.has_extra:
        dek = dev = None
    if out_scale is None:
        dscale = dbias = None
    return dq, dk, dv, None, dek, dev, None, None, dscale, dbias, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFn(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager autograd: a custom op's dispatch (schema
    checks, the autograd wrapper, the fake-tensor machinery's bookkeeping) costs host time per call that eager
    training does not need. Traced calls (torch.compile) keep the ops."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, extra_k, extra_v, block_size, scale, out_scale, out_bias, impl):
        out, lse = _fwd_impl(q, k, v, block_mask, extra_k, extra_v, block_size, scale, out_scale, out_bias, impl)
        _setup_context(ctx, (q, k, v, block_mask, extra_k, extra_v, block_size, scale, out_scale, out_bias, impl),
                       (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, block_mask, extra_k, extra_v, out_scale, out_bias = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dek, dev, dscale, dbias = _bwd_impl(
            grad_out, grad_lse, q, k, v, out, lse, block_mask, extra_k, extra_v, ctx.block_size, ctx.scale,
            out_scale, out_bias,
        )
        if not ctx.has_extra:
            dek = dev = None
        if out_scale is None:
            dscale = dbias = None
        return dq, dk, dv, None, dek, dev, None, None, dscale, dbias, None


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
    out_scale: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
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
        backend: None (default: the fastest capable backend of this device kind's measured table, else Triton on
            CUDA or under TRITON_INTERPRET=1, else "blocked"; the env var `DIFFATTN_BLOCK_SPARSE_BACKEND` overrides
            this default), or one of "triton", "gluon", "fa4", "flex", "blocked" (plain PyTorch, one query block at
            a time: the CPU path), "reference" (the whole masked score matrix: the ground truth). A forced backend
            that cannot run the call raises `ValueError` with the reason (`diffattn.kernels.backends`).
        out_scale, out_bias: optional per-query-block epilogue, `[B or 1, H or 1, nq]` and `[B or 1, H or 1, nq, D]`
            (given together): query block i writes `out_scale[i] * attention + out_bias[i]`, fused into the kernel's
            output store (Rectified SpaAttn's `R * O_spa + C`). Differentiable in all inputs; lse is unchanged.

    A query with no key at all (every block of its row masked and no extra keys) gets output 0 and lse -inf, and
    its gradients are 0; never NaN.

    Returns:
        out `[B, H, Sq, D]` in q's dtype, or `(out, lse)` if `return_lse`.
    """
    if torch.compiler.is_compiling():  # traced: no caches (Dynamo sees the plain path once)
        name, scale_f, need_grad, index = _choose(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse,
                                                  backend, out_scale, out_bias, with_index=False)
        return _run(name, block_mask, block_size, scale_f, return_lse, need_grad, index, q, k, v, extra_k, extra_v,
                    out_scale, out_bias)
    key = _plan_key(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse, backend, out_scale, out_bias)
    plan = _plans.get(key) if key is not None else None
    if plan is not None:
        return plan(q, k, v, extra_k, extra_v, out_scale, out_bias)
    plan = _make_plan(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse, backend, out_scale,
                      out_bias, cacheable=key is not None)
    if key is not None:
        if len(_plans) >= PLAN_CACHE_SIZE:
            _plans.pop(next(iter(_plans)))
        _plans[key] = plan
    return plan(q, k, v, extra_k, extra_v, out_scale, out_bias)


# ---- per-call plans --------------------------------------------------------------------------------------------------
#: plans kept (one per distinct call signature and mask; a transformer has a handful)
PLAN_CACHE_SIZE = 64
_plans: dict[tuple, "_Plan"] = {}


def clear_plans() -> None:
    """Forget every cached plan (and the masks and index lists they keep alive)."""
    _plans.clear()


registry.on_clear(clear_plans)


def _meta(t: torch.Tensor | None):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _plan_key(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse, backend, out_scale, out_bias):
    """What validation, the backend choice and the launch depend on, from metadata only (never a host sync), or
    None for arguments that are not plain (those take the uncached path, which raises the right error).

    The mask enters by identity and in-place version: the plan keeps a reference to it, so its id cannot be
    reused by another tensor while the plan is cached, and an in-place change bumps `_version` (a new plan)."""
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(k, T) and isinstance(v, T) and isinstance(block_mask, T)):
        return None
    if type(block_size) is not int or not (scale is None or type(scale) in (float, int)):
        return None
    if not (backend is None or type(backend) is str):
        return None
    ex = aff = None
    if extra_k is not None or extra_v is not None:
        if not (isinstance(extra_k, T) and isinstance(extra_v, T)):
            return None
        ex = (_meta(extra_k), _meta(extra_v))
    if out_scale is not None or out_bias is not None:
        if not (isinstance(out_scale, T) and isinstance(out_bias, T)):
            return None
        aff = (_meta(out_scale), _meta(out_bias))
    need_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (ex is not None and (extra_k.requires_grad or extra_v.requires_grad))
        or (aff is not None and (out_scale.requires_grad or out_bias.requires_grad)))
    p = q.data_ptr() | k.data_ptr() | v.data_ptr()
    if ex is not None:
        p |= extra_k.data_ptr() | extra_v.data_ptr()
    return (_meta(q), _meta(k), _meta(v), id(block_mask), block_mask._version, block_mask.shape, block_size, scale,
            bool(return_lse), backend, os.environ.get(ENV_BACKEND), need_grad, ex, aff, p % 16 == 0)


class _Plan:
    """What one call signature needs, worked out once: validated arguments, the backend, the mask's index lists
    and (for the kernels without gradient) the prepared launch. Calling it runs the attention."""

    __slots__ = ("name", "mask", "block_size", "scale", "return_lse", "need_grad", "index", "fast")

    def __init__(self, name, mask, block_size, scale, return_lse, need_grad, index, fast):
        self.name, self.mask, self.block_size, self.scale = name, mask, block_size, scale
        self.return_lse, self.need_grad, self.index, self.fast = return_lse, need_grad, index, fast

    def __call__(self, q, k, v, extra_k, extra_v, out_scale, out_bias):
        if self.fast is not None:  # triton/gluon, no gradient, no epilogue, last dims contiguous
            if extra_k is not None and extra_k.shape[2] == 0:
                extra_k = extra_v = None
            out, lse = self.fast(q, k, v, self.index.kv_idx, self.index.kv_cnt, extra_k, extra_v)
            return (out, lse) if self.return_lse else out
        return _run(self.name, self.mask, self.block_size, self.scale, self.return_lse, self.need_grad, self.index,
                    q, k, v, extra_k, extra_v, out_scale, out_bias)


def _choose(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse, backend, out_scale, out_bias,
            with_index: bool = True):
    """Validate, choose the backend: (name, float scale, need_grad, index lists or None)."""
    check_inputs(q, k, v, block_mask, block_size, scale, extra_k, extra_v, None)
    check_out_affine(out_scale, out_bias, q, block_size)
    if extra_k is not None and extra_k.shape[2] == 0:
        extra_k = extra_v = None
    has_extra, has_epi = extra_k is not None, out_scale is not None
    req = _request(q, block_size, return_lse, has_extra, has_epi, (k, v, extra_k, extra_v, out_scale, out_bias))
    name = registry.choose(req, backend)
    if name == "gluon":  # its own check needs the tensors (strides, lengths, alignment: all in the plan key)
        reason = _gluon_reason(q, k, v, block_size, extra_k, return_lse or req.need_grad)
        if reason:
            if backend is not None or os.environ.get(ENV_BACKEND, "").strip():
                raise registry.BackendUnavailable(f"backend='gluon' cannot run this block_sparse call: {reason}")
            registry.debug("block_sparse backend gluon refused: %s", reason)
            name = registry.choose(req, None, exclude=frozenset({"gluon"}))
    D = q.shape[-1]
    scale_f = 1.0 / math.sqrt(D) if scale is None else float(scale)
    index = get_block_index(block_mask) if name == "flex" or (with_index and name in KERNEL_IMPLS) else None
    return name, scale_f, req.need_grad, index


def _make_plan(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse, backend, out_scale, out_bias,
               cacheable: bool) -> _Plan:
    name, scale_f, need_grad, index = _choose(q, k, v, block_mask, block_size, scale, extra_k, extra_v, return_lse,
                                              backend, out_scale, out_bias)
    if extra_k is not None and extra_k.shape[2] == 0:
        extra_k = extra_v = None
    has_epi = out_scale is not None
    fast = None
    contiguous = all(t is None or t.stride(-1) == 1 for t in (q, k, v, extra_k, extra_v))
    if cacheable and not need_grad and not has_epi and contiguous and name in ("triton", "gluon"):
        fast = _fast_forward(name, q, k, v, index, block_size, scale_f, extra_k, extra_v)
    return _Plan(name, block_mask, block_size, scale_f, bool(return_lse), need_grad, index, fast)


def _fast_forward(name, q, k, v, index, block_size, scale, extra_k, extra_v):
    """The prepared forward of a plan: (q, k, v, kv_idx, kv_cnt, extra_k, extra_v) -> (out, lse), or None."""
    if name == "triton":
        from . import triton_fwd

        return triton_fwd.prepare(q, k, v, index.kv_idx, index.kv_cnt, block_size, scale, extra_k, extra_v,
                                  interpret=interpreting())
    prep = getattr(_gluon(), "prepare", None)
    return None if prep is None else prep(q, k, v, index.kv_idx, index.kv_cnt, block_size, scale, extra_k, extra_v)


def _run(name, block_mask, block_size, scale_f, return_lse, need_grad, index, q, k, v, extra_k, extra_v, out_scale,
         out_bias):
    """The general execution (gradients, the epilogue, the PyTorch and Flex backends, traced calls)."""
    if extra_k is not None and extra_k.shape[2] == 0:
        extra_k = extra_v = None
    affine = {}
    if out_scale is not None:
        B, H, _, D = q.shape
        nq = out_bias.shape[2]
        adt = torch.float64 if q.dtype == torch.float64 else torch.float32
        affine = dict(out_scale=out_scale.to(adt).expand(B, H, nq), out_bias=out_bias.to(adt).expand(B, H, nq, D))
    if name == "reference":
        out, lse = block_sparse_attention_reference(
            q, k, v, block_mask, block_size=block_size, scale=scale_f, extra_k=extra_k, extra_v=extra_v, **affine
        )
    elif name == "blocked":
        out, lse = block_sparse_attention_blocked(
            q, k, v, block_mask, block_size=block_size, scale=scale_f, extra_k=extra_k, extra_v=extra_v,
            need_lse=return_lse, **affine,
        )
    elif name == "flex":
        from . import flex

        out, lse = flex.forward(q, k, v, block_mask, index.kv_idx, index.kv_cnt, block_size, scale_f, extra_k, extra_v)
        if affine:
            out = apply_epilogue(out, affine["out_scale"], affine["out_bias"], block_size)
    else:
        # Traced: the custom op (torch.compile sees one opaque node); eager with a gradient: the same kernels in
        # an autograd.Function (less host time per call than the op's dispatch); no gradient: the kernels.
        args = (q, k, v, block_mask, extra_k, extra_v, block_size, scale_f, affine.get("out_scale"),
                affine.get("out_bias"), name)
        if torch.compiler.is_compiling():
            out, lse = _fwd_op(*args)
        elif need_grad:
            out, lse = _EagerFn.apply(*args)
        else:
            out, lse = _fwd_impl(*args)
    return (out, lse) if return_lse else out
