"""One validation of generation settings, shared by the CLI (`diffattn generate`) and the app.

Three stages, each a clear `SettingError` (a `ValueError` naming the setting as the caller spells it: `--steps` on
the command line, `steps` in the app):

1. `validate(settings)`: what can be checked without a model: positive steps, frames, size, fps and text length, a
   finite guidance scale, a non-empty prompt, a device this machine has and a dtype it runs.
2. `fit_to_pipeline(pipe, settings)`: what the loaded model can take. A frame count the video VAE cannot take
   (Wan, HunyuanVideo, CogVideoX need 4k+1) is rounded as Diffusers would, but *with* a notice, and the value
   that runs is the one recorded; a size that is not a multiple of the model's pixel step (VAE factor x patch) is
   refused with the nearest accepted values.
3. `Limits.check(...)`: the app's per-request caps on work (steps, frames, pixels, mask-explorer grid tokens).

`method_notices(...)` asks the chosen method, through its generic `notices(plan)` hook, whether it will run at these
settings (e.g. every step inside radial's dense warm-up), so the CLI and the app never branch on method names.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("diffattn")

DTYPES = ("bf16", "fp16", "fp32")

# How a setting is named in messages: the CLI's flag or the app's box.
Label = Callable[[str], str]


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def app_box(name: str) -> str:
    return name.replace("_", " ")


class SettingError(ValueError):
    """A bad generation setting; `setting` is its field name in `GenerationSettings`."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass
class GenerationSettings:
    """What one generation asks for (None: the pipeline's own default)."""

    prompt: str | None
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance: float | None = None
    max_sequence_length: int | None = None
    fps: int = 16
    device: str = "cpu"
    dtype: str = "fp32"

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)


def _int_at_least(value: Any, low: int, name: str, label: Label, what: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(name, f"{label(name)} must be an integer >= {low}{what}, got {value!r}")
    if value < low:
        raise SettingError(name, f"{label(name)} must be an integer >= {low}{what}, got {value}")


def check_device(device: str, label: Label = cli_flag) -> str:
    """`device` if torch knows it and this machine has it, else a `SettingError` saying what is there."""
    import torch

    text = (device or "").strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise SettingError("device", f"{label('device')} {device!r} is not a device name; use cpu, cuda, cuda:N or "
                           "mps") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("device", f"{label('device')} {text}: no CUDA GPU is available here "
                               "(torch.cuda.is_available() is False); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise SettingError("device", f"{label('device')} {text}: this machine has {count} CUDA device(s) "
                               f"(cuda:0 to cuda:{count - 1})")
        return text
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SettingError("device", f"{label('device')} mps: Apple's MPS backend is not available here")
        return text
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return text
    raise SettingError("device", f"{label('device')} {text!r}: no such device is available here; use cpu or cuda")


def check_dtype(dtype: str, device: str, label: Label = cli_flag) -> str:
    """A dtype name diffattn knows, that `device` can run (bf16 needs an Ampere or newer GPU on CUDA)."""
    import torch

    if dtype not in DTYPES:
        raise SettingError("dtype", f"{label('dtype')} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16" and device.startswith("cuda") and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise SettingError("dtype", f"{label('dtype')} bf16: this GPU has no bfloat16 support; use fp16 or fp32")
    return dtype


def validate(s: GenerationSettings, label: Label = cli_flag) -> GenerationSettings:
    """Every check that needs no model; returns the settings with the prompt stripped."""
    if s.prompt is None or not str(s.prompt).strip():
        raise SettingError("prompt", f"{label('prompt')} is empty; give the text to generate from")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed < 2**63:
        raise SettingError("seed", f"{label('seed')} must be an integer from 0 to 2**63 - 1, got {s.seed!r}")
    _int_at_least(s.steps, 1, "steps", label, " (denoising steps)")
    _int_at_least(s.height, 1, "height", label, " (pixels)")
    _int_at_least(s.width, 1, "width", label, " (pixels)")
    _int_at_least(s.frames, 1, "frames", label)
    _int_at_least(s.max_sequence_length, 1, "max_sequence_length", label, " (text tokens)")
    _int_at_least(s.fps, 1, "fps", label, " (frames per second of the written video)")
    if s.guidance is not None:
        if isinstance(s.guidance, bool) or not isinstance(s.guidance, (int, float)) or not math.isfinite(s.guidance):
            raise SettingError("guidance", f"{label('guidance')} must be a finite number, got {s.guidance!r}")
    device = check_device(s.device, label)
    dtype = check_dtype(s.dtype, device, label)
    negative = s.negative_prompt if s.negative_prompt and str(s.negative_prompt).strip() else None
    return s.replace(prompt=str(s.prompt).strip(), negative_prompt=negative, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# what the loaded model can take
# ---------------------------------------------------------------------------------------------------------------
def denoiser(pipe: Any) -> Any:
    """The pipeline's transformer or UNet (None if it has neither)."""
    for name in ("transformer", "unet"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    return None


def family(pipe: Any) -> str | None:
    """diffattn's model family of the pipeline's denoiser (None when diffattn does not support it)."""
    from .adapters import family_of

    model = denoiser(pipe)
    if model is None:
        return None
    try:
        return family_of(model).name
    except ValueError:
        return None


def makes_video(pipe: Any) -> bool:
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def _patch(pipe: Any) -> tuple[int, int]:
    """(temporal, spatial) patch of the denoiser in latent units."""
    config = getattr(denoiser(pipe), "config", None)
    patch = getattr(config, "patch_size", None) if config is not None else None
    if isinstance(patch, (list, tuple)):
        return int(patch[0]), int(patch[-1])
    spatial = int(patch) if isinstance(patch, int) and patch > 0 else 1
    temporal = getattr(config, "patch_size_t", None) if config is not None else None
    if family(pipe) == "flux":
        spatial = 2  # FLUX packs 2x2 latents into one token in the pipeline, not the transformer
    return (int(temporal) if isinstance(temporal, int) and temporal > 0 else 1), spatial


def pixel_step(pipe: Any) -> tuple[int | None, int | None]:
    """(frame step, pixel step): a video's frame count must be k * frame step + 1; height and width multiples of
    the pixel step (VAE factor x patch). None where the pipeline does not say."""
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) if makes_video(pipe) else None
    _, patch = _patch(pipe)
    step = int(spatial) * patch if isinstance(spatial, int) and spatial > 0 else None
    return (int(temporal) if isinstance(temporal, int) and temporal > 0 else None), step


def call_default(pipe: Any, name: str) -> Any:
    """The pipeline's default for `__call__` argument `name` (its `call_defaults` mapping first, for pipelines that
    fill defaults in inside `__call__`), or None."""
    defaults = getattr(pipe, "call_defaults", None)
    if callable(defaults):
        defaults = defaults()
    if isinstance(defaults, dict) and defaults.get(name) is not None:
        return defaults[name]
    param = inspect.signature(pipe.__call__).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def default_size(pipe: Any) -> tuple[int | None, int | None]:
    """The pipeline's default (height, width): the signature's, else `default_sample_size` x the VAE factor."""
    height, width = call_default(pipe, "height"), call_default(pipe, "width")
    sample = getattr(pipe, "default_sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(factor, int):
        height = height if height is not None else sample * factor
        width = width if width is not None else sample * factor
    return height, width


@dataclass
class Fitted:
    """Settings after `fit_to_pipeline`: what runs (`settings`), what was asked where it differs (`requested`),
    and the notices to log and record."""

    settings: GenerationSettings
    requested: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def effective(self, pipe: Any) -> dict[str, Any]:
        """steps/height/width/frames/guidance as they will run (the pipeline's defaults filled in)."""
        s = self.settings
        height, width = default_size(pipe)
        out = {
            "steps": s.steps if s.steps is not None else call_default(pipe, "num_inference_steps"),
            "height": s.height if s.height is not None else height,
            "width": s.width if s.width is not None else width,
            "guidance": s.guidance if s.guidance is not None else call_default(pipe, "guidance_scale"),
        }
        if makes_video(pipe):
            out["frames"] = s.frames if s.frames is not None else call_default(pipe, "num_frames")
        return out


def fit_to_pipeline(pipe: Any, s: GenerationSettings, label: Label = cli_flag) -> Fitted:
    """Round a frame count the model cannot take (with a notice), refuse a size it cannot take."""
    fitted = Fitted(s)
    name = type(pipe).__name__
    frame_step, step = pixel_step(pipe)
    if step is not None:
        for key in ("height", "width"):
            value = getattr(s, key)
            if value is not None and value % step:
                low, high = value // step * step, (value // step + 1) * step
                nearest = f"{low} or {high}" if low > 0 else f"{high}"
                raise SettingError(key, f"{label(key)} {value} is not a multiple of {step} for {name} (VAE factor x "
                                   f"patch); nearest: {nearest}")
    if makes_video(pipe):
        if s.frames is not None and frame_step is not None and (s.frames - 1) % frame_step:
            rounded = (s.frames - 1) // frame_step * frame_step + 1
            fitted.requested["frames"] = s.frames
            fitted.notices.append(f"{label('frames')} {s.frames} is not {frame_step}k+1, which {name}'s video VAE "
                                  f"needs; generating {rounded} frames")
            fitted.settings = fitted.settings.replace(frames=rounded)
    elif s.frames is not None:
        fitted.notices.append(f"{label('frames')} ignored: {name} makes images")
        fitted.requested["frames"] = s.frames
        fitted.settings = fitted.settings.replace(frames=None)
    return fitted


def token_grid(pipe: Any, effective: dict[str, Any]) -> tuple[int, int, int] | None:
    """(frames, height, width) of the denoiser's token grid at these settings, None when unknown."""
    height, width = effective.get("height"), effective.get("width")
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    if not all(isinstance(v, int) and v > 0 for v in (height, width, spatial)):
        return None
    t_patch, s_patch = _patch(pipe)
    frames = 1
    if makes_video(pipe):
        temporal = getattr(pipe, "vae_scale_factor_temporal", None)
        count = effective.get("frames")
        if not isinstance(count, int) or not isinstance(temporal, int):
            return None
        frames = max(1, ((count - 1) // temporal + 1) // t_patch)
    return frames, height // spatial // s_patch, width // spatial // s_patch


def layer_count(pipe: Any) -> int | None:
    """Number of transformer blocks (the index space of methods' layer options), None for UNets and unknown."""
    model = denoiser(pipe)
    total = 0
    for name in ("blocks", "transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, name, None)
        if blocks is not None:
            total += len(blocks)
    return total or None


def method_report(method: str, options: dict[str, Any], pipe: Any, fitted: Fitted | None = None) -> dict[str, Any]:
    """The method's effective options (its family defaults filled in) and its notices at these settings, asked of
    the method object through `AttentionMethod.effective_options` / `notices`."""
    from .methods.base import RunPlan
    from .registry import get_method

    spec = get_method(method)
    runtime = spec.build(spec.config_cls.from_options(**options))
    fam = family(pipe)
    report: dict[str, Any] = {"effective_options": runtime.effective_options(fam), "notices": []}
    if fitted is not None:
        effective = fitted.effective(pipe)
        steps = effective.get("steps")
        plan = RunPlan(family=fam, steps=steps if isinstance(steps, int) else None,
                       grid=token_grid(pipe, effective), layers=layer_count(pipe))
        report["notices"] = list(runtime.notices(plan))
    return report


# ---------------------------------------------------------------------------------------------------------------
# per-request limits (the app)
# ---------------------------------------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class Limits:
    """Caps on the work of one request. Defaults fit a shared CPU or one GPU; `from_env` reads DIFFATTN_MAX_STEPS,
    DIFFATTN_MAX_FRAMES, DIFFATTN_MAX_PIXELS (height x width) and DIFFATTN_MAX_GRID_TOKENS (mask explorer)."""

    max_steps: int = 100
    max_frames: int = 129
    max_pixels: int = 1280 * 720
    max_grid_tokens: int = 131_072  # HunyuanVideo 720p (118,800 tokens) fits; 150^3 does not

    ENV = {"max_steps": "DIFFATTN_MAX_STEPS", "max_frames": "DIFFATTN_MAX_FRAMES", "max_pixels": "DIFFATTN_MAX_PIXELS",
           "max_grid_tokens": "DIFFATTN_MAX_GRID_TOKENS"}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {f.name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_env(cls, **overrides: int | None) -> Limits:
        """Defaults, then the environment, then `overrides` that are not None (the `diffattn app` flags)."""
        values = {f.name: _env_int(cls.ENV[f.name], f.default) for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def check(self, effective: dict[str, Any], label: Label = app_box) -> None:
        """`effective` steps/height/width/frames (defaults filled in) within the caps, else a `SettingError`."""
        steps, frames = effective.get("steps"), effective.get("frames")
        height, width = effective.get("height"), effective.get("width")
        if isinstance(steps, int) and steps > self.max_steps:
            raise SettingError("steps", f"{label('steps')} {steps} is over this server's limit of {self.max_steps}")
        if isinstance(frames, int) and frames > self.max_frames:
            raise SettingError("frames", f"{label('frames')} {frames} is over this server's limit of {self.max_frames}")
        if isinstance(height, int) and isinstance(width, int) and height * width > self.max_pixels:
            raise SettingError("height", f"{label('height')} x {label('width')} = {height}x{width} "
                               f"({height * width} pixels) is over this server's limit of {self.max_pixels} pixels")

    def check_grid(self, grid: tuple[int, ...]) -> None:
        tokens = math.prod(grid)
        if tokens > self.max_grid_tokens:
            raise SettingError("grid", f"grid {'x'.join(map(str, grid))} is {tokens} tokens, over this server's "
                               f"limit of {self.max_grid_tokens} tokens")
