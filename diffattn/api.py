"""`apply` and `remove`: install a method's processors and the context hook on a pipeline or model, and undo it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import family_of
from .context import ContextSlot, StepTracker, install_context_hook, make_context_hook, remove_context_hook
from .parallel import bind_model
from .registry import get_method
from .token_order import install_token_stream, remove_token_stream

logger = logging.getLogger("diffattn")

PIPELINE_COMPONENTS = ("transformer", "transformer_2", "unet")
_STATE_ATTR = "_diffattn_state"


@dataclass
class InstalledState:
    """What `apply` changed on one model, so that `remove` restores it exactly."""

    method: str
    options: dict[str, Any]
    family: str
    original_processors: dict[str, Any]
    slot: ContextSlot
    tracker: StepTracker
    runtime: Any = None
    replaced: list[str] = field(default_factory=list)


def _models_of(pipe_or_model: Any) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(pipe_or_model, torch.nn.Module):
        # torch.compile wraps the model; the processors live on the original module.
        return [("model", getattr(pipe_or_model, "_orig_mod", pipe_or_model))]
    found = [
        (name, getattr(pipe_or_model, name))
        for name in PIPELINE_COMPONENTS
        if isinstance(getattr(pipe_or_model, name, None), torch.nn.Module)
    ]
    if not found:
        raise ValueError(
            f"apply() needs a Diffusers pipeline with a transformer, transformer_2 or unet, or such a model; got "
            f"{type(pipe_or_model).__name__}"
        )
    return found


def apply(
    pipe_or_model: Any,
    method: str | list[str] | tuple[str, ...],
    *,
    via: str = "adapter",
    token_layout: Any = None,
    **options: Any,
) -> Any:
    """Install `method` (with validated `options`) on a pipeline's transformer(s)/UNet or on a model.

    `via="adapter"` (default) installs diffattn's processors of the model's family; `via="dispatcher"` keeps the
    stock processors and runs the method as a Diffusers attention backend (any DiT whose processors call
    `dispatch_attention_fn`; `token_layout=` fills in what its inputs do not show, see `diffattn.dispatch.Layout`).
    `method` may be a list of two methods that compose (an attention method and a guidance method, e.g.
    `["radial", "softpag"]`; rules in `diffattn/compose.py`); options then go to the method that has them, or per
    method as `radial={...}`. Applying again replaces the previous method; `remove` restores the stock processors
    exactly. Returns `pipe_or_model` for chaining.
    """
    if via == "dispatcher":
        if isinstance(method, (list, tuple)):
            raise ValueError("via='dispatcher' takes one method; composed methods run through the adapters (via='adapter')")
        from .dispatch import apply_dispatcher

        models = _models_of(pipe_or_model)
        return apply_dispatcher(pipe_or_model, models, lambda: remove(pipe_or_model), method, layout=token_layout, **options)
    if via != "adapter":
        raise ValueError(f"via must be 'adapter' or 'dispatcher', got {via!r}")
    if token_layout is not None:
        raise ValueError("token_layout= is for via='dispatcher' (the adapters know their family's token layout)")
    if not isinstance(method, (list, tuple)):
        spec = get_method(method)
        config = spec.config_cls.from_options(**options)
    else:
        from .compose import compose

        spec, config = compose(method, options)
        method = spec.name
    models = _models_of(pipe_or_model)
    adapters = []
    for name, model in models:
        adapter = family_of(model)
        if adapter.name not in spec.families:
            raise ValueError(
                f"method {method!r} does not support {type(model).__name__} ({adapter.name}); it supports the "
                f"families: {', '.join(spec.families)}"
            )
        adapters.append(adapter)

    remove(pipe_or_model)
    runtime = spec.build(config)
    if not isinstance(pipe_or_model, torch.nn.Module):
        runtime.bind_pipeline(pipe_or_model)  # a no-op unless the method reads the pipeline (SoftPAG: its CFG flag)
    tracker = StepTracker()
    num_steps_getter = None
    if not isinstance(pipe_or_model, torch.nn.Module):
        pipe = pipe_or_model
        num_steps_getter = lambda: getattr(pipe, "_num_timesteps", None)  # noqa: E731 (set by Diffusers pipelines)
    for (name, model), adapter in zip(models, adapters):
        slot = ContextSlot(adapter.name)
        original = dict(model.attn_processors)
        new = dict(original)
        replaced = []
        for s in adapter.slots(model):
            key = f"{s.path}.processor"
            if key not in new:
                raise RuntimeError(f"internal: attention module {s.path} not found among the model's processors")
            new[key] = adapter.processor_cls(runtime, layer=s.layer, slot=slot)
            replaced.append(s.path)
        model.set_attn_processor(new)
        bind_model(model)  # under enable_parallelism, the new processors take the model's parallel config
        hook = make_context_hook(
            slot, tracker, adapter.read_inputs, adapter.forward_signature(model), num_steps_getter, runtime
        )
        install_context_hook(model, hook)
        if runtime.reorders_tokens and adapter.token_stream is not None:
            install_token_stream(model, adapter.token_stream, lambda slot=slot: slot.current)
        setattr(
            model,
            _STATE_ATTR,
            InstalledState(method, config.to_dict(), adapter.name, original, slot, tracker, runtime, replaced),
        )
        logger.info("diffattn: %s installed on %s (%s, %d attention modules)", method, name, adapter.name, len(replaced))
    return pipe_or_model


def remove(pipe_or_model: Any) -> Any:
    """Restore the exact processors that were there before `apply`, and remove the context hook. A no-op on a
    pipeline or model without diffattn."""
    from .dispatch import remove_dispatcher

    for _, model in _models_of(pipe_or_model):
        remove_dispatcher(model)
        state: InstalledState | None = getattr(model, _STATE_ATTR, None)
        if state is None:
            continue
        model.set_attn_processor(dict(state.original_processors))
        bind_model(model)
        remove_context_hook(model)
        remove_token_stream(model)
        delattr(model, _STATE_ATTR)
    return pipe_or_model


def replace_runtime(pipe_or_model: Any, runtime: Any) -> None:
    """Route every installed diffattn processor to `runtime` (an object with the method's `attend(call)`), keeping
    the context hook: how benchmarks and probes wrap a method (timers, error probes, the energy probe)."""
    for _, model in _models_of(pipe_or_model):
        if getattr(model, _STATE_ATTR, None) is None:
            raise ValueError(f"replace_runtime: no diffattn method is installed on {type(model).__name__}; apply one first")
        for proc in model.attn_processors.values():
            if hasattr(proc, "method"):
                proc.method = runtime


def installed(model: torch.nn.Module) -> InstalledState | None:
    """The diffattn installation on `model`, if any (for inspection and tests)."""
    return getattr(model, _STATE_ATTR, None)
