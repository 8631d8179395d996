"""One generation as the CLI (and later the app) runs it: load a Diffusers pipeline from a folder or hub id, install
an attention method with validated options, run it, write the image or video and a JSON sidecar with every
setting, the versions and the time."""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
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


def check_model(model: str) -> None:
    """A path-like model that does not exist is a clear error (a bare name is treated as a hub id)."""
    looks_local = os.path.sep in model or model.startswith(".") or os.path.isabs(model)
    if looks_local and not os.path.isdir(model):
        raise ValueError(f"model folder {model!r} does not exist")


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
    check_model(model)
    if cls is None:
        cls = pipeline_class(model)
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


def write_result(result: Any, out: str, fps: int = 16) -> dict[str, Any]:
    """Write a pipeline result (`.frames` video or `.images` image) to `out`; returns what was written."""
    suffix = Path(out).suffix.lower()
    frames = getattr(result, "frames", None)
    if frames is not None:
        if suffix not in VIDEO_SUFFIXES:
            raise ValueError(f"this pipeline makes video; --out must end in {', '.join(VIDEO_SUFFIXES)}, got {out!r}")
        writer = video_writer(out)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        data = (np.clip(np.asarray(frames[0], dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
        if writer == "opencv":
            _write_video_opencv(data, out, fps)
        else:
            import imageio.v3 as iio

            if suffix == ".gif":
                iio.imwrite(out, data, duration=1000 / fps, loop=0)
            else:
                iio.imwrite(out, data, fps=fps)
        return {"kind": "video", "frames": int(data.shape[0]), "size": list(data.shape[1:3])}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    images = getattr(result, "images", None)
    if images is None:
        raise ValueError(f"unexpected pipeline output {type(result).__name__}: no frames or images")
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"this pipeline makes images; --out must end in {', '.join(IMAGE_SUFFIXES)}, got {out!r}")
    from PIL import Image

    image = images[0]
    if not isinstance(image, Image.Image):
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8))
    image.save(out)
    return {"kind": "image", "size": [image.height, image.width]}


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


def write_sidecar(out: str, settings: dict[str, Any], written: dict[str, Any], seconds: float, pipe: Any = None) -> str:
    import diffusers
    import torch

    from . import __version__

    path = str(Path(out).with_suffix(".json"))
    record = {
        **settings, "output": written, "seconds": round(seconds, 3), "diffattn": __version__,
        "diffusers": diffusers.__version__, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if pipe is not None:
        record["pipeline"] = type(pipe).__name__
        record["defaults_used"] = defaults_used(pipe, settings)
    Path(path).write_text(json.dumps(record, indent=2, default=str))
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
