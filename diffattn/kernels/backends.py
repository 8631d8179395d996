"""One backend registry per kernel operation (`block_sparse`, `neighborhood`), as NATTEN's front door has it.

Each backend declares what it can run as data (`Caps`: devices and compute capability, dtypes, head dims, block
sizes, lse, backward, extra keys, the per-query-block epilogue) plus an optional availability probe (an optional
package such as FlashAttention-4, a module another change adds) and an extra rule for what the data cannot say.
`Backend.why_not(request)` returns the first reason it cannot run a call, or None.

Choosing (`choose`): an explicit `backend=` (or the operation's environment variable, when `backend` is None) is
forced and fails with the backend's reason; otherwise the order is the device kind's measured table
(`diffattn/kernels/tuned/<kind>.json`, written by `diffattn bench kernels|gna|na-backward --tune`; a call that needs
gradients reads the row's `/grad` twin first, `Request.table_keys`), then the portable default ("triton" where
Triton runs, "blocked" elsewhere). The first capable backend wins; every refusal on the way is logged at
debug level on `logging.getLogger("diffattn")`. Choices are cached per request key, so the steady path costs one
dict lookup.

Pure torch: nothing of diffattn above the kernels is imported here, and no backend module is imported until a
probe asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import interpreting, triton_importable

logger = logging.getLogger("diffattn")

OPS = ("block_sparse", "neighborhood")
ENV_VARS = {"block_sparse": "DIFFATTN_BLOCK_SPARSE_BACKEND", "neighborhood": "DIFFATTN_NEIGHBORHOOD_BACKEND"}
#: where the measured tables live (one JSON file per device kind); DIFFATTN_TUNED_DIR overrides it (tests).
TUNED_DIR = Path(__file__).with_name("tuned")
GLUON_MODULE = __name__.rsplit(".", 1)[0] + ".block_sparse.gluon_fwd"

HALF = (torch.float16, torch.bfloat16)
KERNEL = HALF + (torch.float32,)
ANY = KERNEL + (torch.float64,)


# ---- what a call asks for ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What one front-door call needs from a backend (all plain values: the registry's cache key)."""

    op: str
    device_type: str  # "cuda" or "cpu" (or whatever torch says)
    capability: tuple[int, int] | None  # CUDA compute capability, None off CUDA
    dtype: torch.dtype
    head_dim: int
    block_size: int | None = None  # block-sparse block size; None for neighborhood
    need_lse: bool = False
    need_grad: bool = False
    has_extra: bool = False
    has_epilogue: bool = False
    #: neighborhood only: the plan is perfectly block-sparse on tile-permuted tokens (no per-element mask)
    block_sparse_plan: bool = False

    @property
    def interpret(self) -> bool:
        return self.device_type == "cpu" and interpreting()

    def table_key(self) -> str:
        """The key of this request's row in a tuned table: dtype, head dim and (block-sparse) block size."""
        dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[self.dtype]
        return f"{dt}/d{self.head_dim}" + (f"/b{self.block_size}" if self.block_size is not None else "")

    def table_keys(self) -> tuple[str, ...]:
        """The rows that may order this request, most specific first. A training call (`need_grad`) reads the
        `<key>/grad` row (ordered by forward+backward time) where the table has one, else the forward row: the
        fastest forward is not the fastest training step when the backends' backwards differ."""
        key = self.table_key()
        return (f"{key}/grad", key) if self.need_grad else (key,)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device (cached per device), None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def make_request(op: str, q: torch.Tensor, *, head_dim: int, block_size: int | None = None, need_lse: bool = False,
                 has_extra: bool = False, has_epilogue: bool = False, need_grad: bool | None = None,
                 block_sparse_plan: bool = False, extra_tensors: tuple = ()) -> Request:
    """The request of a call on `q` (grad needed when autograd is on and q or `extra_tensors` require it)."""
    if need_grad is None:
        need_grad = torch.is_grad_enabled() and (q.requires_grad or any(
            t is not None and t.requires_grad for t in extra_tensors))
    return Request(op, q.device.type, device_capability(q.device), q.dtype, head_dim, block_size, bool(need_lse),
                   bool(need_grad), bool(has_extra), bool(has_epilogue), bool(block_sparse_plan))


# ---- what a backend can run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caps:
    """The capabilities of one backend, as data (see `Backend.why_not` for how each is checked).

    devices: "cuda", "cpu" (plain PyTorch) or "cpu-interpret" (CPU only under TRITON_INTERPRET=1).
    capabilities: CUDA compute-capability majors accepted, None = any. head_dims: inclusive range and a multiple.
    block_sizes: accepted block sizes (None = any the front door accepts). backward: "self" (differentiable
    itself), the name of the backend whose backward kernel it reuses (its out and lse mean the same), or None.
    epilogue: "fused", "unfused" (applied by a plain torch pass after the kernel) or None (refused).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    capabilities: tuple[int, ...] | None = None
    head_dims: tuple[int, int, int] = (1, 256, 1)
    block_sizes: tuple[int, ...] | None = None
    lse: bool = True
    backward: str | None = "self"
    extra_keys: bool = True
    epilogue: str | None = "fused"


@dataclass(frozen=True)
class Backend:
    """One named way to run an operation: capabilities as data, plus probes for what data cannot say."""

    name: str
    op: str
    summary: str
    caps: Caps
    #: () -> reason or None: is the code there at all (an optional package, a module not built yet)
    available: Callable[[], str | None] = field(default=lambda: None, compare=False)
    #: Request -> reason or None: rules beyond the data (e.g. FA4's Q-block rule per architecture)
    rule: Callable[[Request], str | None] = field(default=lambda r: None, compare=False)
    #: chosen by `backend=None` when nothing in the table says otherwise (the portable defaults)
    default: bool = False

    def why_not(self, req: Request) -> str | None:
        """The first reason this backend cannot run `req`, or None if it can."""
        c = self.caps
        on = req.device_type
        if on == "cuda":
            if "cuda" not in c.devices:
                return f"runs on {'/'.join(c.devices)}, not CUDA"
            if c.capabilities is not None and (req.capability is None or req.capability[0] not in c.capabilities):
                cap = "sm%d%d" % req.capability if req.capability else "unknown"
                return f"needs compute capability {' or '.join(f'sm{m}x' for m in c.capabilities)}, this GPU is {cap}"
        elif on == "cpu":
            if "cpu" not in c.devices and not ("cpu-interpret" in c.devices and req.interpret):
                if "cpu-interpret" in c.devices:
                    return ("needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported; "
                            "got CPU tensors without the interpreter")
                return "needs CUDA tensors, got CPU tensors"
        elif on not in c.devices:
            return f"runs on {'/'.join(c.devices)}, not {on}"
        if req.dtype not in c.dtypes:
            return f"dtype {str(req.dtype).replace('torch.', '')} not supported (accepts {', '.join(str(d).replace('torch.', '') for d in c.dtypes)})"
        lo, hi, mult = c.head_dims
        if not (lo <= req.head_dim <= hi and req.head_dim % mult == 0):
            return f"head dim {req.head_dim} not supported (accepts {lo}..{hi}" + (f", multiples of {mult})" if mult > 1 else ")")
        if req.block_size is not None and c.block_sizes is not None and req.block_size not in c.block_sizes:
            return f"block_size {req.block_size} not supported (accepts {', '.join(map(str, c.block_sizes))})"
        if req.need_lse and not c.lse:
            return "cannot return the lse"
        if req.has_extra and not c.extra_keys:
            return "cannot take extra (text) keys"
        if req.has_epilogue and c.epilogue is None:
            return "cannot apply the out_scale/out_bias epilogue"
        if req.need_grad and c.backward is None:
            return "has no backward (forward only) and a gradient is needed"
        reason = self.available()
        if reason:
            return reason
        return self.rule(req)


def debug(msg: str, *args) -> None:
    """Debug log, skipped while torch.compile traces (Dynamo cannot trace logging calls; the eager calls log)."""
    if torch.compiler.is_compiling():
        return
    logger.debug(msg, *args)


# ---- the registry ----------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_choice_cache: dict[tuple, str] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend of its operation; clears cached choices."""
    if backend.op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {backend.op!r}")
    _REGISTRY[backend.op][backend.name] = backend
    _choice_cache.clear()
    for fn in _on_clear:
        fn()
    return backend


def backends(op: str) -> dict[str, Backend]:
    """The backends of `op` by name, in registration order."""
    return _REGISTRY[op]


def names(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY[op])


def _vocabulary(op: str) -> str:
    return ", ".join(map(repr, _REGISTRY[op]))


class BackendUnavailable(ValueError):
    """A forced backend cannot run this call (the message says why)."""


def check_name(op: str, backend: str | None, source: str = "backend") -> None:
    if backend is not None and backend not in _REGISTRY[op]:
        raise ValueError(f"{source} must be one of {_vocabulary(op)} or None (auto), got {backend!r}")


def _remember(key: tuple, name: str) -> None:
    if not torch.compiler.is_compiling():  # a traced call re-chooses (cheap); Dynamo cannot store dataclass keys
        _choice_cache[key] = name


def choose(req: Request, backend: str | None = None, exclude: frozenset[str] = frozenset()) -> str:
    """The backend to run `req` (see the module docstring); `BackendUnavailable` if a forced one cannot.

    `exclude`: names to skip in the automatic order (a backend whose per-call tensor check refused this call)."""
    source = "backend"
    if backend is None:
        env = os.environ.get(ENV_VARS[req.op], "").strip()
        if env:
            backend, source = env, ENV_VARS[req.op]
    if backend is not None:
        key = (req, backend, source)
        hit = _choice_cache.get(key)
        if hit is not None:
            return hit
        check_name(req.op, backend, source)
        reason = _REGISTRY[req.op][backend].why_not(req)
        if reason:
            raise BackendUnavailable(f"{source}={backend!r} cannot run this {req.op} call: {reason}")
        _remember(key, backend)
        return backend
    key = (req, None, kind_of(req), exclude)
    hit = _choice_cache.get(key)
    if hit is not None:
        return hit
    order = candidates(req)
    for name in order:
        reason = "excluded by its per-call check" if name in exclude else _REGISTRY[req.op][name].why_not(req)
        if reason is None:
            debug("%s backend: %s chosen for %s (order %s)", req.op, name, req.table_keys()[0], order)
            _remember(key, name)
            return name
        debug("%s backend %s refused: %s", req.op, name, reason)
    raise BackendUnavailable(f"no {req.op} backend can run this call ({req}); tried {order}")


def explain(req: Request) -> dict[str, str | None]:
    """Every backend of the operation with its reason to refuse `req` (None = capable)."""
    return {name: b.why_not(req) for name, b in _REGISTRY[req.op].items()}


_on_clear: list[Callable[[], None]] = []


def on_clear(fn: Callable[[], None]) -> None:
    """Call `fn` whenever cached choices are dropped (front doors that cache per-call plans built on a choice)."""
    _on_clear.append(fn)


def clear_cache() -> None:
    """Forget cached choices (after changing the table directory, an env var or installing a package)."""
    _choice_cache.clear()
    _table.cache_clear()
    for fn in _on_clear:
        fn()


# ---- the measured table ----------------------------------------------------------------------------------------------
def device_kind(device_name: str) -> str:
    """A table file stem from a device name: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
    name = device_name.lower().replace("nvidia", "").strip()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "unknown"


def kind_of(req: Request) -> str | None:
    if req.device_type != "cuda":
        return None
    return _kind_of_current()


@functools.cache
def _kind_of_current() -> str:
    return device_kind(torch.cuda.get_device_name())


def tuned_dir() -> Path:
    return Path(os.environ.get("DIFFATTN_TUNED_DIR") or TUNED_DIR)


@functools.cache
def _table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    return parse_table(p.read_text(), source=str(p))


def parse_table(text: str, source: str = "table") -> dict:
    """Validate a tuned table: `{"device": str, "ops": {op: {key: {"order": [names...], ...}}}}`.

    Unknown operations or backend names are errors (a typo would silently fall back to the default)."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("ops", {}), dict):
        raise ValueError(f"{source}: a tuned table is a JSON object with an 'ops' object")
    for op, rows in data.get("ops", {}).items():
        if op not in _REGISTRY:
            raise ValueError(f"{source}: unknown op {op!r} (known: {OPS})")
        if not isinstance(rows, dict):
            raise ValueError(f"{source}: ops.{op} must map keys like 'bf16/d128/b128' to rows")
        for key, row in rows.items():
            order = row.get("order") if isinstance(row, dict) else None
            if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
                raise ValueError(f"{source}: ops.{op}.{key}.order must be a list of backend names")
            bad = [n for n in order if n not in _REGISTRY[op]]
            if bad:
                raise ValueError(f"{source}: ops.{op}.{key}.order names unknown backends {bad} (known: {_vocabulary(op)})")
    return data


def table_order(req: Request) -> list[str]:
    """The measured order of backends for `req` on this device kind, fastest first ([] where the table is silent)."""
    kind = kind_of(req)
    if kind is None:
        return []
    rows = _table(str(tuned_dir() / f"{kind}.json")).get("ops", {}).get(req.op, {})
    row = next((rows[k] for k in req.table_keys() if k in rows), None)
    return list(row["order"]) if row else []


def candidates(req: Request) -> list[str]:
    """The order `choose` tries for `backend=None`: the table's, then the portable defaults."""
    order = table_order(req)
    for name, b in _REGISTRY[req.op].items():
        if b.default and name not in order:
            order.append(name)
    return order


# ---- probes ----------------------------------------------------------------------------------------------------------
@functools.cache
def module_missing(module: str, what: str) -> str | None:
    """None if `module` imports, else a reason naming what is missing (cached: import once)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{what} is not importable here ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    except Exception as e:  # a broken optional install must not break the front door
        return f"{what} failed to import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def _triton_missing() -> str | None:
    return None if triton_importable() else "the triton package is not importable here"


def _fa4_missing() -> str | None:
    return module_missing("flash_attn.cute", "FlashAttention-4 (pip install 'diffattn[fa4]')")


def _gluon_missing() -> str | None:
    reason = module_missing("triton.experimental.gluon", "Triton's Gluon dialect")
    if reason:
        return reason
    try:
        spec = importlib.util.find_spec(GLUON_MODULE)
    except ImportError:
        spec = None
    if spec is None:
        return "not built (diffattn/kernels/block_sparse/gluon_fwd.py is absent)"
    return module_missing(GLUON_MODULE, "the Gluon forward (diffattn/kernels/block_sparse/gluon_fwd.py)")


def _gluon_rule(req: Request) -> str | None:
    """The Gluon module's own `unsupported_reason` needs tensors; the front door asks it per call (op.py)."""
    return None


def _fa4_block_sparse_rule(req: Request) -> str | None:
    major = req.capability[0] if req.capability else None
    if major == 9:
        # FA4's sm90 forward fits its tile to the sparse block: tile_n = KV block, tile_m divides the Q block;
        # head dims up to 128 keep 128x128 tiles (larger ones use tile_n 112/80, which a 128 block cannot fit).
        if req.head_dim > 128:
            return f"FA4's sm90 block-sparse forward fits block 64/128 tiles only for head dim <= 128, got {req.head_dim}"
        return None
    if major == 10:
        return ("FA4's sm100 block-sparse forward wants 256-row Q blocks (q_stage 2 x 128); not wired up or tested "
                "here (no sm100 machine)")
    return f"FA4 block-sparse is for sm90 here, this GPU is sm{major}x"


def _flex_rule(req: Request) -> str | None:
    if req.need_grad and req.device_type == "cpu":
        return "FlexAttention has no backward on CPU (eager forward only)"
    return None


def _flex_missing() -> str | None:
    return module_missing("torch.nn.attention.flex_attention", "torch FlexAttention")


# ---- the declarations --------------------------------------------------------------------------------------------------
_GPU_TRITON = Caps(devices=("cuda", "cpu-interpret"), dtypes=KERNEL, head_dims=(1, 256, 1))

register(Backend("triton", "block_sparse", "our Triton forward/backward (portable; TMA on sm90+)", _GPU_TRITON,
                 available=_triton_missing, default=True))
register(Backend("gluon", "block_sparse", "Gluon (Triton's Hopper dialect) forward; backward by triton",
                 Caps(devices=("cuda",), dtypes=HALF, capabilities=(9,), head_dims=(16, 256, 16),
                      backward="triton", epilogue="unfused"),
                 available=_gluon_missing, rule=_gluon_rule))
register(Backend("fa4", "block_sparse", "FlashAttention-4 CuTe-DSL block-sparse forward; backward by triton",
                 Caps(devices=("cuda",), dtypes=HALF, capabilities=(9, 10), head_dims=(8, 256, 8),
                      block_sizes=(64, 128), backward="triton", epilogue="unfused"),
                 available=_fa4_missing, rule=_fa4_block_sparse_rule))
register(Backend("flex", "block_sparse", "torch FlexAttention on the same block lists (a real mask_mod); its own backward",
                 Caps(devices=("cuda", "cpu"), dtypes=ANY, head_dims=(16, 256, 1), epilogue="unfused"),
                 available=_flex_missing, rule=_flex_rule))
register(Backend("blocked", "block_sparse", "plain PyTorch, one query block at a time (the CPU path)",
                 Caps(devices=("cuda", "cpu"), dtypes=ANY), default=True))
register(Backend("reference", "block_sparse", "plain PyTorch over the whole masked score matrix (ground truth)",
                 Caps(devices=("cuda", "cpu"), dtypes=ANY)))

register(Backend("triton", "neighborhood", "our Triton forward/backward (TMA boxes on sm90+)",
                 Caps(devices=("cuda", "cpu-interpret"), dtypes=KERNEL, epilogue=None),
                 available=_triton_missing, default=True))
#: the neighborhood rule's refusal for a plan that is not exactly block-sparse (the front door replaces it with the
#: plan's own reason, `neighborhood.lowering.lowering_reason`)
NOT_BLOCK_SPARSE = "the neighborhood plan is not exactly block-sparse on tile-permuted tokens"


def _lowered_rule(name: str) -> Callable[[Request], str | None]:
    """Neighborhood through block-sparse backend `name` (neighborhood/lowering.py): only exactly block-sparse plans
    (the front door sets `block_sparse_plan` and `block_size`), and only where that block-sparse backend can run."""

    def rule(req: Request) -> str | None:
        if not req.block_sparse_plan or req.block_size is None:
            return NOT_BLOCK_SPARSE
        inner = dataclasses.replace(req, op="block_sparse", has_epilogue=False, block_sparse_plan=False)
        reason = _REGISTRY["block_sparse"][name].why_not(inner)
        return f"block-sparse backend {name!r} refuses the lowered call: {reason}" if reason else None

    return rule


register(Backend("fa4", "neighborhood", "FlashAttention-4 block-sparse on tile-permuted tokens (exactly block-sparse plans)",
                 Caps(devices=("cuda",), dtypes=HALF, capabilities=(9,), head_dims=(8, 128, 8), backward="triton",
                      epilogue=None),
                 available=_fa4_missing, rule=_lowered_rule("fa4")))
register(Backend("gluon", "neighborhood", "our Gluon block-sparse forward on tile-permuted tokens (exactly block-sparse plans)",
                 Caps(devices=("cuda",), dtypes=HALF, capabilities=(9,), head_dims=(16, 256, 16), backward="triton",
                      epilogue=None),
                 available=_gluon_missing, rule=_lowered_rule("gluon")))
register(Backend("blocked", "neighborhood", "plain PyTorch by query tiles over their key boxes (the CPU path)",
                 Caps(devices=("cuda", "cpu"), dtypes=ANY, epilogue=None), default=True))
register(Backend("reference", "neighborhood", "dense [N, N] mask in plain PyTorch (ground truth, small problems)",
                 Caps(devices=("cuda", "cpu"), dtypes=ANY, epilogue=None)))
