"""Composition: two methods on the same layers (`diffattn.apply(pipe, ["radial", "softpag"], ...)`), and the names of
Diffusers' cache hooks for combining any method with a cache (`model.enable_cache(...)`).

What composes with what, and why:

- One *attention* method computes each call's attention (dense, radial, gna, freeswim). Two of them cannot share a
  layer: each would compute the whole attention of the call, and nothing defines combining two maps.
- A *guidance* method (softpag) perturbs chosen heads of an attention output. Composed with an attention method it
  perturbs that method's output: the chosen heads blend the sparse map toward the target,
  `(1 - u) * sparse + u * target`, and every other head, layer and role keeps the attention method's output.
- Methods that change a forward's batch (freeswim's `[window; full]` rows, softpag's perturbed rows) cannot be
  combined with each other: the second would see rows whose meaning it does not know.

Forward-level hooks run in order (the attention method's `prepare_forward` first, the guidance method's second) and
finish in reverse order. Diffusers' cache hooks (FirstBlockCache, TaylorSeer, MagCache, FasterCache, PAB) compose
with every method except freeswim (below): they skip blocks or attention calls, and diffattn's context is read from
each forward's inputs (never from counting calls), so a method's step schedule stays right when calls are skipped.
FreeSwim runs forwards of two batch sizes (dual and cached steps), which breaks a cache that compares one forward's
residuals with the previous one's; `check_cache` says so.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import MethodConfig, option
from .methods.base import AttentionMethod
from .registry import MethodSpec, get_method

# Diffusers' cache hooks by short name: (config class name in diffusers, what it skips)
CACHES: dict[str, tuple[str, str]] = {
    "fbc": ("FirstBlockCacheConfig", "whole steps' remaining blocks when the first block's residual barely changed"),
    "taylorseer": ("TaylorSeerCacheConfig", "module outputs predicted by a Taylor series between full steps"),
    "magcache": ("MagCacheConfig", "steps whose residual magnitude ratio says the output barely changes"),
    "fastercache": ("FasterCacheConfig", "attention outputs reused across steps (and the unconditional branch)"),
    "pab": ("PyramidAttentionBroadcastConfig", "attention outputs broadcast across steps, per attention type"),
}


@dataclass
class ComposedConfig(MethodConfig):
    """The validated options of each composed method, in composition order."""

    parts: dict[str, Any] = option({}, help="each composed method's validated config, by method name")

    def to_dict(self) -> dict[str, Any]:
        return {name: cfg.to_dict() for name, cfg in self.parts.items()}


class ComposedMethod(AttentionMethod):
    """An attention method, optionally wrapped by a guidance method that perturbs its output."""

    def __init__(self, config: ComposedConfig, attention: AttentionMethod, guidance: AttentionMethod | None) -> None:
        super().__init__(config)  # type: ignore[arg-type]
        self.attention = attention
        self.guidance = guidance
        self.name = "+".join(config.parts)
        if guidance is not None:
            guidance.base_attention = attention.attend
        self.parts = [m for m in (attention, guidance) if m is not None]

    def attend(self, call):
        return (self.guidance or self.attention).attend(call)

    @property
    def reorders_tokens(self) -> bool:  # type: ignore[override]
        # the guidance methods act per head on outputs, so they follow any token order the attention method runs
        return self.attention.reorders_tokens

    def prepare_forward(self, ctx, args):
        changed: dict[str, Any] = {}
        for method in self.parts:
            prepare = getattr(method, "prepare_forward", None)
            if prepare is None:
                continue
            out = prepare(ctx, {**args, **changed})
            if out:
                changed.update(out)
        return changed or None

    def finish_forward(self, ctx, output):
        for method in reversed(self.parts):
            finish = getattr(method, "finish_forward", None)
            if finish is not None:
                output = finish(ctx, output)
        return output

    def bind_pipeline(self, pipe) -> None:
        for method in self.parts:
            if hasattr(method, "bind_pipeline"):
                method.bind_pipeline(pipe)

    def __getattr__(self, name: str) -> Any:
        # what benchmarks and tools ask a method (radial's `settings`, `mask_for`; freeswim's `cache`) comes from
        # the attention method
        if name in ("attention", "guidance", "parts"):
            raise AttributeError(name)
        return getattr(self.attention, name)

    def __repr__(self) -> str:
        return f"ComposedMethod({' + '.join(repr(m) for m in self.parts)})"


def _route_options(names: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-method options: `name={...}` dicts, and flat options given to the one method that has them."""
    fields = {n: {f.name for f in dataclasses.fields(get_method(n).config_cls)} for n in names}
    routed: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in options.items():
        if key in routed:
            if not isinstance(value, dict):
                raise ValueError(f"option {key!r} names a composed method; give its options as a dict, got {value!r}")
            routed[key].update(value)
            continue
        owners = [n for n in names if key in fields[n]]
        if not owners:
            listing = "; ".join(f"{n}: {', '.join(sorted(fields[n])) or '(none)'}" for n in names)
            raise ValueError(f"unknown option {key!r} for methods {' + '.join(names)}; accepted options: {listing}")
        if len(owners) > 1:
            raise ValueError(
                f"option {key!r} belongs to several composed methods ({', '.join(owners)}); pass it per method, "
                f"e.g. {owners[0]}={{{key!r}: ...}}"
            )
        routed[owners[0]][key] = value
    return routed


def compose(methods: Sequence[str], options: dict[str, Any]) -> tuple[MethodSpec, ComposedConfig]:
    """The spec and validated config of a composition of method names (see the module docstring for the rules)."""
    names = list(methods)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"method must be a name or a list of names, got {methods!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"method list {names} names a method twice")
    if len(names) == 1:
        spec = get_method(names[0])
        return spec, spec.config_cls.from_options(**_route_options(names, options)[names[0]])
    specs = [get_method(n) for n in names]
    attention = [n for n in names if get_method(n).role != "guidance"]
    guidance = [n for n in names if get_method(n).role == "guidance"]
    if len(attention) > 1:
        raise ValueError(
            f"methods {' and '.join(attention)} cannot share a layer: each computes the whole attention of every "
            "call it handles; compose one attention method with a guidance method (softpag)"
        )
    if not attention:
        raise ValueError(f"a composition needs one attention method (dense, radial, gna, ...), got only {names}")
    if len(guidance) > 1:
        raise ValueError(f"only one guidance method can be composed, got {guidance}")
    batchers = [n for n in names if get_method(n).changes_batch]
    if len(batchers) > 1:
        raise ValueError(
            f"methods {' and '.join(batchers)} cannot share a layer: both change the forward's batch (freeswim adds "
            "the full branch's rows, softpag the perturbed pass's rows)"
        )
    families = tuple(f for f in specs[0].families if all(f in s.families for s in specs[1:]))
    if not families:
        raise ValueError(f"methods {' and '.join(names)} support no model family in common")
    routed = _route_options(names, options)
    order = attention + guidance
    config_cls = _composed_config_cls("+".join(order))
    config = config_cls({n: get_method(n).config_cls.from_options(**routed[n]) for n in order})

    def build(cfg: ComposedConfig) -> ComposedMethod:
        att = get_method(order[0]).build(cfg.parts[order[0]])
        gd = get_method(order[1]).build(cfg.parts[order[1]]) if len(order) > 1 else None
        return ComposedMethod(cfg, att, gd)

    spec = MethodSpec(
        name="+".join(order), summary=" + ".join(s.summary for s in specs), config_cls=config_cls,
        families=families, build=build,  # type: ignore[arg-type]
    )
    return spec, config


@functools.cache
def _composed_config_cls(name: str) -> type[ComposedConfig]:
    """One `ComposedConfig` subclass per composition: a spec stamps its name on its config class, so two
    compositions (radial+softpag, then rectified+softpag) in one process need two classes."""
    return type(f"ComposedConfig_{name.replace('+', '_')}", (ComposedConfig,), {"__module__": __name__})


def cache_config(name: str, **options: Any) -> Any:
    """A Diffusers cache config by short name (`CACHES`), for `model.enable_cache(...)`."""
    if name not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {name!r}")
    import diffusers

    cls = getattr(diffusers, CACHES[name][0], None)
    if cls is None:
        raise ValueError(f"cache {name!r} needs diffusers.{CACHES[name][0]}, which this Diffusers version lacks")
    return cls(**options)


def check_cache(method: str | Sequence[str]) -> None:
    """Raise if a Diffusers cache hook cannot be combined with `method` (see the module docstring)."""
    names = [method] if isinstance(method, str) else list(method)
    bad = [n for n in names if not get_method(n).works_with_caches]
    if bad:
        raise ValueError(
            f"method {bad[0]!r} cannot be combined with a Diffusers cache hook: it runs forwards of two batch sizes "
            "(the full branch's steps and the cached steps), and a cache compares each forward with the previous one"
        )


def enable_cache(pipe_or_model: Any, name: str, method: str | Sequence[str] | None = None, **options: Any) -> Any:
    """`enable_cache` on the pipeline's transformer(s) (or the model) with the cache `name`, after checking it
    composes with `method`."""
    if method is not None:
        check_cache(method)
    models = [pipe_or_model] if isinstance(pipe_or_model, torch.nn.Module) else [
        getattr(pipe_or_model, n) for n in ("transformer", "transformer_2")
        if isinstance(getattr(pipe_or_model, n, None), torch.nn.Module)]
    if not models:
        raise ValueError(f"enable_cache needs a pipeline with a transformer or a model, got {type(pipe_or_model).__name__}")
    for model in models:
        if not hasattr(model, "enable_cache"):
            raise ValueError(f"{type(model).__name__} has no enable_cache (Diffusers' CacheMixin)")
        model.enable_cache(cache_config(name, **options))
    return pipe_or_model
