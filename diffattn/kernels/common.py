"""What the two kernel front doors share (`block_sparse_attention`, `neighborhood_attention`): one device/interpreter
test, the portable default backend, the argument checks common to both, and one Hopper-fallback scheme. Pure torch;
no Diffusers, nothing of diffattn above the kernels.

Which backends exist and how one is chosen is the registry's (`diffattn/kernels/backends.py`): None = auto (the measured
table of the device kind, else `default_backend`: Triton where it runs, CUDA or CPU tensors under
`TRITON_INTERPRET=1`; "blocked" elsewhere). Each front door's environment variable
(`DIFFATTN_BLOCK_SPARSE_BACKEND`, `DIFFATTN_NEIGHBORHOOD_BACKEND`) sets its default when `backend=None`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("diffattn")

#: dtypes the Triton kernels run on; the PyTorch backends also take float64 (ground truth in tests).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_HEAD_DIM = 256


# ---- device and backend ---------------------------------------------------------------------------------------
def interpreting() -> bool:
    """Whether Triton's interpreter is on (`TRITON_INTERPRET`, read as Triton reads its boolean knobs)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platforms without triton
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA, or CPU under the interpreter."""
    device = torch.device(device)
    return triton_importable() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def default_backend(device: torch.device) -> str:
    """The portable default (what `backend=None` picks where the measured table is silent): "triton" where it
    runs, "blocked" elsewhere."""
    return "triton" if triton_runs_on(device) else "blocked"


# ---- argument checks shared by both front doors -------------------------------------------------------------------
#: the vocabulary of the small kernels that have no backend registry (the agent merge's bipartite ops)
SIMPLE_BACKENDS: tuple[str, ...] = ("triton", "blocked", "reference")


def resolve_backend(backend: str | None, device: torch.device, env_var: str) -> str:
    """For the small kernels outside the registry (`kernels.backends` chooses for the two attention front
    doors): `backend`, else the environment variable `env_var`, else `default_backend`."""
    source = "backend"
    if backend is None and os.environ.get(env_var):
        backend, source = os.environ[env_var].strip(), env_var
    if backend is None:
        return default_backend(device)
    if backend not in SIMPLE_BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, SIMPLE_BACKENDS))} or None (auto), "
                         f"got {backend!r}")
    if backend == "triton" and not triton_runs_on(device):
        raise ValueError(
            "backend='triton' needs the triton package and CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got tensors on {device}. Use backend='blocked' (or None) on CPU."
        )
    return backend


def check_tensors(**tensors: Any) -> None:
    """Each named argument is a tensor (`TypeError` naming it otherwise)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_dtype(q: torch.Tensor, backend: str | None = None) -> None:
    """q's dtype is one the named backend takes ("triton": float16/bfloat16/float32); None or another name: any
    dtype some backend takes (float64 too). The registry refuses a dtype a chosen backend cannot run."""
    allowed = KERNEL_DTYPES if backend == "triton" else REFERENCE_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q dtype must be one of {[str(d) for d in allowed]}, got {q.dtype}")


def check_like_q(q: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Each named tensor has q's dtype and device."""
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")


def check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")


def check_extra_pair(extra_k: torch.Tensor | None, extra_v: torch.Tensor | None) -> None:
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra_k and extra_v must be given together (or both None)")
    if extra_k is not None:
        check_tensors(extra_k=extra_k, extra_v=extra_v)


def check_scale(scale: float | None) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")


# ---- Hopper fallback ---------------------------------------------------------------------------------------------
_failed: set[tuple] = set()


def run_with_fallbacks(kernel: str, key: tuple, variants: list[tuple[str, Callable[[], Any]]]) -> Any:
    """Run the first variant that compiles, best first (Hopper-only variants such as TMA, then the plain one last).

    A variant that fails for `key` (a kernel specialization) is remembered, so later calls skip it instead of
    recompiling, and logged once; the last variant's errors propagate. Triton 3.6 fails to compile some Hopper
    variants for some specializations, so a failure is a fact about that key, not about the device.
    """
    for i, (name, launch) in enumerate(variants):
        last = i == len(variants) - 1
        if not last and (kernel, key, name) in _failed:
            continue
        try:
            return launch()
        except Exception as e:
            if last:
                raise
            _failed.add((kernel, key, name))
            logger.warning("%s: Triton could not run the %s variant for %s (%s: %s); falling back", kernel, name,
                           key, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    raise AssertionError("unreachable: no variants given")
