"""The app's tabs: Video and Image (one generation tab each), Compare (dense vs a method at one seed) and the
Mask explorer. Each tab's handler catches errors and shows them in the tab's status box, so a bad option or a
missing model never leaves a dead page."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Any

from ..demo import DEMO_PROMPTS
from ..registry import get_method
from .controls import MethodControls, build_method_controls, options_from_values
from .runner import (
    Runner,
    Settings,
    default_model,
    difference,
    enlarged,
    methods_for_family,
    model_family,
)

logger = logging.getLogger("diffattn")

# Every generating event of every tab shares one Gradio concurrency group of size 1: one generation at a time for
# the whole app (the runner's gate enforces the same when the app is built without this queue).
GENERATION_QUEUE = {"concurrency_limit": 1, "concurrency_id": "diffattn-generation"}

# Generation settings in the order the handlers receive them.
SETTING_NAMES = ("seed", "steps", "height", "width", "frames", "guidance", "fps")


def status_html(message: str, error: bool = False) -> str:
    """The status box: a red box for errors, plain text otherwise (the text is escaped)."""
    if error:
        return (
            '<div class="diffattn-error" style="border:1px solid #d33;background:#fdecec;color:#8a1111;'
            f'padding:8px 12px;border-radius:6px;white-space:pre-wrap"><b>Error:</b> {html.escape(message)}</div>'
        )
    return f'<div class="diffattn-ok" style="padding:4px 2px;white-space:pre-wrap">{html.escape(message)}</div>'


def progress_on(components: list[Any]) -> dict[str, Any]:
    """Show the step progress bar on these outputs only (Gradio versions without `show_progress_on`: on all)."""
    import inspect

    import gradio as gr

    if "show_progress_on" in inspect.signature(gr.Button.click).parameters:
        return {"show_progress_on": components}
    return {}


def running() -> str:
    """Shown at once on click (outside the queue), replaced by the result or the error."""
    return status_html("Running... (waits its turn when another run is in progress)")


def error_text(exc: BaseException) -> str:
    """The message shown for a failed run: the exception's own text (ValueError, FileNotFoundError, ...)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return f"CUDA out of memory; try a smaller size, fewer frames or --dtype bf16 ({exc})"
    if isinstance(exc, (ValueError, FileNotFoundError, TypeError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def family_note(model: str) -> str:
    family, cls = model_family(model)
    if family:
        return f"Model family **{family}** (`{cls}`): showing the methods that support it."
    if cls:
        return f"`{cls}` is not a model class diffattn supports; all methods are listed, applying one will fail."
    return "Model not found locally (a hub id or a missing folder): all methods are listed."


def method_summary(method: str | None) -> str:
    if not method:
        return ""
    spec = get_method(method)
    return f"**{method}**: {spec.summary}. Families: {', '.join(spec.families)}."


def _optional_number(value: Any, name: str, cast: type) -> Any:
    """A settings box: empty -> None (the pipeline's default), else the number, or a ValueError naming the box."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
        if cast is int and number != int(number):
            raise ValueError
        return cast(number)
    except (TypeError, ValueError):
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"{name} must be {kind} or empty (the pipeline's default), got {value!r}") from None


class _GradioProgress:
    """Adapts gr.Progress to the runner's (fraction, description) callable."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def __call__(self, fraction: float, desc: str) -> None:
        self.progress(fraction, desc=desc)


@dataclass
class MethodPicker:
    """A model box, a method dropdown filtered by the model's family, and the generated option controls."""

    model: Any
    note: Any
    method: Any
    summary: Any
    controls: list[MethodControls]
    exclude: tuple[str, ...] = ()

    def choices(self, model: str) -> list[str]:
        return [m for m in methods_for_family(model_family(model)[0]) if m not in self.exclude]

    @property
    def option_components(self) -> list[Any]:
        return [c for mc in self.controls for c in mc.components]

    def options(self, method: str, values: tuple[Any, ...]) -> dict[str, Any]:
        """The chosen method's options out of all controls' values (every method's, in build order)."""
        start = 0
        for mc in self.controls:
            if mc.method == method:
                return options_from_values(method, values[start : start + len(mc.components)])
            start += len(mc.components)
        raise ValueError(f"method {method!r} is not offered here")

    def wire(self, demo: Any) -> None:
        import gradio as gr

        def on_model(model: str, current: str | None):
            choices = self.choices(model)
            value = current if current in choices else (choices[0] if choices else None)
            return gr.update(choices=choices, value=value), family_note(model)

        def on_method(method: str | None):
            return [method_summary(method)] + [gr.update(visible=mc.method == method) for mc in self.controls]

        for event in (self.model.submit, self.model.blur):
            event(on_model, [self.model, self.method], [self.method, self.note])
        demo.load(on_model, [self.model, self.method], [self.method, self.note])
        self.method.change(on_method, [self.method], [self.summary] + [mc.group for mc in self.controls])


def model_box(prefix: str, model_default: str) -> tuple[Any, Any]:
    """The model textbox and the note under it that names the model's family."""
    import gradio as gr

    model = gr.Textbox(value=model_default, label="Model (Diffusers pipeline folder or hub id)",
                       elem_id=f"{prefix}-model")
    note = gr.Markdown(family_note(model_default), elem_id=f"{prefix}-family")
    return model, note


def method_picker(prefix: str, model: Any, note: Any, model_default: str, method_default: str = "dense",
                  label: str = "Attention method", exclude: tuple[str, ...] = ()) -> MethodPicker:
    """The method dropdown (filtered by the family of the model in `model`), its summary and generated controls,
    built in the current layout context."""
    import gradio as gr

    choices = [m for m in methods_for_family(model_family(model_default)[0]) if m not in exclude]
    selected = method_default if method_default in choices else (choices[0] if choices else None)
    method = gr.Dropdown(choices=choices, value=selected, label=label, elem_id=f"{prefix}-method")
    summary = gr.Markdown(method_summary(selected), elem_id=f"{prefix}-summary")
    controls = build_method_controls(selected=selected, prefix=f"{prefix}-opt")
    return MethodPicker(model, note, method, summary, controls, exclude)


def settings_controls(prefix: str, kind: str) -> list[Any]:
    """Seed, steps, size, frames, guidance, fps (empty: the pipeline's own default), in `SETTING_NAMES` order."""
    import gradio as gr

    with gr.Accordion("Generation settings (empty: the pipeline's default)", open=True):
        def box(name: str, label: str, visible: bool = True) -> Any:
            return gr.Textbox(value="", label=label, placeholder="default", visible=visible, min_width=90,
                              elem_id=f"{prefix}-{name}")

        with gr.Row():
            seed = gr.Number(value=0, label="seed", min_width=90, elem_id=f"{prefix}-seed")
            steps = box("steps", "steps")
            guidance = box("guidance", "guidance (CFG)")
            fps = gr.Number(value=16, label="fps", visible=kind == "video", min_width=90, elem_id=f"{prefix}-fps")
        with gr.Row():
            height = box("height", "height")
            width = box("width", "width")
            frames = box("frames", "frames", visible=kind == "video")
    return [seed, steps, height, width, frames, guidance, fps]


def _settings(model: str, prompt: str, negative: str, method: str | None, options: dict[str, Any],
              values: tuple[Any, ...]) -> Settings:
    """The boxes' values parsed (numbers, empty = the pipeline's default); the runner validates them with the CLI's
    checks (`diffattn.settings.validate`) and this server's limits."""
    named = dict(zip(SETTING_NAMES, values))
    ints = {k: _optional_number(named[k], k, int) for k in ("seed", "steps", "height", "width", "frames", "fps")}
    return Settings(
        model=model, prompt=prompt or "", method=method, options=options,
        seed=0 if ints["seed"] is None else ints["seed"], negative_prompt=negative or None, steps=ints["steps"],
        height=ints["height"], width=ints["width"], frames=ints["frames"],
        guidance=_optional_number(named["guidance"], "guidance", float), fps=16 if ints["fps"] is None else ints["fps"],
    )


def log_failure(what: str, exc: BaseException) -> None:
    """A user error (bad setting, missing model, limit) is one log line; anything else keeps its traceback."""
    if is_user_error(exc):
        logger.warning("diffattn app: %s failed: %s", what, " ".join(str(exc).split()))
    else:
        logger.error("diffattn app: %s failed", what, exc_info=exc)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (ValueError, FileNotFoundError, FileExistsError, TypeError)) or (
        type(exc).__name__ == "OutOfMemoryError")


def _timing(gen: Any) -> str:
    shape = gen.pixels.shape
    size = f"{shape[0]} frames of {shape[2]}x{shape[1]}" if gen.kind == "video" else f"{shape[1]}x{shape[0]}"
    warm = "; first run after loading, includes warm-up" if gen.first_run else ""
    notices = "".join(f"\nNotice: {n}" for n in getattr(gen, "notices", []))
    return f"{gen.method or 'stock'}: {gen.seconds:.2f} s ({size}{warm}){notices}"


def generation_tab(kind: str, runner: Runner, model_default: str | None, demo: Any) -> None:
    """The Video or Image tab: model, prompt, method with its generated controls, settings; result, time, files."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            default = model_default or default_model(kind)
            model, note = model_box(kind, default)
            prompt = gr.Textbox(value=DEMO_PROMPTS[kind], label="Prompt", lines=2, elem_id=f"{kind}-prompt")
            negative = gr.Textbox(value="", label="Negative prompt", elem_id=f"{kind}-negative")
            picker = method_picker(kind, model, note, default)
            settings = settings_controls(kind, kind)
            button = gr.Button(f"Generate {kind}", variant="primary", elem_id=f"{kind}-generate")
        with gr.Column(scale=1):
            if kind == "video":
                media = gr.Video(label="Result", elem_id=f"{kind}-result", autoplay=True, loop=True)
            else:
                media = gr.Image(label="Result (small images shown enlarged)", type="numpy", elem_id=f"{kind}-result")
            status = gr.HTML(status_html("Ready."), elem_id=f"{kind}-status")
            files = gr.File(label="Download (result + JSON sidecar)", file_count="multiple", elem_id=f"{kind}-files")
    picker.wire(demo)
    n_settings = len(settings)

    def run(model, prompt_text, negative_text, method, *rest, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        setting_values, option_values = rest[:n_settings], rest[n_settings:]
        try:
            options = picker.options(method, option_values)
            gen = runner.generate(_settings(model, prompt_text, negative_text, method, options, setting_values),
                                  _GradioProgress(progress))
        except Exception as exc:  # shown in the page; one log line for a user error, a traceback otherwise
            log_failure(f"{kind} generation", exc)
            return None, status_html(error_text(exc), error=True), None
        shown = gen.path if gen.kind == "video" else enlarged(gen.pixels)
        return shown, status_html(_timing(gen)), [gen.path, gen.sidecar]

    button.click(running, None, status, queue=False, show_progress="hidden").then(
        run, [picker.model, prompt, negative, picker.method, *settings, *picker.option_components], [media, status, files],
        **progress_on([media]), **GENERATION_QUEUE)


def compare_tab(runner: Runner, video_model: str | None, image_model: str | None, demo: Any) -> None:
    """Dense and a method at the same seed and settings, side by side, each with its time, and |difference|."""
    import gradio as gr

    video_default = video_model or default_model("video")
    image_default = image_model or default_model("image")
    with gr.Row():
        with gr.Column(scale=1):
            model, note = model_box("compare", video_default)
            with gr.Row():
                use_video = gr.Button("Use the video model", size="sm", elem_id="compare-use-video")
                use_image = gr.Button("Use the image model", size="sm", elem_id="compare-use-image")
                use_unet = gr.Button("Use the UNet model", size="sm", elem_id="compare-use-unet")
            prompt = gr.Textbox(value=DEMO_PROMPTS["video"], label="Prompt", lines=2, elem_id="compare-prompt")
            negative = gr.Textbox(value="", label="Negative prompt", elem_id="compare-negative")
            picker = method_picker("compare", model, note, video_default, method_default="radial",
                                   label="Method to compare with dense", exclude=("dense",))
            settings = settings_controls("compare", "video")
            button = gr.Button("Compare with dense", variant="primary", elem_id="compare-run")
        with gr.Column(scale=2):
            with gr.Row():
                with gr.Column():
                    dense_video = gr.Video(label="dense", loop=True, elem_id="compare-dense-video")
                    dense_image = gr.Image(label="dense", type="numpy", visible=False, elem_id="compare-dense-image")
                    dense_time = gr.HTML("", elem_id="compare-dense-time")
                with gr.Column():
                    method_video = gr.Video(label="method", loop=True, elem_id="compare-method-video")
                    method_image = gr.Image(label="method", type="numpy", visible=False,
                                            elem_id="compare-method-image")
                    method_time = gr.HTML("", elem_id="compare-method-time")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("**|dense - method|** per pixel (mean over frames; brightest = largest difference)")
                    diff_image = gr.Image(show_label=False, type="numpy", elem_id="compare-diff")
                with gr.Column():
                    status = gr.HTML(status_html("Ready."), elem_id="compare-status")
                    files = gr.File(label="Download (both results + sidecars)", file_count="multiple",
                                    elem_id="compare-files")
    picker.wire(demo)

    video_only = [settings[SETTING_NAMES.index("frames")], settings[SETTING_NAMES.index("fps")]]

    def pick(model: str, kind: str):
        """Switch the tab to the video or image model: its methods, its demo prompt, the video-only boxes."""
        choices = picker.choices(model)
        return [model, gr.update(choices=choices, value=choices[0] if choices else None), family_note(model),
                DEMO_PROMPTS[kind]] + [gr.update(visible=kind == "video") for _ in video_only]

    picked = [picker.model, picker.method, picker.note, prompt, *video_only]
    use_video.click(lambda: pick(video_default, "video"), None, picked)
    use_image.click(lambda: pick(image_default, "image"), None, picked)
    use_unet.click(lambda: pick(default_model("unet"), "unet"), None, picked)
    n_settings = len(settings)
    outputs = [dense_video, dense_image, dense_time, method_video, method_image, method_time, diff_image, status, files]

    def run(model, prompt_text, negative_text, method, *rest, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        setting_values, option_values = rest[:n_settings], rest[n_settings:]
        try:
            if not method or method == "dense":
                raise ValueError("choose a method other than dense to compare with dense")
            options = picker.options(method, option_values)
            base = _settings(model, prompt_text, negative_text, "dense", {}, setting_values)
            report = _GradioProgress(progress)
            a = runner.generate(base, lambda f, d: report(f / 2, d), label="dense: ")
            other = Settings(**{**base.__dict__, "method": method, "options": options})
            b = runner.generate(other, lambda f, d: report(0.5 + f / 2, d), label=f"{method}: ")
            diff = difference(a.pixels, b.pixels)
        except Exception as exc:
            log_failure("compare", exc)
            return [gr.update()] * 7 + [status_html(error_text(exc), error=True), None]
        video = a.kind == "video"
        speed = a.seconds / b.seconds if b.seconds > 0 else float("inf")
        summary = (f"{method} vs dense at seed {base.seed}: {speed:.2f}x the speed of dense; max |diff| "
                   f"{diff.max_abs:.4f}, mean |diff| {diff.mean_abs:.4f}, PSNR {diff.psnr_db:.1f} dB "
                   f"(picture gain x{diff.gain:.1f})")
        if a.first_run:
            summary += ("\nThe model was loaded for this comparison, so dense's time includes one-time warm-up; "
                        "compare again for a fair time.")
        return [
            gr.update(value=a.path if video else None, visible=video),
            gr.update(value=None if video else enlarged(a.pixels), visible=not video),
            status_html(_timing(a)),
            gr.update(value=b.path if video else None, visible=video),
            gr.update(value=None if video else enlarged(b.pixels), visible=not video),
            status_html(_timing(b)),
            diff.image,
            status_html(summary),
            [a.path, a.sidecar, b.path, b.sidecar],
        ]

    button.click(running, None, status, queue=False, show_progress="hidden").then(
        run, [picker.model, prompt, negative, picker.method, *settings, *picker.option_components], outputs,
        **progress_on([dense_video, dense_image, method_video, method_image]), **GENERATION_QUEUE)

