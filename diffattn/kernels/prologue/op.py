"""Front door of the prologue: validation in one place, backend choice, and a torch.library custom op so that
`torch.compile` traces through the Triton launch.

Backends: "triton" (CUDA tensors; CPU tensors when `TRITON_INTERPRET=1` was set before triton was imported, which
is how the tests run it without a GPU) and "reference" (plain PyTorch, `reference.py`). "auto" picks "triton" for
CUDA tensors with a power-of-two head dim, "reference" otherwise. No autograd: callers keep their plain path when
gradients are needed (`fused_supported` says so).
"""

from __future__ import annotations

import os

import torch

from .reference import NORMS, qk_norm_rope_reference

ENV_BACKEND = "DIFFATTN_PROLOGUE_BACKEND"
_BACKENDS = ("auto", "triton", "reference")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platforms without triton
        return False
    return True


def _pow2(n: int) -> bool:
    return n >= 2 and (n & (n - 1)) == 0


def fused_supported_device(x: torch.Tensor) -> bool:
    """The device/dtype part of `fused_supported` (callers test it before computing the projections)."""
    if os.environ.get(ENV_BACKEND, "auto") == "reference":
        return False
    return (x.is_cuda or _interpret()) and x.dtype in (torch.float16, torch.bfloat16) and _triton_available()


def fused_supported(x: torch.Tensor, weight: torch.Tensor | None, heads: int) -> bool:
    """Whether the Triton kernel would run for this input: a CUDA (or interpreted) half-precision tensor, a weight of
    the same dtype, a power-of-two head dim, and no autograd needed. Callers use their plain path otherwise, so fp32
    and CPU runs stay bit-identical to stock."""
    if not fused_supported_device(x):
        return False
    if weight is not None and weight.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    inner = x.shape[-1]
    return x.ndim == 3 and inner % heads == 0 and _pow2(inner // heads) and x.stride(-1) == 1


@torch.library.custom_op("diffattn::qk_norm_rope_into", mutates_args=("out",))
def _prologue_op(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
    out: torch.Tensor, out_offset: int, heads: int, eps: float, norm: str, round_before_weight: bool,
) -> None:
    from .triton_prologue import launch

    launch(x, weight, cos, sin, out, out_offset, heads, eps, norm, round_before_weight)


@_prologue_op.register_fake
def _prologue_fake(x, weight, cos, sin, out, out_offset, heads, eps, norm, round_before_weight) -> None:
    return None


def _check(x, weight, heads, norm, cos, sin, out, out_offset) -> tuple[int, int, int, int]:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"x must be a [B, S, H*D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x dtype must be float16, bfloat16, float32 or float64, got {x.dtype}")
    B, S, inner = x.shape
    if not isinstance(heads, int) or heads < 1 or inner % heads:
        raise ValueError(f"heads must be a positive int dividing x's last dim {inner}, got {heads!r}")
    D = inner // heads
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if weight is not None:
        want = (inner,) if norm == "across" else (D,)
        if norm == "none":
            raise ValueError("weight must be None with norm='none'")
        if tuple(weight.shape) != want:
            raise ValueError(f"weight must have shape {want} for norm={norm!r}, got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or neither)")
    n_rope = 0
    if cos is not None:
        if D % 2:
            raise ValueError(f"RoPE needs an even head dim, got {D}")
        if cos.shape[-1] != D or sin.shape != cos.shape or cos.numel() % D:
            raise ValueError(f"cos/sin must be [S_rope, {D}] (or broadcastable views of it), got {tuple(cos.shape)} "
                             f"and {tuple(sin.shape)}")
        n_rope = cos.numel() // D
        if n_rope > S:
            raise ValueError(f"cos/sin cover {n_rope} tokens but x has only {S}")
    if out is not None:
        if out.ndim != 4 or out.shape[0] != B or out.shape[1] != heads or out.shape[3] != D:
            raise ValueError(f"out must be [{B}, {heads}, S_total, {D}], got {tuple(out.shape)}")
        if out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must match x's dtype and device ({x.dtype}, {x.device}), got {out.dtype}, {out.device}")
        if not (0 <= out_offset and out_offset + S <= out.shape[2]):
            raise ValueError(f"out_offset {out_offset} + {S} tokens exceeds out's sequence length {out.shape[2]}")
        if out.stride(-1) != 1:
            raise ValueError("out must have a unit stride in its last dim")
    elif out_offset:
        raise ValueError("out_offset needs out")
    return B, S, D, n_rope


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    *,
    heads: int,
    eps: float = 1e-6,
    norm: str = "across",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    round_before_weight: bool = False,
    out: torch.Tensor | None = None,
    out_offset: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Normalise, rotate and lay out one projection: `x` `[B, S, H*D]` -> `[B, H, S, D]`.

    `norm`: "across" (RMSNorm over the whole `H*D`, weight `[H*D]`), "head" (per head, weight `[D]`) or "none".
    `cos`/`sin`: the RoPE tables for the first `S_rope <= S` tokens (`[S_rope, D]` or a view such as Wan's
    `[1, S, 1, D]`); later tokens are not rotated. `out`: write into `out[:, :, out_offset:out_offset+S]` of a
    preallocated `[B, H, S_total, D]` (joint sequences) and return it. See `reference.py` for the exact rounding.
    """
    B, S, D, n_rope = _check(x, weight, heads, norm, cos, sin, out, out_offset)
    name = backend or os.environ.get(ENV_BACKEND) or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if (x.is_cuda and _triton_available() and _pow2(D) and x.dtype != torch.float64) else "reference"
    if name == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable here")
        if not x.is_cuda and not _interpret():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); got tensors on {x.device}")
        if not _pow2(D) or x.dtype == torch.float64:
            raise ValueError(f"backend='triton' needs a power-of-two head dim and a 16/32-bit dtype, got D={D}, {x.dtype}")
    if out is None:
        out = torch.empty(B, heads, S, D, dtype=x.dtype, device=x.device)
    if name == "reference":
        c = None if cos is None else cos.reshape(n_rope, D)
        s = None if sin is None else sin.reshape(n_rope, D)
        out[:, :, out_offset:out_offset + S] = qk_norm_rope_reference(
            x, weight, heads=heads, eps=eps, norm=norm, cos=c, sin=s, round_before_weight=round_before_weight
        )
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    c = s = None
    if cos is not None:
        c = cos.reshape(n_rope, D).to(torch.float32).contiguous()
        s = sin.reshape(n_rope, D).to(torch.float32).contiguous()
    w = None if weight is None else weight.contiguous()
    _prologue_op(x, w, c, s, out, out_offset, heads, float(eps), norm, bool(round_before_weight))
    return out
