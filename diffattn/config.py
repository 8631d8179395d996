"""Validated option dataclasses for attention methods.

Each method declares its options as a dataclass deriving from `MethodConfig`. Ranges, choices and help text live
in the field metadata (use `option(...)`), so one declaration drives validation, `diffattn methods`, the CLI's
`--attn-opt key=value` parsing and the app's generated controls.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


def option(
    default: Any,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Any:
    """A dataclass field with its validation rule and help text."""
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "choices": choices,
        "low_inclusive": low_inclusive,
        "high_inclusive": high_inclusive,
    }
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """What one option accepts: used for messages, the CLI and the app."""

    name: str
    type: Any
    default: Any
    help: str
    low: float | None
    high: float | None
    choices: tuple[Any, ...] | None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def accepted(self) -> str:
        """A short human description of the accepted values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is Any:
            return "a structured value (CLI: comma-separated numbers, JSON, or text as the help says)"
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_inclusive else '>'} {self.low}")
        if self.high is not None:
            parts.append(f"{'<=' if self.high_inclusive else '<'} {self.high}")
        base = _type_name(self.type)
        return base + (" " + " and ".join(parts) if parts else "")


def parse_structured(text: str) -> Any:
    """CLI text for a structured option: JSON (`{"0": ...}`, `[1, 2]`), comma-separated scalars (`18,24,24`), or
    else the text itself (head specs, preset names), which the method's config validates."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
        parts = [p.strip() for p in text.split(",")]
        parsed = []
        for part in parts:
            for cast in (int, float):
                try:
                    parsed.append(cast(part))
                    break
                except ValueError:
                    continue
            else:
                if part.lower() in ("true", "false"):
                    parsed.append(part.lower() == "true")
                else:
                    return text  # free text (e.g. a head spec "L11H15,L1H10" or a preset name): the config checks it
        return parsed[0] if len(parsed) == 1 else tuple(parsed)
    if isinstance(value, dict):  # JSON object keys are strings; layer indices are ints
        return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
    if isinstance(value, list):
        return tuple(value)
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def base_types(tp: Any) -> tuple[Any, ...]:
    """The member types of a (possibly nested) Union annotation; shared with the app's control builder."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(tp):
            out.extend(base_types(arg))
        return tuple(out)
    return (tp,)


@dataclass
class MethodConfig:
    """Base class of every method's options. Subclasses are dataclasses whose fields use `option(...)`."""

    method_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    # ---- introspection -------------------------------------------------------------------------------------
    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            specs.append(
                OptionSpec(
                    name=f.name,
                    type=hints.get(f.name, Any),
                    default=default,
                    help=f.metadata.get("help", ""),
                    low=f.metadata.get("low"),
                    high=f.metadata.get("high"),
                    choices=f.metadata.get("choices"),
                    low_inclusive=f.metadata.get("low_inclusive", True),
                    high_inclusive=f.metadata.get("high_inclusive", True),
                )
            )
        return specs

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build from keyword options; an unknown name raises `ValueError` listing the accepted ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(repr(u) for u in unknown)} for method {cls.method_name!r}; "
                f"accepted options: {', '.join(sorted(names)) or '(none)'}"
            )
        return cls(**options)

    @classmethod
    def parse_option(cls, name: str, text: str) -> Any:
        """Parse a CLI string `text` for option `name` into its declared type (bool, int, float, str, None)."""
        specs = {s.name: s for s in cls.option_specs()}
        if name not in specs:
            raise ValueError(
                f"unknown option {name!r} for method {cls.method_name!r}; accepted options: {', '.join(sorted(specs))}"
            )
        spec = specs[name]
        bases = base_types(spec.type)
        low = text.strip()
        if (type(None) in bases or Any in bases) and low.lower() in ("none", "null", ""):
            return None
        if spec.choices is not None:
            for choice in spec.choices:
                if str(choice) == low:
                    return choice
        if any(b is Any or typing.get_origin(b) in (list, tuple, dict) or b in (list, tuple, dict) for b in bases):
            return parse_structured(low)
        for tp in bases:
            try:
                if tp is bool:
                    if low.lower() in ("1", "true", "yes", "on"):
                        return True
                    if low.lower() in ("0", "false", "no", "off"):
                        return False
                    continue
                if tp is int:
                    return int(low)
                if tp is float:
                    return float(low)
                if tp is str:
                    return low
            except ValueError:
                continue
        raise ValueError(f"option {name!r} of method {cls.method_name!r}: cannot parse {text!r}; expected {spec.accepted()}")

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every option against its declared type and range; `ValueError` names the option and the range."""
        for spec in self.option_specs():
            value = getattr(self, spec.name)
            self._check_one(spec, value)
        self.check()

    def check(self) -> None:
        """Cross-option checks of a subclass (raise `ValueError`)."""

    def _check_one(self, spec: OptionSpec, value: Any) -> None:
        where = f"option {spec.name!r} of method {self.method_name!r}"
        bases = base_types(spec.type)
        if Any in bases:
            return  # structured options (per-axis tuples, per-layer dicts) are checked by the subclass's check()
        if value is None:
            if type(None) in bases:
                return
            raise ValueError(f"{where} must not be None; expected {spec.accepted()}")
        if spec.choices is not None:
            if value not in spec.choices:
                raise ValueError(f"{where} got {value!r}; expected {spec.accepted()}")
            return
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if bool in bases and isinstance(value, bool):
            return
        if int in bases and isinstance(value, int) and not isinstance(value, bool):
            pass
        elif float in bases and is_number:
            if not math.isfinite(float(value)):
                raise ValueError(f"{where} got {value!r}; expected a finite number")
        elif str in bases and isinstance(value, str):
            pass
        elif any(typing.get_origin(b) in (list, tuple, dict) or b in (list, tuple, dict) or b is Any for b in bases):
            return
        else:
            raise ValueError(f"{where} got {value!r} of type {type(value).__name__}; expected {spec.accepted()}")
        if is_number:
            if spec.low is not None and (value < spec.low or (not spec.low_inclusive and value == spec.low)):
                raise ValueError(f"{where} got {value!r}; expected {spec.accepted()}")
            if spec.high is not None and (value > spec.high or (not spec.high_inclusive and value == spec.high)):
                raise ValueError(f"{where} got {value!r}; expected {spec.accepted()}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
