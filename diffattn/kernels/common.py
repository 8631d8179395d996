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


# ---- steady-path launches ------------------------------------------------------------------------------------------
#: `DIFFATTN_TRITON_FAST=0` turns the recorded launches off (every call goes through Triton's own `kernel[grid](...)`).
ENV_FAST = "DIFFATTN_TRITON_FAST"


def fast_launch_enabled() -> bool:
    return os.environ.get(ENV_FAST, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _knobs():
    from triton import knobs

    return knobs


def _hooks_active() -> bool:
    """Whether a Triton launch hook is installed (a profiler): then calls go through Triton's own path."""
    try:
        knobs = _knobs()
    except Exception:  # pragma: no cover - very old triton
        return True
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(knobs.runtime, name, None)
        if hook is not None and (not hasattr(hook, "calls") or hook.calls):
            return True
    return False


class RecordedLaunch:
    """One Triton kernel specialization, launched directly on the steady path.

    `kernel[grid](*args, **kwargs)` costs tens of microseconds of Python per call (binding ~60 arguments, computing
    their specialization key, building launch metadata). When the caller knows that nothing Triton specializes on
    has changed since a first call (same shapes, strides, dtypes, constexprs and config, every pointer 16-byte
    aligned as it was then), the compiled kernel that first call returned can be launched directly with only the
    tensors replaced: `record()` makes the first call through Triton and keeps its `CompiledKernel` and the full
    argument list; `__call__` swaps in the per-call values at `slots` and calls the compiled kernel's launcher, as
    `JITFunction.run` itself does at its end (Triton 3.6-3.9: `CompiledKernel.run(grid..., stream, function,
    packed_metadata, launch_metadata, enter_hook, exit_hook, *args)`). Tests compare both paths bit for bit.
    """

    __slots__ = ("compiled", "template", "slots", "grid", "device", "run", "function", "packed")

    def __init__(self, compiled, template: list, slots: tuple[int, ...], grid: tuple[int, int, int], device: int):
        template = list(template)
        for i in slots:  # the first call's tensors must not be kept alive (they may be gigabytes)
            template[i] = None
        self.compiled, self.template, self.slots, self.grid, self.device = compiled, template, slots, grid, device
        self.run = compiled.run  # initialises the module handles
        self.function = compiled.function
        self.packed = compiled.packed_metadata

    @staticmethod
    def record(jit_fn, grid: tuple, args: tuple, kwargs: dict, slot_names: tuple[str, ...],
               device: int) -> "tuple[Any, RecordedLaunch | None]":
        """Launch `jit_fn[grid](*args, **kwargs)` once through Triton; return (its result, the recording or None
        when this Triton does not expose what a replay needs). `slot_names`: the parameters replaced per call."""
        compiled = jit_fn[grid](*args, **kwargs)
        try:
            names = list(jit_fn.arg_names)
            import inspect

            sig = inspect.signature(jit_fn.fn)
            template = []
            for i, name in enumerate(names):
                if i < len(args):
                    template.append(args[i])
                elif name in kwargs:
                    template.append(kwargs[name])
                else:
                    default = sig.parameters[name].default
                    if default is inspect.Parameter.empty:
                        return compiled, None
                    template.append(default)
            slots = tuple(names.index(n) for n in slot_names)
            g = tuple(grid) + (1,) * (3 - len(grid))
            if not hasattr(compiled, "run") or not hasattr(compiled, "packed_metadata"):
                return compiled, None
            return compiled, RecordedLaunch(compiled, template, slots, g, device)
        except Exception as e:  # noqa: BLE001 - a Triton without these internals just keeps the slow path
            logger.debug("no recorded launch for %s: %s", getattr(jit_fn, "__name__", jit_fn), e)
            return compiled, None

    def __call__(self, values: tuple) -> None:
        args = self.template.copy()
        for i, x in zip(self.slots, values):
            args[i] = x
        knobs = _knobs()
        g0, g1, g2 = self.grid
        self.run(g0, g1, g2, torch._C._cuda_getCurrentRawStream(self.device), self.function, self.packed, None,
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)


def replay_allowed(device_index: int) -> bool:
    """A recorded launch may replace Triton's own path now: enabled, no launch hooks, and the launch would go to
    the device it was recorded on (Triton launches on the current device)."""
    return fast_launch_enabled() and not _hooks_active() and torch.cuda.current_device() == device_index


def _arg_key(a: Any):
    """What Triton specializes on for one argument: a tensor's dtype and 16-byte alignment (never its data), a
    descriptor's type, dtype, shape, strides and block, a scalar's type and value (scalars are frozen into the
    recorded argument list, so their value is part of the key)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if a is None or isinstance(a, (bool, int, float, str)):
        return (type(a), a)
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(a, "block_shape"):
        return (type(a), base.dtype, base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), getattr(a, "padding", None), repr(getattr(a, "layout", None)))
    raise TypeError(f"no launch key for {type(a).__name__}")


class LaunchCache:
    """Recorded launches of one Triton kernel, keyed on everything Triton specializes on (computed from the
    arguments themselves: `_arg_key`), so any call may use it: the first call of a key goes through Triton and is
    recorded, later ones replay it with only the tensors (and descriptors) swapped. A bit more host work per call
    than a caller-built key (one pass over the arguments), and no way to get the key wrong."""

    def __init__(self, jit_fn, size: int = 64):
        self.jit_fn, self.size = jit_fn, size
        self._recs: dict[tuple, RecordedLaunch | None] = {}
        self._slots: tuple[int, ...] | None = None

    def __call__(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else None
        if not fast_launch_enabled() or (isinstance(first, torch.Tensor) and not first.is_cuda):
            self.jit_fn[grid](*args, **kwargs)
            return
        try:
            key = (tuple(grid), tuple(_arg_key(a) for a in args), tuple(kwargs.items()))
            hash(key)
        except TypeError:
            self.jit_fn[grid](*args, **kwargs)
            return
        rec = self._recs.get(key, False)
        if rec and replay_allowed(rec.device):
            rec(tuple(args[i] for i in rec.slots))
            return
        if rec is not False:  # not recordable here (None), or hooks / another device: Triton's path
            self.jit_fn[grid](*args, **kwargs)
            return
        aligned = all(k[1] for k in key[1] if len(k) == 2 and isinstance(k[0], torch.dtype))
        if not aligned:
            self.jit_fn[grid](*args, **kwargs)
            return
        names = list(self.jit_fn.arg_names)
        slot_names = tuple(names[i] for i, a in enumerate(args)
                           if isinstance(a, torch.Tensor) or hasattr(a, "block_shape"))
        dev = torch.cuda.current_device()
        _, rec = RecordedLaunch.record(self.jit_fn, grid, args, kwargs, slot_names, dev)
        if len(self._recs) >= self.size:
            self._recs.pop(next(iter(self._recs)))
        self._recs[key] = rec


class DescriptorCopier:
    """Host TMA descriptors for tensors of one fixed shape/stride/dtype (a plan's inputs), built by copying a
    template that was constructed (and validated) normally once, with only `base` replaced: the dataclass's
    checks ran for that signature already, and they cost microseconds per call."""

    __slots__ = ("template",)

    def __init__(self, template):
        t = object.__new__(type(template))
        t.__dict__.update(template.__dict__)
        t.base = None  # keep no tensor alive
        self.template = t

    def __call__(self, base: torch.Tensor):
        d = object.__new__(type(self.template))
        d.__dict__.update(self.template.__dict__)
        d.base = base
        return d
