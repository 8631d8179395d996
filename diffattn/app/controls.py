"""Controls generated from a method's config: one declaration (`diffattn.config.option`) drives validation, the CLI
and these widgets, so a new method option shows up in the app without app code.

The mapping from an `OptionSpec` to a widget and back is pure (`control_kind`, `control_value`, `option_value`,
`options_from_values`) and tested without a browser; `make_control` only turns it into a Gradio component.
Ranges are shown in the help text, not enforced by the widget, so that an out-of-range value reaches the method's
own validation and its `ValueError` message is what the user reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, OptionSpec, base_types
from ..registry import available_methods, get_method

# Text shown for "no value" in dropdowns of optional choices and optional booleans.
DEFAULT_CHOICE = "(default)"


def _optional(spec: OptionSpec) -> bool:
    return type(None) in base_types(spec.type) or spec.default is None


def control_kind(spec: OptionSpec) -> str:
    """Which widget an option gets: "dropdown" (choices, optional bool), "checkbox" (bool), "number" (int/float
    with a default) or "textbox" (strings, optional numbers, structured values such as per-axis tuples, layer
    lists, head specs)."""
    bases = [b for b in base_types(spec.type) if b is not type(None)]
    if spec.choices is not None:
        return "dropdown"
    if bases == [bool]:
        return "dropdown" if _optional(spec) else "checkbox"
    if bases and all(b in (int, float) for b in bases) and not _optional(spec):
        return "number"
    return "textbox"  # also optional numbers: an empty box means None (a number box cannot be empty)


def dropdown_choices(spec: OptionSpec) -> list[str]:
    """Dropdown entries as text; None becomes `DEFAULT_CHOICE`."""
    if spec.choices is not None:
        return [DEFAULT_CHOICE if c is None else str(c) for c in spec.choices]
    return [DEFAULT_CHOICE, "True", "False"]


def control_value(spec: OptionSpec) -> Any:
    """The widget's initial value for the option's default."""
    kind = control_kind(spec)
    default = spec.default
    if kind == "dropdown":
        return DEFAULT_CHOICE if default is None else str(default)
    if kind == "checkbox":
        return bool(default)
    if kind == "number":
        return default  # None shows an empty box
    if default is None:
        return ""
    if isinstance(default, (tuple, list)):
        return ",".join(str(x) for x in default)
    if isinstance(default, dict):
        import json

        return json.dumps(default)
    return str(default)


def control_info(spec: OptionSpec) -> str:
    """Help line under the widget: the config's help, what it accepts and the default."""
    if spec.type is Any:
        accepted = "text: comma-separated numbers, JSON, or as the help says"
    else:
        accepted = spec.accepted()
        if _optional(spec) and spec.choices is None:
            accepted = accepted.replace(" | None", "").replace("None | ", "") + ", or empty (None)"
    default = "empty" if spec.default is None else repr(spec.default)
    return f"{spec.help.rstrip('.')}. Accepts {accepted}; default {default}."


def option_value(config_cls: type[MethodConfig], spec: OptionSpec, raw: Any) -> Any:
    """The option value a widget value stands for, parsed like the CLI's `--attn-opt` (`parse_option`).

    Numbers stay numbers (so `-1` reaches the method's range check); an empty text box means None for optional
    options."""
    kind = control_kind(spec)
    if kind == "checkbox":
        return bool(raw)
    if kind == "number":
        if raw is None:
            raise ValueError(f"option {spec.name!r} of method {config_cls.method_name!r} is empty; expected {spec.accepted()}")
        bases = base_types(spec.type)
        if int in bases and float not in bases:
            value = float(raw)
            if value != int(value):
                raise ValueError(f"option {spec.name!r} of method {config_cls.method_name!r} got {raw!r}; expected {spec.accepted()}")
            return int(value)
        return float(raw)
    text = "" if raw is None else str(raw)
    if kind == "dropdown" and text == DEFAULT_CHOICE:
        return None
    if not text.strip() and _optional(spec):
        return None
    return config_cls.parse_option(spec.name, text)


def options_from_values(method: str, values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """Widget values (in `option_specs()` order) -> the options that differ from the defaults, validated by the
    method's config (its `ValueError` names the option and the accepted range)."""
    config_cls = get_method(method).config_cls
    specs = config_cls.option_specs()
    if len(values) != len(specs):
        raise ValueError(f"method {method!r} has {len(specs)} options, got {len(values)} values")
    options = {}
    for spec, raw in zip(specs, values):
        value = option_value(config_cls, spec, raw)
        if value != spec.default:
            options[spec.name] = value
    config_cls.from_options(**options)  # validate the whole set now, with the method's own messages
    return options


@dataclass
class MethodControls:
    """The widgets of one method, in `option_specs()` order, inside one group shown when the method is chosen."""

    method: str
    group: Any
    components: list[Any]


def make_control(spec: OptionSpec, elem_id: str | None = None) -> Any:
    """A Gradio component for one option (label = option name, info = help + accepted values)."""
    import gradio as gr

    kind = control_kind(spec)
    common = {"label": spec.name, "info": control_info(spec), "value": control_value(spec),
              "elem_classes": ["diffattn-option"], "elem_id": elem_id}
    if kind == "dropdown":
        return gr.Dropdown(choices=dropdown_choices(spec), **common)
    if kind == "checkbox":
        return gr.Checkbox(**common)
    if kind == "number":
        # no `precision`: Gradio would round 1.5 to 2 for an int option; `option_value` refuses it instead
        return gr.Number(**common)
    return gr.Textbox(placeholder="empty: default" if spec.default is None else None, **common)


def build_method_controls(methods: list[str] | None = None, selected: str | None = None,
                          prefix: str = "opt") -> list[MethodControls]:
    """One group of generated controls per method; only `selected`'s group is visible. Each widget's elem_id is
    `{prefix}-{method}-{option}`."""
    import gradio as gr

    out = []
    for name in methods or available_methods():
        spec = get_method(name)
        specs = spec.config_cls.option_specs()
        with gr.Group(visible=name == selected) as group:
            components = [make_control(s, f"{prefix}-{name}-{s.name}") for s in specs]
            if not specs:
                gr.Markdown(f"`{name}` has no options.", elem_classes=["diffattn-no-options"])
        out.append(MethodControls(name, group, components))
    return out
