"""One generation as the CLI (and later the app) runs it: load a Diffusers pipeline from a folder or hub id, install
an attention method with validated options, run it, write the image or video and a JSON sidecar with every
setting, the versions and the time."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("diffattn")

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm")
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


def torch_dtype(name: str):
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


# org/name (Hugging Face hub repository id): letters, digits, "-", "_", "."; not "." or ".." parts.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def model_source(model: str) -> str:
    """"local" or "hub" for `model`: a local folder first (it must be a Diffusers pipeline folder, with
    model_index.json), else an `org/name` hub id; anything else is a `ValueError` saying what it is."""
    text = (model or "").strip()
    if not text:
        raise ValueError("model is empty; give a Diffusers pipeline folder or a hub id (org/name)")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {text!r} is a file, not a Diffusers pipeline folder (a folder with "
                             "model_index.json) or a hub id (org/name)")
        if not (path / "model_index.json").is_file():
            what = "a single model's folder (config.json)" if (path / "config.json").is_file() else "a folder"
            raise ValueError(f"model {text!r} is {what} without model_index.json, not a Diffusers pipeline folder; "
                             "save the whole pipeline with pipe.save_pretrained(folder)")
        return "local"
    if _HUB_ID.match(text) and ".." not in text:
        return "hub"
    raise ValueError(f"model folder {text!r} does not exist (and it is not a hub id of the form org/name)")


def check_model(model: str) -> None:
    """A clear error for a model that is neither a pipeline folder nor a hub id (see `model_source`)."""
    model_source(model)


def _hub_error(model: str, exc: BaseException) -> ValueError:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hint = ("HF_HUB_OFFLINE is set, so only the local cache is used" if offline else
            "offline, a typo, or a gated model needing `huggingface-cli login`?")
    return ValueError(f"could not load hub model {model!r} ({hint}): {type(exc).__name__}: {text}. Download it "
                      f"first (`huggingface-cli download {model}`) or pass a local pipeline folder")


def model_index(model: str) -> dict[str, Any]:
    """A local pipeline folder's `model_index.json` (no weights loaded); {} for a hub id, a missing or unreadable
    file."""
    index = Path((model or "").strip()) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def absent_components(model: str) -> dict[str, None]:
    """Components a local pipeline folder saved as absent (`[null, null]` in model_index.json, e.g. SD3 without
    T5), passed as None so that `from_pretrained` accepts the folder."""
    return {k: None for k, v in model_index(model).items() if isinstance(v, list) and v == [None, None]}


def pipeline_class(model: str) -> Any:
    """The class to load `model` with: diffattn's own pipeline class when the folder names one (the demo models),
    else Diffusers' `DiffusionPipeline`, which picks the class from the folder or hub."""
    from diffusers import DiffusionPipeline

    from . import pipelines as ours

    name = model_index(model).get("_class_name", "")
    return getattr(ours, name) if name in ours.__all__ else DiffusionPipeline


def load_pipeline(model: str, *, dtype: str = "fp32", device: str = "cpu", offload: bool = False, cls: Any = None):
    """`cls.from_pretrained` (default: `pipeline_class(model)`)."""
    source = model_source(model)
    model = model.strip()
    if cls is None:
        cls = pipeline_class(model)
    if source == "hub":
        try:
            pipe = cls.from_pretrained(model, dtype=torch_dtype(dtype))
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # huggingface_hub, requests and Diffusers each raise their own types here
            if type(exc).__name__ == "OutOfMemoryError":
                raise
            raise _hub_error(model, exc) from exc
    else:
        pipe = cls.from_pretrained(model, dtype=torch_dtype(dtype), **absent_components(model))
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def parse_method_options(method: str, pairs: list[str]) -> dict[str, Any]:
    """`["decay_factor=0.2", "block_size=64"]` -> typed options, parsed and named by the method's config."""
    from .registry import get_method

    cfg = get_method(method).config_cls
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"method options are key=value, got {pair!r}")
        options[key.strip()] = cfg.parse_option(key.strip(), value)
    cfg.from_options(**options)  # validate the whole set now, with the method's messages
    return options


def call_kwargs(pipe, **wanted: Any) -> dict[str, Any]:
    """The subset of `wanted` (None values dropped) that the pipeline's `__call__` accepts; the rest is reported."""
    params = inspect.signature(pipe.__call__).parameters
    accepted = {k: v for k, v in wanted.items() if v is not None and k in params}
    ignored = sorted(k for k, v in wanted.items() if v is not None and k not in params)
    if ignored:
        logger.warning("diffattn: %s does not take %s; ignored", type(pipe).__name__, ", ".join(ignored))
    return accepted


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def video_writer(out: str) -> str:
    """Which library writes the video file `out`: imageio (ffmpeg through imageio-ffmpeg; Pillow for GIF), else
    OpenCV for .mp4 (GPU images often have opencv-python-headless but not imageio-ffmpeg). ValueError when none can."""
    suffix = Path(out).suffix.lower()
    if _has_module("imageio") and (suffix == ".gif" or _has_module("imageio_ffmpeg")):
        return "imageio"
    if suffix == ".mp4" and _has_module("cv2"):
        return "opencv"
    raise ValueError(f"{out!r}: no writer here for this video (needs imageio with imageio-ffmpeg, or OpenCV for .mp4)")


def _write_video_opencv(data: np.ndarray, out: str, fps: int) -> None:
    import cv2

    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (data.shape[2], data.shape[1]))
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open {out!r} for writing")
    try:
        for frame in data:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV takes BGR
    finally:
        writer.release()


def sidecar_path(out: str) -> str:
    """The JSON sidecar of output `out`: the whole file name + ".json" (`clip.mp4` -> `clip.mp4.json`), so that
    `clip.gif` and `clip.mp4` never share one."""
    return str(out) + ".json"


def check_output(out: str, overwrite: bool = False) -> None:
    """Refuse (`FileExistsError`, one line) to replace an existing output or its sidecar unless `overwrite`."""
    if overwrite:
        return
    for path in (out, sidecar_path(out)):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def atomic_path(out: str, overwrite: bool = True, drop: str | None = None) -> Iterator[str]:
    """A temporary path next to `out` (same suffix, so writers pick the format) that becomes `out` by one rename
    when the block ends without error; removed otherwise (Ctrl-C included), so `out` is never half-written. With
    `overwrite=False` an `out` that appeared meanwhile is not replaced (`FileExistsError`). `drop` (an old
    sidecar) is removed just before the rename, so a new result never sits next to a stale sidecar."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        if drop is not None and overwrite and os.path.lexists(drop):
            os.unlink(drop)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if `out` exists: no clobbering, even in a race
            os.unlink(tmp)
    except FileExistsError:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_result(result: Any, out: str, fps: int = 16, *, overwrite: bool = True) -> dict[str, Any]:
    """Write a pipeline result (`.frames` video or `.images` image) to `out` atomically (temp file + rename);
    returns what was written. `overwrite=False` refuses to replace an existing `out`."""
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1, got {fps!r}")
    suffix = Path(out).suffix.lower()
    frames = getattr(result, "frames", None)
    if frames is not None:
        if suffix not in VIDEO_SUFFIXES:
            raise ValueError(f"this pipeline makes video; --out must end in {', '.join(VIDEO_SUFFIXES)}, got {out!r}")
        writer = video_writer(out)
        data = (np.clip(np.nan_to_num(np.asarray(frames[0], dtype=np.float32)), 0, 1) * 255).round().astype(np.uint8)
        with atomic_path(out, overwrite, drop=sidecar_path(out)) as tmp:
            if writer == "opencv":
                _write_video_opencv(data, tmp, fps)
            else:
                import imageio.v3 as iio

                if suffix == ".gif":
                    iio.imwrite(tmp, data, duration=1000 / fps, loop=0)
                else:
                    iio.imwrite(tmp, data, fps=fps)
        return {"kind": "video", "frames": int(data.shape[0]), "size": list(data.shape[1:3])}
    images = getattr(result, "images", None)
    if images is None:
        raise ValueError(f"unexpected pipeline output {type(result).__name__}: no frames or images")
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"this pipeline makes images; --out must end in {', '.join(IMAGE_SUFFIXES)}, got {out!r}")
    from PIL import Image

    image = images[0]
    if not isinstance(image, Image.Image):
        pixels = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0, 1)
        image = Image.fromarray((pixels * 255).round().astype(np.uint8))
    with atomic_path(out, overwrite, drop=sidecar_path(out)) as tmp:
        image.save(tmp, format=Image.registered_extensions()[suffix])
    return {"kind": "image", "size": [image.height, image.width]}


def nonfinite(result: Any) -> bool:
    """True when the result's pixels hold NaN or infinity (e.g. an infinite guidance scale): not a picture."""
    frames = getattr(result, "frames", None)
    images = getattr(result, "images", None)
    data = frames[0] if frames is not None else (images[0] if images is not None and len(images) else None)
    if data is None or hasattr(data, "convert"):  # a PIL image is always finite
        return False
    if hasattr(data, "detach"):
        data = data.detach().float().cpu().numpy()
    return not bool(np.isfinite(np.asarray(data, dtype=np.float32)).all())


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as a string ("nan", "inf", "-inf"), so `json.dumps` writes valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return str(value)


# CLI setting -> the pipeline `__call__` parameter it sets.
CALL_PARAMETERS = {
    "steps": "num_inference_steps", "height": "height", "width": "width", "frames": "num_frames",
    "guidance": "guidance_scale", "max_sequence_length": "max_sequence_length",
}


def defaults_used(pipe: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """For each setting left at None, the value the pipeline's `__call__` signature defaults to (None where the
    pipeline computes it inside, e.g. stock sizes from the model config), so a sidecar says what actually ran."""
    params = inspect.signature(pipe.__call__).parameters
    used = {}
    for key, name in CALL_PARAMETERS.items():
        if settings.get(key) is None and name in params:
            default = params[name].default
            used[key] = None if default is inspect.Parameter.empty else default
    return used


def write_sidecar(out: str, settings: dict[str, Any], written: dict[str, Any], seconds: float, pipe: Any = None, *,
                  extra: dict[str, Any] | None = None, overwrite: bool = True) -> str:
    """`out`'s JSON sidecar (`sidecar_path`), written atomically and last: every setting, what was written, the
    versions and the time; with `pipe`, the defaults the pipeline filled in and, when `settings` names a method
    (`attn`, `attn_options`), its effective options. Always valid JSON (non-finite numbers as strings)."""
    import diffusers
    import torch

    from . import __version__

    path = sidecar_path(out)
    record = {
        **settings, "output": written, "seconds": round(seconds, 3), "diffattn": __version__,
        "diffusers": diffusers.__version__, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if pipe is not None:
        record["pipeline"] = type(pipe).__name__
        record["defaults_used"] = defaults_used(pipe, settings)
        if settings.get("attn") and "attn_effective_options" not in settings:
            from .settings import method_report

            try:
                record["attn_effective_options"] = method_report(settings["attn"], settings.get("attn_options") or {},
                                                                 pipe)["effective_options"]
            except (ValueError, TypeError) as exc:  # the method ran, so this only guards a custom method's hook
                logger.warning("diffattn: %s's effective options not recorded: %s", settings["attn"], exc)
    record.update(extra or {})
    text = json.dumps(json_safe(record), indent=2, allow_nan=False)
    with atomic_path(path, overwrite) as tmp:
        Path(tmp).write_text(text + "\n", encoding="utf-8")
    return path


def run_generation(pipe, prompt: str, *, method: str | None, options: dict[str, Any], seed: int, **call: Any):
    """Install the method (if any), run the pipeline, remove the method; returns (result, seconds)."""
    import torch

    from .api import apply, remove

    if method:
        apply(pipe, method, **options)
    try:
        start = time.perf_counter()
        result = pipe(prompt=prompt, generator=torch.Generator(device="cpu").manual_seed(seed), **call_kwargs(pipe, **call))
        return result, time.perf_counter() - start
    finally:
        if method:
            remove(pipe)
