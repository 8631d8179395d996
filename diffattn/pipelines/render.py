"""The `diffattn render` workflows, callable without the CLI: FreeSwim high-resolution video and Radial long video.

The CLI (`diffattn render --highres` / `--long`) parses its flags, calls these, and writes the result and its
sidecar; the app or a script can call them the same way.

- `load_highres_pipeline` + `render_highres`: a Wan T2V folder loaded as `FreeSwimPipeline` (native-size pass, then
  refine at the target size with the `freeswim` method).
- `plan_long` + `render_long`: more frames than the model was trained on, with the `radial` method and optionally a
  length-extension LoRA (a radial LoRA folder also gives its radial options and training length).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..settings import call_default  # re-exported: the render workflows and the CLI read defaults the same way

__all__ = ["LongPlan", "call_default", "load_highres_pipeline", "load_lora", "plan_long", "render_highres",
           "render_long"]


# ---- FreeSwim high resolution -------------------------------------------------------------------------------------
def load_highres_pipeline(model: str, *, dtype: str, device: str, offload: bool = False, vae_tiling: bool = False):
    """A Wan T2V folder or hub id as `FreeSwimPipeline`; `vae_tiling` decodes/encodes the VAE in tiles."""
    from diffattn.generate import load_pipeline

    from .freeswim import FreeSwimPipeline

    pipe = load_pipeline(model, dtype=dtype, device=device, offload=offload, cls=FreeSwimPipeline)
    if vae_tiling:
        pipe.vae.enable_tiling()
    return pipe


def render_highres(pipe, prompt: str, *, seed: int = 0, **call: Any) -> tuple[Any, float]:
    """Run the FreeSwim pipeline (`call`: its arguments: height, width, num_frames, base_height, ...); returns
    (result with numpy frames, seconds)."""
    import torch

    start = time.perf_counter()
    result = pipe(prompt, generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np", **call)
    return result, time.perf_counter() - start


# ---- Radial long video ---------------------------------------------------------------------------------------------
@dataclass
class LongPlan:
    """What a long render runs: radial options (the LoRA's under the given ones), frames, size, and what the
    pipeline and the LoRA said (for the sidecar)."""

    options: dict[str, Any]
    frames: int
    height: int | None
    width: int | None
    default_frames: int | None
    lora_kind: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)


def load_lora(pipe, path: str) -> dict:
    """Load a LoRA into `pipe`; a radial LoRA folder also returns its radial options and training geometry."""
    from .radial_lora import LORA_CONFIG_NAME, load_radial_lora

    config = Path(path) / LORA_CONFIG_NAME
    try:
        if config.is_file():
            info = json.loads(config.read_text(encoding="utf-8"))
            load_radial_lora(pipe, path, apply_radial=False)  # weights only: the render applies radial itself
            radial = {k: v for k, v in info.get("radial", {}).items() if k != "dense_timesteps" and v is not None}
            return {"kind": "radial", "radial": radial, "num_frames": info.get("num_frames"),
                    "height": info.get("height"), "width": info.get("width")}
        pipe.load_lora_weights(path)
    except Exception as exc:  # Diffusers, peft and safetensors each raise their own types for a bad LoRA
        raise ValueError(f"--lora {path!r} could not be loaded: {exc}") from exc
    return {"kind": "diffusers"}


def _long_frames(pipe, frames: int | None, extend: int, lora_info: dict) -> tuple[int, int | None]:
    """(frames to render, the pipeline's default length): `frames`, else the LoRA's training length, else
    (default - 1) * extend + 1, which keeps the 4k+1 lengths the video VAEs need."""
    default = call_default(pipe, "num_frames")
    default = default if isinstance(default, int) and not isinstance(default, bool) else None
    if frames is not None:
        if frames < 1:
            raise ValueError(f"--frames must be >= 1, got {frames}")
        return frames, default
    if lora_info.get("num_frames"):
        return int(lora_info["num_frames"]), default
    if default is None:
        raise ValueError(f"{type(pipe).__name__} has no default frame count; pass --frames")
    return (default - 1) * extend + 1, default


def plan_long(pipe, *, options: dict[str, Any], frames: int | None = None, extend: int = 2,
              height: int | None = None, width: int | None = None, lora: str | None = None) -> LongPlan:
    """Load the LoRA (if any) and settle the options, the length and the size of a long render."""
    lora_info = load_lora(pipe, lora) if lora else {}
    n, default = _long_frames(pipe, frames, extend, lora_info)
    return LongPlan(
        options={**lora_info.get("radial", {}), **options}, frames=n, height=height or lora_info.get("height"),
        width=width or lora_info.get("width"), default_frames=default, lora_kind=lora_info.get("kind"), lora=lora_info,
    )


def render_long(pipe, prompt: str, plan: LongPlan, *, seed: int = 0, **call: Any) -> tuple[Any, float]:
    """Generate with `radial` installed per `plan` (`call`: other pipeline arguments); returns (result, seconds)."""
    from diffattn.generate import run_generation

    return run_generation(pipe, prompt, method="radial", options=plan.options, seed=seed, height=plan.height,
                          width=plan.width, num_frames=plan.frames, output_type="np", **call)
