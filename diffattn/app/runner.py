"""Generation for the app: the CLI's code (`diffattn.generate`) with a pipeline cache, step progress and a
difference picture for the Compare tab. No Gradio here; the tabs pass a progress callable in."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..demo import DEMO_MODELS, assets_dir, demo_model_path
from ..generate import check_model, load_pipeline, nonfinite, run_generation, write_result, write_sidecar
from ..registry import available_methods, get_method
from ..settings import GenerationSettings, Limits, app_box, fit_to_pipeline, method_report, validate

logger = logging.getLogger("diffattn")

# (fraction 0..1, description) -> None; the tabs pass gr.Progress.
ProgressFn = Callable[[float, str], None]


def default_model(kind: str) -> str:
    """The bundled demo model's folder for `kind`, whether or not it is there yet (the textbox default)."""
    return str(assets_dir() / DEMO_MODELS[kind])


def resolve_model(model: str) -> str:
    """The model text of a textbox: stripped; the demo folder goes through `demo_model_path`, so a missing demo
    model gives its FileNotFoundError with the training command."""
    model = (model or "").strip()
    if not model:
        raise ValueError("model is empty; give a Diffusers pipeline folder or hub id")
    for kind in DEMO_MODELS:
        if Path(model).resolve() == Path(default_model(kind)).resolve():
            try:
                return demo_model_path(kind)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{exc} (here: put a pipeline folder or hub id in the Model box)") from exc
    return model


def model_family(model: str) -> tuple[str | None, str | None]:
    """(family, model class) of a local pipeline folder from its model_index.json, without loading weights; (None,
    None) when unknown (hub id, missing folder, unsupported class)."""
    from ..adapters import FAMILIES
    from ..generate import model_index

    data = model_index(model)
    for component in ("transformer", "unet"):
        entry = data.get(component)
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            for adapter in FAMILIES.values():
                if entry[1] in adapter.model_classes:
                    return adapter.name, entry[1]
            return None, entry[1]
    return None, None


def methods_for_family(family: str | None) -> list[str]:
    """Methods that support `family` (all available methods when the family is unknown)."""
    if family is None:
        return available_methods()
    return [m for m in available_methods() if family in get_method(m).families]


def check_method_supports(method: str, family: str | None) -> None:
    """A clear `ValueError` when `method` cannot run on the model family (before any weights are loaded)."""
    spec = get_method(method)
    if family is not None and family not in spec.families:
        raise ValueError(
            f"method {method!r} does not support this model's family ({family}); it supports: {', '.join(spec.families)}"
        )


class PipelineCache:
    """Loaded pipelines per (model, device, dtype), least recently used dropped beyond `capacity`. Each entry has
    a lock: `apply`/`remove` change the pipeline, so two runs on one pipeline must not overlap."""

    def __init__(self, capacity: int = 2, loader: Callable[..., Any] = load_pipeline) -> None:
        self.capacity = capacity
        self.loader = loader
        self._entries: OrderedDict[tuple[str, str, str], tuple[Any, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, model: str, device: str, dtype: str) -> tuple[Any, threading.Lock]:
        key = (model, device, dtype)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            pipe = self.loader(model, dtype=dtype, device=device)
            self.loads += 1
            self._entries[key] = (pipe, threading.Lock())
            while len(self._entries) > self.capacity:
                dropped, _ = self._entries.popitem(last=False)
                logger.info("diffattn app: dropped cached pipeline %s", dropped)
            return self._entries[key]


@dataclass
class Settings:
    """What the user asked for in a generation tab (None: the pipeline's own default)."""

    model: str
    prompt: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    negative_prompt: str | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance: float | None = None
    fps: int = 16
    max_sequence_length: int | None = None


@dataclass
class Generation:
    """One finished generation: the written file, its sidecar, the time and the pixels (for differences)."""

    path: str
    sidecar: str
    kind: str
    seconds: float
    pixels: np.ndarray  # [frames, H, W, 3] for video, [H, W, 3] for an image, floats in 0..1
    method: str | None
    options: dict[str, Any]
    first_run: bool = False  # the pipeline was loaded for this run: its time includes one-time warm-up
    notices: list[str] = field(default_factory=list)  # settings rounded, a method that will not run as asked


def result_pixels(result: Any) -> np.ndarray:
    """The first video ([F, H, W, 3]) or image ([H, W, 3]) of a pipeline result as floats in 0..1."""
    frames = getattr(result, "frames", None)
    data = frames[0] if frames is not None else result.images[0]
    if hasattr(data, "convert"):  # a PIL image
        return np.asarray(data.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(data, "detach"):
        data = data.detach().float().cpu().numpy()
    return np.clip(np.asarray(data, dtype=np.float32), 0.0, 1.0)


class Runner:
    """Runs generations for the app, one at a time for the whole app (every tab and user: one gate), within
    `limits`; outputs go to `out_dir` with unique names."""

    def __init__(self, out_dir: str | Path, device: str, dtype: str, cache: PipelineCache | None = None,
                 limits: Limits | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.dtype = dtype
        self.cache = cache or PipelineCache()
        self.limits = limits or Limits()
        self._gate = threading.Lock()  # one generation (load + run + write) at a time, whatever Gradio's queue does

    def check(self, settings: Settings) -> GenerationSettings:
        """The shared validation (`diffattn.settings.validate`) and this server's limits on the values given."""
        checked = validate(GenerationSettings(
            prompt=settings.prompt, negative_prompt=settings.negative_prompt, seed=settings.seed, steps=settings.steps,
            height=settings.height, width=settings.width, frames=settings.frames, guidance=settings.guidance,
            max_sequence_length=settings.max_sequence_length, fps=settings.fps, device=self.device, dtype=self.dtype,
        ), app_box)
        self.limits.check({"steps": checked.steps, "frames": checked.frames, "height": checked.height,
                           "width": checked.width})
        return checked

    def generate(self, settings: Settings, progress: ProgressFn | None = None, label: str = "") -> Generation:
        """Validate, load (cached), run with per-step progress, write the file and its JSON sidecar."""
        report = progress or (lambda fraction, desc: None)
        checked = self.check(settings)
        model = resolve_model(settings.model)
        check_model(model)
        family, _ = model_family(model)
        if settings.method:
            check_method_supports(settings.method, family)
            get_method(settings.method).config_cls.from_options(**settings.options)
        if self._gate.locked():
            report(0.0, f"{label}waiting for another generation to finish")
        with self._gate:
            return self._generate(settings, checked, model, report, label)

    def _generate(self, settings: Settings, checked: GenerationSettings, model: str, report: ProgressFn,
                  label: str) -> Generation:
        started = time.time()
        report(0.0, f"{label}loading {model}")
        loads = self.cache.loads
        pipe, lock = self.cache.get(model, self.device, self.dtype)
        first_run = self.cache.loads > loads
        fitted = fit_to_pipeline(pipe, checked, app_box)
        self.limits.check(fitted.effective(pipe))  # the pipeline's defaults count too
        method_info = method_report(settings.method, settings.options, pipe, fitted) if settings.method else {}
        notices = fitted.notices + method_info.get("notices", [])
        for notice in notices:
            logger.warning("diffattn app: %s", notice)
        s = fitted.settings

        def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            total = getattr(pipeline, "num_timesteps", None) or s.steps or (step + 1)
            report(min(1.0, (step + 1) / total), f"{label}step {step + 1}/{total}")
            return callback_kwargs

        with lock:
            result, seconds = run_generation(
                pipe, s.prompt, method=settings.method, options=settings.options, seed=s.seed,
                negative_prompt=s.negative_prompt, num_inference_steps=s.steps, height=s.height, width=s.width,
                num_frames=s.frames, guidance_scale=s.guidance, max_sequence_length=s.max_sequence_length,
                output_type="np", callback_on_step_end=on_step_end,
            )
        if nonfinite(result):
            raise ValueError("the result holds NaN or infinite pixels (numerical overflow: try fp32 or a smaller "
                             "guidance); nothing written")
        is_video = getattr(result, "frames", None) is not None
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.method or 'stock'}-{uuid.uuid4().hex[:6]}"
        out = str(self.out_dir / (stem + (".mp4" if is_video else ".png")))
        written = write_result(result, out, fps=s.fps, overwrite=False)
        record = {
            "model": model, "prompt": s.prompt, "negative_prompt": s.negative_prompt,
            "attn": settings.method, "attn_options": settings.options, "seed": s.seed, "steps": s.steps,
            "height": s.height, "width": s.width, "frames": s.frames, "guidance": s.guidance, "fps": s.fps,
            "max_sequence_length": s.max_sequence_length, "device": self.device, "dtype": self.dtype, "out": out,
            "source": "diffattn app", "requested": fitted.requested, "notices": notices,
            "started": round(started, 3), "finished": round(time.time(), 3),
        }
        if settings.method:
            record["attn_effective_options"] = method_info["effective_options"]
        sidecar = write_sidecar(out, record, written, seconds, pipe=pipe, overwrite=False)
        return Generation(out, sidecar, written["kind"], seconds, result_pixels(result), settings.method,
                          settings.options, first_run, notices)


def enlarged(image: np.ndarray, min_side: int = 384) -> np.ndarray:
    """An image ([H, W, 3], floats 0..1 or uint8) enlarged by an integer factor (nearest) to at least `min_side`
    pixels on its short side, as uint8: browsers show small outputs at their own size; files keep the real one."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    scale = max(1, int(np.ceil(min_side / max(1, min(image.shape[:2])))))
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return image


@dataclass
class Difference:
    """How two results differ: a picture of |a - b| and its numbers."""

    image: np.ndarray  # uint8 [H, W, 3]
    max_abs: float
    mean_abs: float
    psnr_db: float
    gain: float  # the picture shows |a - b| * gain


def difference(a: np.ndarray, b: np.ndarray, min_side: int = 256) -> Difference:
    """|a - b| per pixel (max over channels, mean over frames), scaled so the largest difference is bright (gain at
    most 255: differences below one 8-bit level stay dark), as a black-red-yellow heat picture; small results are
    enlarged (nearest) to at least `min_side` pixels."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare results of different shapes {a.shape} and {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float(np.mean(diff**2))
    per_pixel = diff.max(axis=-1)
    if per_pixel.ndim == 3:  # video: mean over frames
        per_pixel = per_pixel.mean(axis=0)
    peak = float(per_pixel.max())
    # the largest difference is full brightness, but at most one 8-bit level is: float noise stays black
    gain = min(1.0 / peak, 255.0) if peak > 0 else 255.0
    x = np.clip(per_pixel * gain, 0.0, 1.0)
    heat = np.stack([np.clip(2 * x, 0, 1), np.clip(2 * x - 1, 0, 1), np.zeros_like(x)], axis=-1)
    image = enlarged(heat, min_side)
    psnr = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    return Difference(image, float(diff.max()), float(diff.mean()), psnr, gain)
