"""`MethodSpec`: everything the rest of diffattn knows about a method, declared once in the method's own module.

Each built-in method module (`diffattn/methods/<name>.py`) defines a module-level `SPEC = MethodSpec(...)`; the
registry imports the modules it lists (`registry.BUILTIN_METHODS`) and reads their `SPEC`. The name is declared
only here: the spec stamps it on the config class (`method_name`) and on the method class (`name`). The CLI, the
app, the benchmarks and the Mask explorer read specs and never branch on method names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..config import MethodConfig
from ..families import FAMILY_NAMES
from ..geometry import TokenGrid
from .base import AttentionMethod

if TYPE_CHECKING:
    from ..masks.preview import MaskView

Role = Literal["speed", "guidance"]
ROLES: tuple[str, ...] = ("speed", "guidance")

__all__ = ["ROLES", "DemoGeometry", "MaskPreview", "MethodSpec", "Role"]


@dataclass(frozen=True)
class DemoGeometry:
    """What a method's demo options depend on (the quality bench on the bundled demo models): the family, the
    token grid seen by attention, the step count and the depth."""

    family: str
    grid: TokenGrid
    steps: int
    num_layers: int


@dataclass(frozen=True)
class MaskPreview:
    """How the Mask explorer (`diffattn mask`, the app's tab) draws a method.

    draw(label, grid, family, config, extras) -> MaskView: `grid` is the token grid (2 or 3 ints), `config` the
        method's config built from the mask options given, `extras` the explorer-only options given.
    options: the config options that shape the mask (the explorer accepts only these of the config's).
    extras: explorer-only options, name -> help (tile shapes, a layer index); parsed as structured CLI values.
    """

    draw: Callable[..., MaskView]
    options: tuple[str, ...]
    extras: Mapping[str, str] = field(default_factory=dict)


def _one_step(config: MethodConfig) -> int:
    return 1


def _no_demo_options(geometry: DemoGeometry) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """One method, as every tool sees it.

    name: the method's name (`diffattn.apply(pipe, name)`), declared only here.
    summary: one line for `diffattn methods`, the app and the docs.
    config_cls: its options (a `MethodConfig` dataclass).
    families: the model families it supports (names from `diffattn.families.FAMILY_NAMES`).
    build: config -> the runtime `AttentionMethod` (usually the method class itself).
    role: "speed" (an approximation of dense attention, compared against it) or "guidance" (meant to differ).
    demo_options: DemoGeometry -> options that suit the small demo models (quality bench); default: none.
    preview_mask: how the Mask explorer draws it (`MaskPreview`), or None (no picture).
    schedule_period: config -> steps after which the per-step work repeats (step bench); default 1.
    pipeline_only: a reason why one bare forward does not show its per-step cost (the step bench then asks for
        `--pipeline`), or None.
    cli_flags: options that workflows built around this method give their own `--flag` (`render --long`).
    """

    name: str
    summary: str
    config_cls: type[MethodConfig]
    families: tuple[str, ...]
    build: Callable[[MethodConfig], AttentionMethod]
    role: Role = "speed"
    demo_options: Callable[[DemoGeometry], dict[str, Any]] = _no_demo_options
    preview_mask: MaskPreview | None = None
    schedule_period: Callable[[MethodConfig], int] = _one_step
    pipeline_only: str | None = None
    cli_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a method name must be an identifier-like str, got {self.name!r}")
        families = tuple(self.families)
        object.__setattr__(self, "families", families)
        unknown = sorted(set(families) - set(FAMILY_NAMES))
        if unknown:
            raise ValueError(f"method {self.name!r} names unknown families {unknown}; known: {FAMILY_NAMES}")
        if self.role not in ROLES:
            raise ValueError(f"method {self.name!r}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, MethodConfig)) or (
            self.config_cls is MethodConfig
        ):
            raise TypeError(f"method {self.name!r}: config_cls must be a subclass of MethodConfig, got {self.config_cls!r}")
        option_names = {s.name for s in self.config_cls.option_specs()}
        for what, names in (("cli_flags", self.cli_flags),
                            ("preview_mask.options", self.preview_mask.options if self.preview_mask else ())):
            missing = sorted(set(names) - option_names)
            if missing:
                raise ValueError(f"method {self.name!r}: {what} names options {missing} that {self.config_cls.__name__} lacks")
        _stamp(self.config_cls, "method_name", self.name)
        if inspect.isclass(self.build) and issubclass(self.build, AttentionMethod) and self.build is not AttentionMethod:
            _stamp(self.build, "name", self.name)

    def make_config(self, **options: Any) -> MethodConfig:
        """The validated config (unknown option or bad value: `ValueError` naming it)."""
        return self.config_cls.from_options(**options)


def _stamp(cls: type, attr: str, name: str) -> None:
    """Give `cls` the spec's name; a class that declares another name of its own is an error (one declaration)."""
    own = cls.__dict__.get(attr, "")
    if own and own != name:
        raise ValueError(f"{cls.__name__}.{attr} is {own!r} but its spec names it {name!r}; declare the name only in the spec")
    setattr(cls, attr, name)
