"""The Mask explorer tab: a method's mask at a named model geometry (or a custom token grid), with its density and
the speed-up that density bounds. The numbers and picture come from `diffattn.explorer` (the same code as
`diffattn mask`); the option widgets are generated from the method's config like the generation tabs'."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..registry import get_method
from ..settings import Limits
from .controls import make_control, option_value

logger = logging.getLogger("diffattn")

CUSTOM_HELP = "custom token grid: frames,height,width (video) or height,width (image); overrides the geometry"


@dataclass
class MaskControls:
    """One method's option widgets: (name, component, spec or None for explorer-only options such as tiles)."""

    method: str
    group: Any
    entries: list[tuple[str, Any, Any]]


def mask_options_from_values(method: str, entries: list[tuple[str, Any, Any]], values: tuple[Any, ...]) -> dict[str, Any]:
    """Widget values -> `explore_mask` options: config options typed by the config (only non-defaults), the
    explorer's own options (tile shapes, layer) parsed by `parse_mask_options` when not empty."""
    from ..explorer import parse_mask_options

    config_cls = get_method(method).config_cls
    options: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for (name, _, spec), raw in zip(entries, values):
        if spec is not None:
            value = option_value(config_cls, spec, raw)
            if value != spec.default:
                options[name] = value
        elif raw is not None and str(raw).strip():
            extra[name] = str(raw)
    options.update(parse_mask_options(method, extra))
    return options


def parse_grid(text: str) -> tuple[int, ...] | None:
    """"21,45,80" or "21x45x80" -> (21, 45, 80); empty -> None."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"custom grid must be 2 or 3 integers (frames,height,width or height,width), got {text!r}")


def request_grid(geometry_name: str, custom: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The token grid a request asks for: the custom grid, else the named geometry's (None if unknown here)."""
    if custom is not None:
        return custom
    from ..explorer import GEOMETRIES

    geometry = GEOMETRIES.get(geometry_name)
    grid = getattr(geometry, "grid", None)
    return tuple(grid) if grid else None


def mask_tab(demo: Any, limits: Limits | None = None) -> None:
    import gradio as gr

    from .tabs import error_text, log_failure, progress_on, running, status_html

    limits = limits or Limits()

    try:
        from ..explorer import GEOMETRIES, METHODS, mask_options
    except ImportError as exc:  # the explorer module is part of the same release; this only guards a broken install
        gr.HTML(status_html(f"the mask explorer is not available: {exc}", error=True))
        return
    methods = list(METHODS)
    geometry_choices = [(f"{g.name}: {'x'.join(map(str, g.grid))} ({g.doc})", g.name) for g in GEOMETRIES.values()]
    with gr.Row():
        with gr.Column(scale=1):
            method = gr.Dropdown(choices=methods, value=methods[0], label="Method", elem_id="mask-method")
            geometry = gr.Dropdown(choices=geometry_choices, value=geometry_choices[0][1], label="Model geometry",
                                   elem_id="mask-geometry")
            custom = gr.Textbox(value="", label="Custom grid", info=CUSTOM_HELP, placeholder="e.g. 21,45,80",
                                elem_id="mask-custom")
            groups: list[MaskControls] = []
            for name in methods:
                specs = {s.name: s for s in get_method(name).config_cls.option_specs()}
                entries = []
                with gr.Group(visible=name == methods[0]) as group:
                    for opt, help_text in mask_options(name).items():
                        spec = specs.get(opt)
                        elem_id = f"mask-opt-{name}-{opt}"
                        component = make_control(spec, elem_id) if spec is not None else gr.Textbox(
                            value="", label=opt, info=help_text, placeholder="empty: default",
                            elem_classes=["diffattn-option"], elem_id=elem_id)
                        entries.append((opt, component, spec))
                groups.append(MaskControls(name, group, entries))
            button = gr.Button("Show mask", variant="primary", elem_id="mask-show")
        with gr.Column(scale=2):
            gr.Markdown("**Mask**: rows are query blocks (tiles), columns key blocks; kept light, skipped dark.")
            picture = gr.Image(show_label=False, type="pil", elem_id="mask-image")
            numbers = gr.HTML(status_html("Choose a method and a geometry, then Show mask."),
                              elem_id="mask-numbers")
            info = gr.JSON(label="Details", elem_id="mask-info")

    method.change(lambda m: [gr.update(visible=g.method == m) for g in groups], [method], [g.group for g in groups])
    components = [c for g in groups for _, c, _ in g.entries]

    def show(method_name: str, geometry_name: str, custom_text: str, *values: Any):
        from ..explorer import explore_mask

        try:
            start = 0
            options: dict[str, Any] = {}
            for g in groups:
                if g.method == method_name:
                    options = mask_options_from_values(method_name, g.entries, values[start : start + len(g.entries)])
                start += len(g.entries)
            grid = parse_grid(custom_text)
            asked = request_grid(geometry_name, grid)
            if asked is not None:
                if any(n < 1 for n in asked):
                    raise ValueError(f"custom grid sizes must be >= 1, got {custom_text!r}")
                limits.check_grid(asked)  # before any memory is spent
            view = explore_mask(method_name, grid if grid is not None else geometry_name, **options)
        except Exception as exc:
            log_failure("mask explorer", exc)
            return gr.update(), status_html(error_text(exc), error=True), gr.update()
        text = (f"{method_name} at {view.info.get('geometry', geometry_name)} "
                f"({'x'.join(map(str, view.grid))} tokens): density {view.density:.1%}, "
                f"predicted attention speed-up up to {view.predicted_speedup:.2f}x")
        return view.image, status_html(text), view.info

    button.click(running, None, numbers, queue=False, show_progress="hidden").then(
        show, [method, geometry, custom, *components], [picture, numbers, info], **progress_on([picture]),
        concurrency_limit=1, concurrency_id="diffattn-mask")
