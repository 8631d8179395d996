"""The method registry: each method declares its options, the families it supports and how it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import MethodConfig
from .methods.base import AttentionMethod

ALL_FAMILIES = ("wan", "hunyuan_video", "cogvideox", "flux", "sd3", "unet")

# Methods of DESIGN.md that are not implemented yet (removed from here when they land), with the families they will support (for `diffattn methods`).
PLANNED: dict[str, tuple[str, tuple[str, ...]]] = {
    "rectified": ("top-p block selection + pooled-attention rectification", ("wan", "hunyuan_video", "cogvideox", "flux")),
    "agent": ("agent tokens + agent attention (AgentSD)", ("unet", "flux", "sd3")),
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    config_cls: type[MethodConfig]
    families: tuple[str, ...]
    build: Callable[[MethodConfig], AttentionMethod]


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    unknown = set(spec.families) - set(ALL_FAMILIES)
    if unknown:
        raise ValueError(f"method {spec.name!r} names unknown families {sorted(unknown)}; known: {ALL_FAMILIES}")
    _REGISTRY[spec.name] = spec
    return spec


def available_methods() -> list[str]:
    """Names of the methods that can be applied now, in registration order."""
    return list(_REGISTRY)


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
    from .methods.dense import DenseConfig, DenseMethod
    from .methods.ficgen import FICGenConfig, FICGenMethod
    from .methods.freeswim import FreeSwimConfig, FreeSwimMethod
    from .methods.neighborhood import GNAConfig, GNAMethod
    from .methods.radial import RadialConfig, RadialMethod
    from .methods.softpag import SoftPAGConfig, SoftPAGMethod

    register_method(
        MethodSpec(
            name="dense",
            summary="full attention through diffattn's path (equals the stock processors; the A/B baseline)",
            config_cls=DenseConfig,
            families=ALL_FAMILIES,
            build=DenseMethod,
        )
    )
    register_method(
        MethodSpec(
            name="radial",
            summary="Radial Attention: static O(n log n) spatio-temporal block mask, dense warm-up steps and layers",
            config_cls=RadialConfig,
            families=("wan", "hunyuan_video", "cogvideox"),
            build=RadialMethod,
        )
    )
    register_method(
        MethodSpec(
            name="gna",
            summary="generalized neighborhood attention (window, stride, dilation, causal) over the token grid",
            config_cls=GNAConfig,
            families=("wan", "hunyuan_video", "cogvideox", "flux", "sd3"),
            build=GNAMethod,
        )
    )
    register_method(
        MethodSpec(
            name="freeswim",
            summary="FreeSwim: inward window + full-branch cross-attention override + cache, training-free high-res",
            config_cls=FreeSwimConfig,
            families=("wan",),
            build=FreeSwimMethod,
        )
    )
    register_method(
        MethodSpec(
            name="softpag",
            summary="SoftPAG: head-level soft perturbed-attention guidance (HeadHunter heads, Diffusers PAG parity)",
            config_cls=SoftPAGConfig,
            families=("sd3", "flux", "unet", "wan", "hunyuan_video"),
            build=SoftPAGMethod,
        )
    )
    register_method(
        MethodSpec(
            name="ficgen",
            summary="FICGen: frequency-aware regional (layout) attention; training-free or with trained modules",
            config_cls=FICGenConfig,
            families=("unet",),
            build=FICGenMethod,
        )
    )


_register_builtins()
