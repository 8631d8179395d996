"""The Layout tab: draw boxes on a canvas, a phrase per box, generate with FICGen (training-free or the trained
modules), see the boxes over the result, download the image, its JSON sidecar and the layout JSON.

The canvas is plain HTML/JS (installed with `gr.HTML(js_on_load=...)`): dragging draws a box named by the phrase box
and writes the layout into the "Layout JSON" textbox (the form `diffattn generate --layout` reads); editing that
textbox redraws the canvas. Generation runs `diffattn.pipelines.layout.LayoutPipeline` on a pipeline from the app's
cache, under the cache's lock, like the other tabs.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..demo import assets_dir
from ..layout import Layout, draw_layout
from .runner import Runner, enlarged
from .tabs import error_text, running, status_html

logger = logging.getLogger("diffattn")

CANVAS = 384
EXAMPLE_PROMPT = "a red circle and a blue square on a gray background"
EXAMPLE_LAYOUT = {"instances": [{"phrase": "a red circle", "box": [0.08, 0.55, 0.4, 0.9]},
                                {"phrase": "a blue square", "box": [0.55, 0.1, 0.92, 0.45]}]}
VARIANTS = ("training-free", "trained")

_CANVAS_HTML = f"""
<div style="display:flex;flex-direction:column;gap:4px">
  <canvas id="layout-canvas" width="{CANVAS}" height="{CANVAS}"
          style="border:1px solid #888;background:#f4f4f4;cursor:crosshair;width:{CANVAS}px;height:{CANVAS}px"></canvas>
  <small>Drag to draw a box for the phrase above; edit or delete boxes in the Layout JSON.</small>
</div>
"""

# Runs once when the HTML block is mounted. Reads/writes the Layout JSON textarea (Gradio picks up 'input' events).
_CANVAS_JS = """
const canvas = element.querySelector('#layout-canvas');
const ctx = canvas.getContext('2d');
const colors = ['#ff4040', '#40c8ff', '#ffd228', '#78ff78', '#ff78ff', '#ffa03c'];
const box = () => document.querySelector('#layout-json textarea');
const phraseBox = () => document.querySelector('#layout-phrase textarea, #layout-phrase input');
const read = () => { try { const d = JSON.parse(box().value || '{}'); d.instances = d.instances || []; return d; }
                     catch (e) { return null; } };
let drag = null, last = '';
function draw(extra) {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const d = read();
  const items = d ? d.instances.slice() : [];
  if (extra) items.push(extra);
  items.forEach((it, i) => {
    if (!it.box) return;
    const [x0, y0, x1, y1] = it.box.map((v, j) => v * (j % 2 ? canvas.height : canvas.width));
    ctx.strokeStyle = colors[i % colors.length]; ctx.lineWidth = 2;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillStyle = ctx.strokeStyle; ctx.font = '13px sans-serif';
    ctx.fillText((i + 1) + ': ' + (it.phrase || ''), x0 + 4, y0 + 15);
  });
  if (!d) { ctx.fillStyle = '#c00'; ctx.fillText('Layout JSON is not valid JSON', 8, 20); }
}
function pos(ev) {
  const r = canvas.getBoundingClientRect();
  return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
}
function current(ev) {
  const [x, y] = pos(ev);
  const r3 = v => Math.round(v * 1000) / 1000;
  return {phrase: (phraseBox() && phraseBox().value.trim()) || 'a red circle',
          box: [r3(Math.min(drag[0], x)), r3(Math.min(drag[1], y)), r3(Math.max(drag[0], x)), r3(Math.max(drag[1], y))]};
}
canvas.addEventListener('mousedown', ev => { drag = pos(ev); });
canvas.addEventListener('mousemove', ev => { if (drag) draw(current(ev)); });
window.addEventListener('mouseup', ev => {
  if (!drag) return;
  const it = current(ev); drag = null;
  if (it.box[2] - it.box[0] < 0.01 || it.box[3] - it.box[1] < 0.01) { draw(); return; }
  const d = read() || {instances: []};
  d.instances.push(it);
  const ta = box();
  ta.value = JSON.stringify(d, null, 1);
  ta.dispatchEvent(new Event('input', {bubbles: true}));
  draw();
});
setInterval(() => { const v = box() ? box().value : ''; if (v !== last) { last = v; draw(); } }, 300);
draw();
"""


@dataclass
class LayoutResult:
    path: str
    boxed_path: str
    sidecar: str
    layout_path: str
    seconds: float
    pixels: np.ndarray  # [H, W, 3] floats in 0..1


def parse_layout_text(text: str) -> Layout:
    """The textbox's JSON -> a validated `Layout` (errors name the instance and the field)."""
    if not (text or "").strip():
        raise ValueError("the layout is empty: draw at least one box")
    return Layout.from_json(text)


def _number(value: Any, name: str, cast: type, default: Any = None) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def generate_layout(runner: Runner, *, model: str, prompt: str, layout: Layout, variant: str = "training-free",
                    weights: str | None = None, options: dict[str, Any] | None = None, seed: int = 0,
                    steps: int | None = None, negative_prompt: str | None = None, progress: Any = None) -> LayoutResult:
    """One layout-to-image generation with the app's pipeline cache; writes the image, the image with the boxes
    drawn over it, the JSON sidecar and the layout JSON."""
    import torch
    from PIL import Image

    from ..generate import write_sidecar
    from ..pipelines.layout import LayoutPipeline
    from .runner import model_family, resolve_model

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not (prompt or "").strip():
        raise ValueError("prompt is empty")
    model = resolve_model(model)
    family, cls = model_family(model)
    if family not in (None, "unet"):
        raise ValueError(f"the Layout tab needs a UNet pipeline (SD1.5/SDXL); {model} holds a {cls}")
    if variant == "trained" and not (weights or "").strip():
        raise ValueError("the trained variant needs the folder of the trained FICGen modules")
    options = dict(options or {})
    from ..registry import get_method

    get_method("ficgen").config_cls.from_options(**options)  # bad values fail before loading
    report = progress or (lambda fraction, desc: None)
    report(0.0, f"loading {model}")
    pipe, lock = runner.cache.get(model, runner.device, runner.dtype)

    def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        total = getattr(pipeline, "num_timesteps", None) or steps or (step + 1)
        report(min(1.0, (step + 1) / total), f"step {step + 1}/{total}")
        return kwargs

    call: dict[str, Any] = {"generator": torch.Generator(device="cpu").manual_seed(seed), "output_type": "np",
                            "callback_on_step_end": on_step_end}
    if steps is not None:
        call["num_inference_steps"] = steps
    if negative_prompt:
        call["negative_prompt"] = negative_prompt
    with lock:
        runner_pipe = LayoutPipeline(pipe, weights=weights.strip() if variant == "trained" else None,
                                     references="shapes" if variant == "trained" else None, **options)
        start = time.perf_counter()
        result = runner_pipe(prompt, layout, **call)
        seconds = time.perf_counter() - start
    pixels = np.clip(np.asarray(result.images[0], dtype=np.float32), 0, 1)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-layout-{variant}-{uuid.uuid4().hex[:6]}"
    out = runner.out_dir / f"{stem}.png"
    image = Image.fromarray((pixels * 255).round().astype(np.uint8))
    image.save(out)
    boxed = draw_layout(Image.fromarray(enlarged(pixels)), layout)
    boxed_path = runner.out_dir / f"{stem}-boxes.png"
    boxed.save(boxed_path)
    layout_path = runner.out_dir / f"{stem}-layout.json"
    layout.save(layout_path)
    record = {"model": model, "prompt": prompt, "negative_prompt": negative_prompt, "attn": "ficgen",
              "variant": variant, "weights": weights if variant == "trained" else None, "attn_options": options,
              "layout": layout.to_dict(), "seed": seed, "steps": steps, "device": runner.device, "dtype": runner.dtype,
              "out": str(out), "source": "diffattn app (Layout tab)"}
    sidecar = write_sidecar(str(out), record, {"kind": "image", "size": [image.height, image.width]}, seconds)
    return LayoutResult(str(out), str(boxed_path), sidecar, str(layout_path), seconds, pixels)


def layout_tab(runner: Runner, demo: Any, model_default: str | None = None) -> None:
    """Build the Layout tab (call inside `gr.Tabs()`)."""
    import gradio as gr

    with gr.Tab("Layout", elem_id="tab-layout"):
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Textbox(value=model_default or str(assets_dir() / "demo-unet"), label="Model (UNet pipeline)",
                                   elem_id="layout-model")
                prompt = gr.Textbox(value=EXAMPLE_PROMPT, label="Prompt", lines=2, elem_id="layout-prompt")
                phrase = gr.Textbox(value="a red circle", label="Phrase for the next box", elem_id="layout-phrase",
                                    interactive=True)
                gr.HTML(_CANVAS_HTML, js_on_load=_CANVAS_JS, elem_id="layout-canvas-block")
                with gr.Row():
                    example = gr.Button("Example layout", elem_id="layout-example", size="sm")
                    clear = gr.Button("Clear boxes", elem_id="layout-clear", size="sm")
                layout_json = gr.Textbox(value=json.dumps(EXAMPLE_LAYOUT, indent=1), label="Layout JSON", lines=6,
                                         elem_id="layout-json")
                variant = gr.Radio(list(VARIANTS), value="training-free", label="FICGen variant", elem_id="layout-variant")
                weights = gr.Textbox(value=str(assets_dir() / "ficgen-demo-unet"), label="Trained modules folder",
                                     elem_id="layout-weights")
                with gr.Row():
                    alpha = gr.Number(value=0.5, label="alpha (phrase low band)", elem_id="layout-alpha")
                    beta = gr.Number(value=1.0, label="beta (phrase high band)", elem_id="layout-beta")
                    rho = gr.Number(value=0.35, label="rho", elem_id="layout-rho")
                with gr.Row():
                    band = gr.Dropdown(["square", "gaussian"], value="square", label="band", elem_id="layout-band")
                    bias = gr.Textbox(value="", label="attn1 bias (empty: off)", elem_id="layout-bias")
                    layers = gr.Textbox(value="mid,up1", label="layers", elem_id="layout-layers")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="layout-seed")
                    steps = gr.Textbox(value="", label="steps (empty: the pipeline's)", elem_id="layout-steps")
                button = gr.Button("Generate with layout", variant="primary", elem_id="layout-generate")
            with gr.Column(scale=1):
                media = gr.Image(label="Result with the layout's boxes", type="numpy", elem_id="layout-result")
                status = gr.HTML(status_html("Ready."), elem_id="layout-status")
                files = gr.File(label="Download (image, boxes, JSON sidecar, layout JSON)", file_count="multiple",
                                elem_id="layout-files")

    example.click(lambda: (json.dumps(EXAMPLE_LAYOUT, indent=1), EXAMPLE_PROMPT), None, [layout_json, prompt],
                  queue=False)
    clear.click(lambda: json.dumps({"instances": []}), None, layout_json, queue=False)

    def run(model_text, prompt_text, layout_text, variant_value, weights_text, a, b, r, band_value, bias_text,
            layers_text, seed_value, steps_text, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        try:
            layout = parse_layout_text(layout_text)
            options = {"alpha": _number(a, "alpha", float, 0.5), "beta": _number(b, "beta", float, 1.0),
                       "rho": _number(r, "rho", float, 0.35), "band": band_value, "layers": layers_text or "mid,up1"}
            bias_value = (bias_text or "").strip()
            if bias_value:
                options["self_attention_bias"] = "inf" if bias_value.lower() in ("inf", "hard") else _number(
                    bias_value, "attn1 bias", float)
            res = generate_layout(
                runner, model=model_text, prompt=prompt_text, layout=layout, variant=variant_value, weights=weights_text,
                options=options, seed=int(_number(seed_value, "seed", float, 0)),
                steps=_number(steps_text, "steps", int), progress=lambda f, d: progress(f, desc=d),
            )
        except Exception as exc:  # shown in the page; the traceback goes to the log
            logger.warning("diffattn app: layout generation failed", exc_info=True)
            return None, status_html(error_text(exc), error=True), None
        from PIL import Image

        shown = np.asarray(Image.open(res.boxed_path).convert("RGB"))
        message = f"ficgen ({variant_value}): {res.seconds:.2f} s, {len(layout.instances)} boxes"
        return shown, status_html(message), [res.path, res.boxed_path, res.sidecar, res.layout_path]

    button.click(running, None, status, queue=False, show_progress="hidden").then(
        run, [model, prompt, layout_json, variant, weights, alpha, beta, rho, band, bias, layers, seed, steps],
        [media, status, files])
