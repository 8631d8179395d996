"""Front door: `neighborhood_attention` validates once, picks the backend through the registry
(`diffattn/kernels/backends.py`, op "neighborhood"), and wires autograd.

Backends: None = auto (the device kind's measured table, else "triton" where it runs, else "blocked";
`DIFFATTN_NEIGHBORHOOD_BACKEND` sets it), "triton", "fa4" and "gluon" (exactly block-sparse plans only: the
block-sparse lowering on tile-permuted tokens, `lowering.py`), "blocked", "reference".
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from .. import backends as registry
from ..common import check_tensors, default_backend, run_with_fallbacks
from .blocked import neighborhood_attention_blocked
from .checks import check_qkv, normalize_params, spatial_shape
from .lowering import gluon_reason, lowering_reason, neighborhood_attention_block_sparse
from .reference import neighborhood_attention_reference
from .tiling import Plan, make_plan, resolve_tiles

logger = logging.getLogger("diffattn")

ENV_BACKEND = "DIFFATTN_NEIGHBORHOOD_BACKEND"
OP = "neighborhood"
#: every backend name `backend=` accepts (the registry's)
BACKENDS: tuple[str, ...] = registry.names(OP)

__all__ = ["BACKENDS", "ENV_BACKEND", "default_backend", "get_plan", "neighborhood_attention"]


def get_plan(shape, kernel_size, stride, dilation, is_causal, q_tile=None, kv_tile=None) -> Plan:
    """The tile plan the kernel will use (tiles chosen by simulated cost unless given)."""
    def tup(x):
        return tuple(x) if isinstance(x, (list, tuple)) else x

    return _get_plan(tup(shape), tup(kernel_size), tup(stride), tup(dilation), tup(is_causal), tup(q_tile), tup(kv_tile))


@functools.lru_cache(maxsize=256)
def _get_plan(shape, kernel_size, stride, dilation, is_causal, q_tile, kv_tile) -> Plan:
    p = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    q_tile, kv_tile = resolve_tiles(p, q_tile, kv_tile)
    return make_plan(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, q_tile, kv_tile)


def _plan_of(q: torch.Tensor, kernel_size, stride, dilation, is_causal, q_tile, kv_tile) -> Plan:
    """Inside the custom ops (opaque to torch.compile): tiles chosen here when not given (empty lists)."""
    return get_plan(spatial_shape(q), tuple(kernel_size), tuple(stride), tuple(dilation),
                    tuple(bool(c) for c in is_causal), tuple(q_tile) or None, tuple(kv_tile) or None)


# On Hopper the forward reads tiles as TMA boxes in place (triton_fwd_tma.py): +11-18% on H100 for GNA;
# DIFFATTN_NA_TMA=0 turns it off (pointer loads).
# Registered as torch.library custom ops so torch.compile keeps them in one graph (no graph break); the plan is
# passed as plain int lists and rebuilt from the (cached) tiling tables inside.
@torch.library.custom_op("diffattn::neighborhood_attn_fwd", mutates_args=())
def _na_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: Optional[torch.Tensor],
    extra_v: Optional[torch.Tensor], kernel_size: list[int], stride: list[int], dilation: list[int],
    is_causal: list[bool], q_tile: list[int], kv_tile: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_fwd import na_forward

    plan = _plan_of(q, kernel_size, stride, dilation, is_causal, q_tile, kv_tile)
    variants = []
    if os.environ.get("DIFFATTN_NA_TMA", "1") != "0":
        from .triton_fwd_tma import tma_inplace_ok

        if tma_inplace_ok(q, plan) and tma_inplace_ok(k, plan) and tma_inplace_ok(v, plan):
            variants.append(("TMA", lambda: na_forward(q, k, v, plan, scale, extra_k, extra_v, need_lse=True, tma=True)))
    variants.append(("pointer", lambda: na_forward(q, k, v, plan, scale, extra_k, extra_v, need_lse=True)))
    key = (plan.q_tile, plan.kv_tile, tuple(q.shape), q.dtype, extra_k is not None)
    out, lse = run_with_fallbacks("neighborhood attention forward", key, variants)
    assert lse is not None
    return out, lse


@_na_fwd_op.register_fake
def _(q, k, v, extra_k, extra_v, kernel_size, stride, dilation, is_causal, q_tile, kv_tile, scale):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def backward_stages(q_split: int) -> list[tuple[int, int]]:
    """(dQ stages, dK/dV stages) to try in order, deepest first; a variant that does not fit falls to the next.

    3-stage dK/dV fits at d=128 on sm90 where the dQ kernel's 3 stages do not (256 KiB of shared memory), and ran
    faster with the same gradients (H100, fp16, 2026-12-06: FLUX-4K GNA backward 43.06 -> 40.28 ms, FLUX-4K NA
    60.25 -> 57.32, HunyuanVideo GNA 126.66 -> 124.11). The 1-stage tail is for plans whose tiles need more shared
    memory (whole 128-row tiles at HunyuanVideo-NA's plan needed 233,472 B of sm90's 232,448 at 2 stages). Row
    slices thinner than half a tile (q_split > 2) pipelined gave wrong gradients on an H100 (`na_backward` refuses
    them on CUDA), so there only dQ is pipelined.
    """
    if q_split > 2:
        return [(2, 1), (1, 1)]
    return [(2, 3), (2, 2), (1, 1)]


@torch.library.custom_op("diffattn::neighborhood_attn_bwd", mutates_args=())
def _na_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: Optional[torch.Tensor],
    extra_v: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor,
    d_lse: Optional[torch.Tensor], kernel_size: list[int], stride: list[int], dilation: list[int],
    is_causal: list[bool], q_tile: list[int], kv_tile: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_bwd import dkv_q_split, na_backward

    plan = _plan_of(q, kernel_size, stride, dilation, is_causal, q_tile, kv_tile)
    q_split = dkv_q_split(plan)  # resolved once: part of the specialization that may not fit

    def launch(stages: tuple[int, int]):
        return na_backward(q, k, v, extra_k, extra_v, out, lse, d_out, d_lse, plan, scale, num_stages=stages[0],
                           q_split=q_split, dkv_stages=stages[1])

    variants = [(f"dq{a}-dkv{b}-stage", functools.partial(launch, (a, b))) for a, b in backward_stages(q_split)]
    key = (plan.q_tile, plan.kv_tile, tuple(q.shape), q.dtype, extra_k is not None, q_split)
    dq, dk, dv, dek, dev = run_with_fallbacks("neighborhood attention backward", key, variants)
    if dek is None:  # custom ops return tensors only: empty placeholders, mapped back to None below
        dek, dev = q.new_zeros(1), q.new_zeros(1)
    return dq, dk, dv, dek, dev


@_na_bwd_op.register_fake
def _(q, k, v, extra_k, extra_v, out, lse, d_out, d_lse, kernel_size, stride, dilation, is_causal, q_tile,
      kv_tile, scale):
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    if extra_k is None:
        return like(q), like(k), like(v), q.new_empty(1), q.new_empty(1)
    return like(q), like(k), like(v), like(extra_k), like(extra_v)


def _setup_context(ctx, inputs, output):
    q, k, v, extra_k, extra_v, kernel_size, stride, dilation, is_causal, q_tile, kv_tile, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
    ctx.args = (kernel_size, stride, dilation, is_causal, q_tile, kv_tile, scale)
    ctx.has_extra = extra_k is not None


def _backward(ctx, d_out, d_lse):
    q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dek, dev = _na_bwd_op(q, k, v, extra_k, extra_v, out, lse, d_out.contiguous(), d_lse, *ctx.args)
    if not ctx.has_extra:
        dek = dev = None
    return dq, dk, dv, dek, dev, None, None, None, None, None, None, None


_na_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
    float32 `[B, *spatial, H]`. Differentiable (Triton backward); a torch.library custom op
    (`diffattn::neighborhood_attn_fwd`/`_bwd`), so torch.compile(fullgraph=True) traces through it.

    backend: None (the device kind's measured table, else Triton on CUDA or on CPU under TRITON_INTERPRET=1,
    else "blocked"; the env var `DIFFATTN_NEIGHBORHOOD_BACKEND` overrides this default; `diffattn/kernels/backends.py`),
    "triton", "fa4"/"gluon" (plans with no masked tile pair, e.g. strided GNA with tile-aligned windows: FA4's or our
    Gluon block-sparse forward on tile-permuted tokens, `lowering.py`; other plans are refused with the reason), "blocked"
    (plain PyTorch, one query tile at a time over the box of keys it can see: the CPU path, differentiable by
    autograd) or "reference" (dense `[N, N]` mask, small problems only; the ground truth).
    q_tile/kv_tile: override the Triton tile shapes (powers of two, at least 16 tokens per tile; default: chosen by
    the simulator's cost, see `diffattn.kernels.neighborhood.simulate`). For "blocked", q_tile (any ints >= 1, group-local) sets its
    query tile and kv_tile is unused (the key box follows from the windows).

    On Hopper the forward reads tiles as TMA boxes in place (set DIFFATTN_NA_TMA=0 for pointer loads); perfectly
    block-sparse settings (see `diffattn.kernels.neighborhood.propose_stride`) run with no per-element mask. The triton
    path makes no permutation copy; fa4/gluon permute q, k, v and un-permute the output (one copy each).
    """
    check_tensors(q=q, k=k, v=v)
    if backend is not None:
        registry.check_name(OP, backend)
    check_qkv(q, k, v, extra_k, extra_v, scale, None)
    has_extra = extra_k is not None and extra_k.shape[1] > 0
    shape = spatial_shape(q)
    params = normalize_params(shape, kernel_size, stride, dilation, is_causal)
    lower_reason, plan, block = None, None, None
    if q.device.type == "cuda" and backend not in ("triton", "blocked", "reference"):
        # the block-sparse lowering ("fa4", "gluon"; lowering.py) runs exactly block-sparse plans only
        plan = get_plan(shape, params.kernel_size, params.stride, params.dilation, params.is_causal, q_tile, kv_tile)
        lower_reason = lowering_reason(plan)
        block = plan.block_m if lower_reason is None else None
    req = registry.make_request(OP, q, head_dim=q.shape[-1], block_size=block, need_lse=return_lse,
                                has_extra=has_extra, extra_tensors=(k, v, extra_k, extra_v),
                                block_sparse_plan=block is not None)
    forced = backend is not None or bool(os.environ.get(ENV_BACKEND, "").strip())
    try:
        backend = registry.choose(req, backend)
    except registry.BackendUnavailable as e:
        if lower_reason and registry.NOT_BLOCK_SPARSE in str(e):
            raise registry.BackendUnavailable(str(e).replace(registry.NOT_BLOCK_SPARSE, lower_reason)) from None
        raise
    if backend == "gluon":  # the Gluon forward's own check (dtype, head dim, block size on permuted tensors)
        reason = gluon_reason(q.device.index or 0, q.dtype, q.shape[-1], block, has_extra)
        if reason:
            if forced:
                raise registry.BackendUnavailable(f"backend='gluon' cannot run this neighborhood call: {reason}")
            registry.debug("neighborhood backend gluon refused: %s", reason)
            backend = registry.choose(req, None, exclude=frozenset({"gluon"}))
    if lower_reason and not forced:
        registry.debug("neighborhood backends fa4/gluon skipped: %s", lower_reason)
    if backend in ("fa4", "gluon"):
        return neighborhood_attention_block_sparse(q, k, v, plan, params, backend, scale=scale, extra_k=extra_k,
                                                   extra_v=extra_v, return_lse=return_lse)
    if backend == "reference":
        return neighborhood_attention_reference(
            q, k, v, params.kernel_size, params.stride, params.dilation, params.is_causal,
            scale=scale, extra_k=extra_k, extra_v=extra_v, return_lse=return_lse)
    if backend == "blocked":  # plain ops outside the custom op, so autograd differentiates them directly
        return neighborhood_attention_blocked(
            q, k, v, params.kernel_size, params.stride, params.dilation, params.is_causal,
            scale=scale, extra_k=extra_k, extra_v=extra_v, return_lse=return_lse, tile=q_tile)
    if extra_k is not None and extra_k.shape[1] == 0:
        extra_k = extra_v = None
    q_tiles = [int(t) for t in q_tile] if q_tile is not None else []
    kv_tiles = [int(t) for t in kv_tile] if kv_tile is not None else []
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    if extra_k is not None:
        assert extra_v is not None
        if extra_k.stride(-1) != 1 or extra_k.stride() != extra_v.stride():
            extra_k, extra_v = extra_k.contiguous(), extra_v.contiguous()
    out, lse = _na_fwd_op(q, k, v, extra_k, extra_v, list(params.kernel_size), list(params.stride),
                          list(params.dilation), list(params.is_causal), q_tiles, kv_tiles, scale)
    return (out, lse) if return_lse else out
