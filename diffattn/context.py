"""Per-forward state that attention processors need and Diffusers does not pass them (DESIGN.md, layer 4).

A forward pre-hook on the transformer/UNet (Diffusers' `HookRegistry`) reads the model inputs (latent shape,
patch size, text length and padding mask, timestep) and publishes a `ForwardContext` that every processor of that
model reads. The denoising step is derived from the timestep, never from counting calls: caching hooks
(FasterCache, PyramidAttentionBroadcast, FirstBlockCache) skip attention calls, and CFG runs one or two passes per
step. When the pipeline wraps the call in `model.cache_context(name, step_index=...)` (Wan does), the given step
index and pass name are used as they are.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .call import ForwardContext
from .geometry import TokenGrid

logger = logging.getLogger("diffattn")

__all__ = [
    "ContextSlot", "ForwardContext", "StepTracker", "TokenGrid", "install_context_hook", "make_context_hook",
    "remove_context_hook", "timestep_value",
]


class StepTracker:
    """Derives the denoising step index from the sequence of timesteps a model (or two experts) sees.

    Rules, in order: a step index given by the pipeline's cache context wins; otherwise a timestep lower than the
    last one starts the next step, an equal one is another pass of the same step (CFG as separate calls), and a
    higher one starts a new generation at step 0 (diffusion timesteps decrease within one generation). Shared by
    all models of one pipeline, so Wan 2.2's switch between experts does not reset it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last_timestep: float | None = None
        self.step_index = -1
        self.pass_index = 0

    def update(self, timestep: float | None, given_step: int | None = None) -> tuple[int, int]:
        """Record one forward; returns `(step_index, pass_index)`."""
        if given_step is not None:
            new_step = given_step != self.step_index
            self.step_index = given_step
        elif timestep is None or self.last_timestep is None:
            new_step = True
            self.step_index = 0 if self.last_timestep is None or timestep is None else self.step_index + 1
        elif math.isclose(timestep, self.last_timestep, rel_tol=1e-6, abs_tol=1e-6):
            new_step = False
        elif timestep < self.last_timestep:
            new_step = True
            self.step_index += 1
        else:
            new_step = True
            self.step_index = 0
        self.pass_index = 0 if new_step else self.pass_index + 1
        self.last_timestep = timestep
        return self.step_index, self.pass_index


def timestep_value(timestep: Any) -> float | None:
    """The scalar that orders steps: the largest entry (Wan 2.2 TI2V passes per-token timesteps, 0 on the
    conditioning frame). One host read per model forward, never per attention call."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().max())
    return float(timestep)


class ContextSlot:
    """Holds the current `ForwardContext` of one model; processors keep a reference to it."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.current: ForwardContext | None = None


def _load_hooks():
    from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

    return HookRegistry, ModelHook, StateManager


HOOK_NAME = "diffattn_context"


class _NoState:
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


def make_context_hook(
    slot: ContextSlot,
    tracker: StepTracker,
    read_inputs: Callable[[torch.nn.Module, dict[str, Any]], ForwardContext],
    forward_signature: Any,
    num_steps_getter: Callable[[], int | None] | None = None,
    method: Any = None,
):
    """Build the forward pre-hook that fills `slot` before every forward of the model.

    `read_inputs(model, bound_arguments)` is the family adapter's reader of the forward's inputs. `method` (an
    `AttentionMethod`, or None) gets its forward hooks called: `prepare_forward(ctx, arguments) -> changed | None`
    after the context is read, on the forward's bound arguments, and `finish_forward(ctx, output) -> output` on the
    forward's output (no-ops unless the method changes whole forwards, as FreeSwim and SoftPAG do).
    """
    return _context_hook_class()(slot, tracker, read_inputs, forward_signature, num_steps_getter, method)


@functools.cache
def _context_hook_class() -> type:
    """The hook class, defined once. Its state lives on the instance, not in a closure: a class made per call sits in
    a reference cycle (as every class does) and would keep the method and its caches (FreeSwim's cross-attention
    cache: GiBs) alive after `diffattn.remove` until the garbage collector happens to run."""
    _, ModelHook, StateManager = _load_hooks()

    class DiffattnContextHook(ModelHook):
        # Stateful so that Diffusers' `cache_context(name, step_index=...)` reaches us through a StateManager.
        _is_stateful = True

        def __init__(self, slot, tracker, read_inputs, forward_signature, num_steps_getter, method) -> None:
            super().__init__()
            self.cache_state = StateManager(_NoState)
            self.slot, self.tracker, self.read_inputs = slot, tracker, read_inputs
            self.forward_signature, self.num_steps_getter = forward_signature, num_steps_getter
            self.method = method

        def pre_forward(self, module, *args, **kwargs):
            bound = self.forward_signature.bind_partial(*args, **kwargs)
            ctx = self.read_inputs(module, dict(bound.arguments))
            cache_ctx = self.cache_state._context
            given_step = getattr(cache_ctx, "step_index", None) if cache_ctx is not None else None
            step, pass_index = self.tracker.update(ctx.timestep, given_step)
            num_steps = getattr(cache_ctx, "num_inference_steps", None) if cache_ctx is not None else None
            if num_steps is None and self.num_steps_getter is not None:
                num_steps = self.num_steps_getter()
            self.slot.current = replace(
                ctx,
                step_index=step,
                pass_index=pass_index,
                num_steps=num_steps,
                pass_name=getattr(cache_ctx, "name", None) if cache_ctx is not None else None,
            )
            self.slot.current.extras["module"] = module  # methods that re-run the forward (SoftPAG's separate pass)
            if self.method is not None:
                changed = self.method.prepare_forward(self.slot.current, dict(bound.arguments))
                if changed is not None:
                    bound.arguments.update(changed)
                    return bound.args, bound.kwargs
            return args, kwargs

        # The context is kept after the forward: gradient checkpointing re-runs the blocks during backward, after
        # the forward returned, and their processors need the same context again.
        def post_forward(self, module, output):
            if self.method is not None:
                return self.method.finish_forward(self.slot.current, output)
            return output

        def reset_state(self, module):
            self.tracker.reset()
            self.slot.current = None
            return module

        def release(self) -> None:
            """Drop every reference to the method and its state (called when the hook is removed)."""
            self.slot = self.tracker = self.read_inputs = self.forward_signature = None
            self.num_steps_getter = self.method = None

    return DiffattnContextHook


def _inner_forward_attr(fn_ref: Any) -> str:
    """The attribute through which a hook's fn_ref reaches the next-inner forward (`original_forward` for hooks
    that replace the forward with their own `new_forward`)."""
    return "original_forward" if fn_ref.original_forward is not None else "forward"


def install_context_hook(model: torch.nn.Module, hook: Any) -> None:
    """Register `hook` as the innermost hook of `model`, so it reads the inputs the model's own forward receives.

    Other model-level hooks may change the inputs (FasterCache cuts the batch-2 CFG input to batch 1 on some steps);
    registered the usual way (outermost) the context would describe the wrong batch. Diffusers' `HookRegistry` only
    appends hooks outermost, so the chain is spliced here as if ours had been registered first; hooks registered
    later wrap it as usual.
    """
    from diffusers.hooks.hooks import HookFunctionReference

    HookRegistry, _, _ = _load_hooks()
    remove_context_hook(model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if not registry._hook_order:
        registry.register_hook(hook, HOOK_NAME)
        return
    first = registry._fn_refs[0]
    attr = _inner_forward_attr(first)
    fn_ref = HookFunctionReference()
    fn_ref.pre_forward, fn_ref.post_forward, fn_ref.forward = hook.pre_forward, hook.post_forward, getattr(first, attr)

    def innermost(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = fn_ref.pre_forward(model, *args, **kwargs)
        return fn_ref.post_forward(model, fn_ref.forward(*args, **kwargs))

    setattr(first, attr, innermost)
    hook.fn_ref = fn_ref
    registry.hooks[HOOK_NAME] = hook
    registry._hook_order.insert(0, HOOK_NAME)
    registry._fn_refs.insert(0, fn_ref)


def remove_context_hook(model: torch.nn.Module) -> None:
    """Unlink our hook wherever it sits in the chain and restore the forward it wrapped."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry.hooks:
        return
    index = registry._hook_order.index(HOOK_NAME)
    fn_ref = registry._fn_refs[index]
    if index == len(registry._hook_order) - 1:
        model.forward = fn_ref.forward
    else:
        outer = registry._fn_refs[index + 1]
        setattr(outer, _inner_forward_attr(outer), fn_ref.forward)
    hook = registry.hooks.pop(HOOK_NAME)
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)
    # Diffusers links hook and function reference both ways (a cycle only the garbage collector frees): cut the
    # links, so that the method and what it holds (FreeSwim's cache: GiBs of GPU memory) are freed right now.
    fn_ref.pre_forward = fn_ref.post_forward = fn_ref.forward = fn_ref.original_forward = None
    hook.fn_ref = None
    hook.release()
