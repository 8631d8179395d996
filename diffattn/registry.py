"""The method registry: the built-in methods by module name, each declaring itself in a module-level `SPEC`.

Adding a method is one module `diffattn/methods/<name>.py` with `SPEC = MethodSpec(...)` (see
`diffattn.methods.spec`) and its name in `BUILTIN_METHODS` below (the one registration line).
"""

from __future__ import annotations

import importlib
from typing import Any

from .families import FAMILY_NAMES
from .methods.base import AttentionMethod
from .methods.spec import MethodSpec

__all__ = [
    "ALL_FAMILIES", "BUILTIN_METHODS", "PLANNED", "MethodSpec", "available_methods", "build_method", "get_method",
    "method_specs", "register_method",
]

# Modules of `diffattn.methods` holding one `SPEC` each, in the order `available_methods()` lists them.
BUILTIN_METHODS: tuple[str, ...] = ("dense", "radial", "rectified", "freeswim", "gna", "agent", "softpag", "ficgen")

ALL_FAMILIES = FAMILY_NAMES  # every model family (the dense method's)

# Methods of DESIGN.md that are not implemented yet (removed from here when they land), with the families they will support (for `diffattn methods`).
PLANNED: dict[str, tuple[str, tuple[str, ...]]] = {
}

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a method (the built-ins register themselves from `BUILTIN_METHODS`; plugins may call this)."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method needs a MethodSpec, got {type(spec).__name__}")
    _REGISTRY[spec.name] = spec
    return spec


def available_methods() -> list[str]:
    """Names of the methods that can be applied now, in registration order."""
    return list(_REGISTRY)


def method_specs() -> list[MethodSpec]:
    """The specs of the methods that can be applied now, in registration order."""
    return list(_REGISTRY.values())


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in PLANNED:
        raise ValueError(
            f"method {name!r} is not available yet in this version of diffattn; available: {', '.join(_REGISTRY)}"
        )
    raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")


def build_method(name: str, **options: Any) -> AttentionMethod:
    spec = get_method(name)
    return spec.build(spec.config_cls.from_options(**options))


def _register_builtins() -> None:
    for module_name in BUILTIN_METHODS:
        module = importlib.import_module(f"{__package__}.methods.{module_name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, MethodSpec):
            raise RuntimeError(f"diffattn.methods.{module_name} defines no SPEC = MethodSpec(...)")
        if spec.name != module_name:
            raise RuntimeError(f"diffattn.methods.{module_name}'s SPEC is named {spec.name!r}; name the module after it")
        register_method(spec)


_register_builtins()
