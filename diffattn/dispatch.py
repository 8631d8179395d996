"""diffattn methods as Diffusers attention backends (`diffusers.models.attention_dispatch`).

Diffusers' own processors (Wan, HunyuanVideo, FLUX, LTX-Video, Qwen-Image, ...) all end in `dispatch_attention_fn`,
which calls the backend registered under the processor's `_attention_backend` name. Registering a backend
`diffattn_<method>` at run time (as NVIDIA ModelOpt registers its own) lets a method run through a model's *stock*
processors, so it works on DiTs that have no diffattn adapter:

    diffattn.apply(model, "radial", via="dispatcher")          # context hook + layer hooks + set_attention_backend
    diffattn.remove(model)                                     # the previous backends, exactly

The backend receives q, k, v `[B, S, H, D]` and nothing else, so the geometry comes from the per-forward context
(the same hook as the adapter route: grid from the latent shape and patch size, text length and padding from the
inputs, step from the timestep) and from a forward pre-hook on every attention module (its layer index). The role of
a call (self, cross, joint) is the adapter's for known families and is inferred from the shapes otherwise; where a
model's layout cannot be inferred, the error names the `token_layout=` entry to pass.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .call import AttentionCall, LayerInfo
from .context import (
    ContextSlot, ForwardContext, StepTracker, TokenGrid, install_context_hook, make_context_hook, remove_context_hook,
    timestep_value,
)
from .log import log_once

logger = logging.getLogger("diffattn")

PREFIX = "diffattn_"
STATE_ATTR = "_diffattn_dispatch"
# Methods that run through the dispatcher: they need only q, k, v, the layer and the per-forward context.
DISPATCH_METHODS = ("dense", "radial", "gna", "freeswim", "softpag")
# Text position in the joint sequence of the families diffattn knows (the adapters' `text_first`).
FAMILY_TEXT_FIRST = {"flux": True, "hunyuan_video": False}
LAYOUT_KEYS = ("grid", "text", "patch_size")

_local = threading.local()


def backend_name(method: str) -> str:
    return PREFIX + method


# ---- registering backends -----------------------------------------------------------------------------------------
def _backend_enum_member(value: str):
    """The `AttentionBackendName` member for `value`, added to the enum if missing (the enum is closed in Diffusers;
    `set_attention_backend` and `attention_backend` look names up in it)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    if value in AttentionBackendName._value2member_map_:
        return AttentionBackendName(value)
    member = str.__new__(AttentionBackendName, value)
    member._name_ = value.upper()
    member._value_ = value
    member.__objclass__ = AttentionBackendName
    member._sort_order_ = len(AttentionBackendName._member_names_)
    AttentionBackendName._member_names_.append(member._name_)
    AttentionBackendName._member_map_[member._name_] = member
    AttentionBackendName._value2member_map_[value] = member
    return member


def _check_inputs(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False, **kwargs
) -> None:
    """The constraints of every diffattn backend (Diffusers runs them when DIFFUSERS_ATTN_CHECKS is set; the backend
    also checks them itself, as the kernels cannot honour these arguments)."""
    if dropout_p:
        raise ValueError(f"diffattn attention backends do not support dropout (dropout_p={dropout_p}); use eval mode")
    if is_causal:
        raise ValueError("diffattn attention backends do not support is_causal=True")
    if query.shape[2] != key.shape[2] or enable_gqa:
        raise ValueError(
            f"diffattn attention backends need as many key heads as query heads (got {query.shape[2]} and "
            f"{key.shape[2]}; GQA is not supported)"
        )
    if query.device != key.device or query.dtype != key.dtype or key.dtype != value.dtype:
        raise ValueError("diffattn attention backends need query, key and value on one device with one dtype")


def register_backend(name: str, fn: Callable[..., torch.Tensor], supports_context_parallel: bool = False) -> Any:
    """Register `fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config)` as the
    Diffusers attention backend `name` (idempotent; the last registration wins). Returns the enum member."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    member = _backend_enum_member(name)
    _AttentionBackendRegistry.register(member, constraints=[_check_inputs], supports_context_parallel=False)(fn)
    if supports_context_parallel:
        _AttentionBackendRegistry._supports_context_parallel.add(member.value)
    else:
        _AttentionBackendRegistry._supports_context_parallel.discard(member.value)
    return member


def register_backends(methods: tuple[str, ...] = DISPATCH_METHODS) -> list[str]:
    """Register `diffattn_<method>` for `methods`; returns the names."""
    from .parallel import SUPPORTED

    names = []
    for method in methods:
        if method not in DISPATCH_METHODS:
            raise ValueError(
                f"method {method!r} cannot run as an attention backend; these can: {', '.join(DISPATCH_METHODS)}"
            )
        register_backend(backend_name(method), _make_backend(method), supports_context_parallel=method in SUPPORTED)
        names.append(backend_name(method))
    return names


def _make_backend(method_name: str) -> Callable[..., torch.Tensor]:
    def backend(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        _parallel_config: Any = None,
    ) -> torch.Tensor:
        _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
            attn_mask = attn_mask[:, None, None, :]  # [B, Sk] key mask, as Diffusers' native backend reads it
        current = getattr(_local, "current", None)
        if current is None or current[0].method_name != method_name:
            if method_name == "dense" and _parallel_config is None:
                return _sdpa(query, key, value, attn_mask, scale)
            raise RuntimeError(
                f"attention backend {backend_name(method_name)!r} needs the per-forward context and the layer of each "
                f"call: install it with diffattn.apply(model, {method_name!r}, via='dispatcher', ...), which sets the "
                "backend too"
            )
        install, layer = current
        call = install.describe(query, key, value, attn_mask, scale, layer, _parallel_config)
        if call is None:
            return _sdpa(query, key, value, attn_mask, scale)
        if _parallel_config is not None:
            from .parallel import parallel_attend

            # the stock processor hands a cross call the parallel config only when its keys are sharded too
            out = parallel_attend(install.runtime, call, _parallel_config, cross_keys_sharded=True)
        else:
            out = install.runtime.attend(call)
        return out.transpose(1, 2)

    backend.__name__ = f"_{PREFIX}{method_name}_attention"
    return backend


def _sdpa(query, key, value, attn_mask, scale) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


# ---- layers of any model ------------------------------------------------------------------------------------------
def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def generic_layers(model: torch.nn.Module) -> dict[str, LayerInfo]:
    """Layer positions for a model without an adapter: a block is a module path ending in a number
    (`transformer_blocks.3`); its index counts the blocks in module order. Roles are inferred per call."""
    blocks: dict[str, int] = {}
    found = []
    for path, _ in _attention_modules(model):
        parts = path.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if cut is None:
            found.append((path, None, path))
            continue
        prefix = ".".join(parts[: cut + 1])
        blocks.setdefault(prefix, len(blocks))
        found.append((path, prefix, ".".join(parts[cut + 1 :])))
    total = len(blocks)
    return {
        path: LayerInfo(
            index=-1 if prefix is None else blocks[prefix], slot=slot, path=path, role="self", num_layers=total
        )
        for path, prefix, slot in found
    }


def _uses_dispatcher(processor: Any) -> bool:
    """Whether a processor routes its attention through `dispatch_attention_fn` (legacy processors call SDPA)."""
    if processor is None or not hasattr(processor, "_attention_backend"):
        return False
    try:
        return "dispatch_attention_fn" in inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return False


# ---- the generic context reader -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What the dispatcher route cannot always infer from a model's inputs (`token_layout=` of `diffattn.apply`; `layout=` is FICGen's option).

    grid: the token grid (frames, height, width) of the video/image stream, for models whose inputs do not show it.
    text: "first" or "last": where the text sits in a joint [text; image] sequence of a model without an adapter.
    patch_size: (t, h, w) latent frames/pixels per token, when the model's config has no `patch_size`.
    """

    grid: tuple[int, int, int] | None = None
    text: str | None = None
    patch_size: tuple[int, int, int] | None = None

    @classmethod
    def from_value(cls, value: Any) -> "Layout":
        if value is None:
            return cls()
        if isinstance(value, Layout):
            return value
        if not isinstance(value, dict) or set(value) - set(LAYOUT_KEYS):
            raise ValueError(f"layout must be a dict with keys {LAYOUT_KEYS}, got {value!r}")
        grid = value.get("grid")
        if grid is not None:
            grid = tuple(int(g) for g in grid)
            if len(grid) == 2:
                grid = (1, *grid)
            if len(grid) != 3 or min(grid) < 1:
                raise ValueError(
                    f"layout['grid'] must be (frames, height, width) of positive ints, got {value['grid']!r}"
                )
        text = value.get("text")
        if text not in (None, "first", "last"):
            raise ValueError(f"layout['text'] must be 'first' or 'last', got {text!r}")
        patch = value.get("patch_size")
        if patch is not None:
            patch = tuple(int(p) for p in patch)
            if len(patch) != 3 or min(patch) < 1:
                raise ValueError(
                    f"layout['patch_size'] must be (t, h, w) of positive ints, got {value['patch_size']!r}"
                )
        return cls(grid, text, patch)


def _patch_sizes(model: torch.nn.Module, layout: Layout) -> tuple[int, int, int] | None:
    if layout.patch_size is not None:
        return layout.patch_size
    config = getattr(model, "config", {})
    p = config.get("patch_size") if hasattr(config, "get") else None
    if p is None:
        return None
    if isinstance(p, (list, tuple)):
        return (int(p[0]), int(p[1]), int(p[2])) if len(p) == 3 else (1, int(p[0]), int(p[-1]))
    pt = config.get("patch_size_t") or 1
    return int(pt), int(p), int(p)


def generic_reader(layout: Layout) -> Callable[[torch.nn.Module, dict[str, Any]], ForwardContext]:
    """The context reader for models without an adapter: the grid from a 5-D/4-D latent and the patch size, or from
    `num_frames/height/width` (LTX-Video) or `img_shapes` (Qwen-Image) inputs; text from `encoder_hidden_states`."""

    def read(model: torch.nn.Module, args: dict[str, Any]) -> ForwardContext:
        hidden = args.get("hidden_states")
        grid = None
        if layout.grid is not None:
            grid = TokenGrid(*layout.grid)
        else:
            patch = _patch_sizes(model, layout)
            if isinstance(hidden, torch.Tensor) and hidden.ndim == 5 and patch is not None:
                _, _, f, h, w = hidden.shape
                grid = TokenGrid(f // patch[0], h // patch[1], w // patch[2])
            elif isinstance(hidden, torch.Tensor) and hidden.ndim == 4 and patch is not None:
                grid = TokenGrid(1, hidden.shape[2] // patch[1], hidden.shape[3] // patch[2])
            elif all(isinstance(args.get(n), int) for n in ("num_frames", "height", "width")) and patch is not None:
                grid = TokenGrid(args["num_frames"] // patch[0], args["height"] // patch[1], args["width"] // patch[2])
            elif isinstance(args.get("img_shapes"), (list, tuple)) and args["img_shapes"]:
                shapes = args["img_shapes"]
                first = shapes[0][0] if isinstance(shapes[0], list) and len(shapes[0]) == 1 else shapes[0]
                if isinstance(first, (list, tuple)) and len(first) == 3:
                    grid = TokenGrid(*(int(x) for x in first))
        text = args.get("encoder_hidden_states")
        mask = None
        for name in ("encoder_attention_mask", "encoder_hidden_states_mask"):
            m = args.get(name)
            if isinstance(m, torch.Tensor) and m.ndim == 2:
                mask = m.bool()
        batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else 1
        return ForwardContext(
            family="generic", batch_size=batch, grid=grid,
            text_len=text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else 0,
            text_mask=mask, timestep=timestep_value(args.get("timestep")),
        )

    return read


# ---- one installation -----------------------------------------------------------------------------------------------
@dataclass
class DispatchInstall:
    """What `apply(..., via="dispatcher")` changed on one model, and how its calls are described."""

    method_name: str
    runtime: Any
    family: str | None
    layout: Layout
    slot: ContextSlot
    previous_backends: dict[str, Any]  # module path -> its processor's _attention_backend before
    previous_active: Any
    handles: list[Any] = field(default_factory=list)

    def describe(
        self, query, key, value, attn_mask, scale, layer: LayerInfo | None, parallel: Any
    ) -> AttentionCall | None:
        """The AttentionCall of one dispatcher call, as the family adapter would build it; None: run stock SDPA."""
        if layer is None:
            return None  # an attention module the adapter leaves stock (HunyuanVideo's token refiner)
        ctx = self.slot.current
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        sq, sk = q.shape[2], k.shape[2]
        world = 1
        if parallel is not None:
            from .parallel import context_parallel_config

            cp = context_parallel_config(parallel)
            world = cp.ring_degree * cp.ulysses_degree
        g = None if ctx is None else ctx.extras.get("cp_global", ctx) if parallel is not None else ctx
        key_padding = None
        is_key_mask = attn_mask is not None and attn_mask.dtype == torch.bool and attn_mask.ndim == 4
        if is_key_mask and attn_mask.shape[1:3] == (1, 1):
            key_padding = attn_mask[:, 0, 0, :]
        role, text_len, text_first = layer.role, 0, False
        if self.family is None or role not in ("self", "cross", "joint"):
            role = self._infer_role(sq, sk, g, world, layer)
        if role == "other":
            return None
        if role == "cross":
            if ctx is not None and ctx.image_len and sk == ctx.image_len and self.family == "wan":
                role = "cross_image"
            text_len = 0 if role == "cross_image" else sk
        elif role == "joint":
            # the local text count: under context parallelism the text is sharded like the image
            if parallel is not None:
                text_len = g.text_len // world if g is not None else 0
            else:
                text_len = ctx.text_len if ctx is not None else 0
            text_first = self._text_first(layer)
        visual = sq - (text_len if role == "joint" else 0)
        grid = None
        if ctx is not None and ctx.grid is not None:
            try:
                grid = ctx.grid_for_tokens(visual)
            except ValueError:
                grid = None
        info = layer if layer.role == role else replace(layer, role=role)
        return AttentionCall(
            q, k, v, info, role, ctx, grid=grid, text_len=text_len, text_first=text_first,
            attn_mask=attn_mask, key_padding=key_padding, scale=scale,
        )

    def _text_first(self, layer: LayerInfo) -> bool:
        if self.family in FAMILY_TEXT_FIRST:
            return FAMILY_TEXT_FIRST[self.family]
        if self.layout.text is None:
            raise ValueError(
                f"diffattn via='dispatcher': layer {layer.path!r} of this model attends a joint [text; image] sequence "
                "and diffattn cannot tell where the text sits; pass token_layout={'text': 'first'} or "
                "token_layout={'text': 'last'} to diffattn.apply"
            )
        return self.layout.text == "first"

    def _infer_role(self, sq: int, sk: int, g: ForwardContext | None, world: int, layer: LayerInfo) -> str:
        if sq != sk:
            return "cross"
        if g is None or g.grid is None:
            if self.method_name == "dense":
                return "other"
            raise ValueError(
                f"diffattn via='dispatcher': method {self.method_name!r} needs the token grid, and the inputs of this "
                f"{g.family if g else 'model'} forward do not show it (layer {layer.path!r}); pass "
                "token_layout={'grid': (frames, height, width)} (in tokens) or token_layout={'patch_size': (t, h, w)} to "
                "diffattn.apply"
            )
        n = sq * world
        if n == g.grid.num_tokens:
            return "self"
        if g.text_len and n == g.grid.num_tokens + g.text_len:
            return "joint"
        log_once(f"dispatch:other:{layer.path}:{n}", "diffattn via='dispatcher': layer %s attends %d tokens, not the "
                 "forward's %d video/image tokens (+%d text); it runs stock attention", layer.path, n,
                 g.grid.num_tokens, g.text_len)
        return "other"


def _pre_hook(install: DispatchInstall, layer: LayerInfo | None):
    def hook(module, args):
        _local.stack = getattr(_local, "stack", [])
        _local.stack.append(getattr(_local, "current", None))
        _local.current = (install, layer)

    return hook


def _post_hook(module, args, output):
    stack = getattr(_local, "stack", None)
    _local.current = stack.pop() if stack else None


def apply_dispatcher(
    pipe_or_model: Any,
    models: list[tuple[str, torch.nn.Module]],
    remove_previous: Callable[[], Any],
    method: str,
    layout: Any = None,
    **options: Any,
) -> Any:
    """`diffattn.apply(..., via="dispatcher")`: run `method` through the `models`' stock processors.

    `diffattn.apply` passes the pipeline's models and its own `remove` (called once the options are valid), so this
    module needs nothing from the API layer above it."""
    from .adapters import FAMILIES
    from .registry import get_method

    spec = get_method(method)
    if method not in DISPATCH_METHODS:
        raise ValueError(
            f"method {method!r} cannot run through the Diffusers dispatcher (it changes more than the attention "
            f"call); use via='adapter'. Methods for via='dispatcher': {', '.join(DISPATCH_METHODS)}"
        )
    config = spec.config_cls.from_options(**options)
    if method == "freeswim" and config.dual_path:
        raise ValueError(
            "freeswim via='dispatcher' runs its window only: pass dual_path=False (the full branch's cross-attention "
            "override needs the Wan adapter, via='adapter')"
        )
    layout = Layout.from_value(layout)
    remove_previous()  # a previous diffattn installation (either route) comes off first
    for _, model in models:
        procs = {p: proc for p, proc in model.attn_processors.items()}
        if not any(_uses_dispatcher(proc) for proc in procs.values()):
            raise ValueError(
                f"{type(model).__name__}'s attention processors do not call Diffusers' dispatch_attention_fn "
                "(they call SDPA directly), so an attention backend cannot reach them; use via='adapter'"
            )
    register_backends((method,))
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    runtime = spec.build(config)
    if not isinstance(pipe_or_model, torch.nn.Module) and hasattr(runtime, "bind_pipeline"):
        runtime.bind_pipeline(pipe_or_model)
    tracker = StepTracker()
    num_steps_getter = None
    if not isinstance(pipe_or_model, torch.nn.Module):
        pipe = pipe_or_model
        num_steps_getter = lambda: getattr(pipe, "_num_timesteps", None)  # noqa: E731
    for name, model in models:
        adapter = next((a for a in FAMILIES.values() if a.matches(model)), None)
        family = adapter.name if adapter is not None else None
        modules = _attention_modules(model)
        if adapter is not None:
            by_path = {s.path: s.layer for s in adapter.slots(model)}
        else:
            by_path = generic_layers(model)
        previous = {
            path: getattr(m.processor, "_attention_backend", None) for path, m in modules if m.processor is not None
        }
        slot = ContextSlot(family or "generic")
        install = DispatchInstall(
            method, runtime, family, layout, slot, previous, _AttentionBackendRegistry._active_backend
        )
        for path, module in modules:
            layer = by_path.get(path)
            install.handles.append(module.register_forward_pre_hook(_pre_hook(install, layer)))
            install.handles.append(module.register_forward_hook(_post_hook))
        read_inputs = adapter.read_inputs if adapter is not None else generic_reader(layout)
        signature = inspect.Signature(list(inspect.signature(type(model).forward).parameters.values())[1:])
        hook = make_context_hook(slot, tracker, read_inputs, signature, num_steps_getter, runtime)
        install_context_hook(model, hook)
        setattr(model, STATE_ATTR, install)
        _set_backend_quietly(model, backend_name(method))
        logger.info("diffattn: %s installed on %s through the dispatcher (%s, %d attention modules)",
                    method, name, family or "no adapter", len(modules))
    return pipe_or_model


def _set_backend_quietly(model: torch.nn.Module, name: str) -> None:
    """`model.set_attention_backend(name)` on this model's processors only: Diffusers also makes it the process-wide
    active backend, which would route every other model's attention (those whose processors name no backend) into
    diffattn; the processors of `model` carry the name themselves, so the active backend is put back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend(name)
    _AttentionBackendRegistry.set_active_backend(active)


def remove_dispatcher(model: torch.nn.Module) -> bool:
    """Undo `apply_dispatcher` on one model: each processor's previous backend and the registry's active backend come
    back exactly, the hooks go. Returns whether anything was installed."""
    install: DispatchInstall | None = getattr(model, STATE_ATTR, None)
    if install is None:
        return False
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for path, module in _attention_modules(model):
        proc = module.processor
        if proc is not None and hasattr(proc, "_attention_backend") and path in install.previous_backends:
            proc._attention_backend = install.previous_backends[path]
    _AttentionBackendRegistry.set_active_backend(install.previous_active)
    for handle in install.handles:
        handle.remove()
    remove_context_hook(model)
    delattr(model, STATE_ATTR)
    return True


def installed_dispatch(model: torch.nn.Module) -> DispatchInstall | None:
    return getattr(model, STATE_ATTR, None)
