"""`radial`: Radial Attention (Li, Li et al., NeurIPS 2025) — a static O(n log n) spatio-temporal block mask on
video self-attention, with dense warm-up steps and dense first layers.

Differences from upstream, on purpose: any geometry (tokens per frame need not be a multiple of the block size;
see `diffattn.masks.radial`), any batch (CFG as one batch-2 pass or two passes), text padding honoured per batch
element, and the mask built once per geometry and device, its index lists once per mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import Any

from ..call import AttentionCall
from ..config import MethodConfig, option
from ..masks.preview import MaskView, block_picture, check_mask_size
from ..masks.radial import describe, radial_mask
from .base import AttentionMethod
from .block_masked import block_masked_attention
from .spec import DemoGeometry, MaskPreview, MethodSpec
from .toolkit import DenseWarmup, dense_attention, log_once, require_grid

# Defaults per family, from the upstream scripts (Wan 2.1 T2V 14B and HunyuanVideo T2V, 1x length). Upstream has
# no CogVideoX integration: its defaults here are untuned (Wan's warm-up, a conservative decay factor of 1.0).
FAMILY_DEFAULTS = {
    "wan": {"dense_timesteps": 12, "dense_layers": 1, "decay_factor": 0.2, "sink": True},
    "hunyuan_video": {"dense_timesteps": 12, "dense_layers": 0, "decay_factor": 0.95, "sink": False},
    "cogvideox": {"dense_timesteps": 12, "dense_layers": 1, "decay_factor": 1.0, "sink": True},
}


@dataclass
class RadialConfig(MethodConfig):
    dense_timesteps: int | None = option(
        None, low=0, help="the first N denoising steps run dense (None: family default, 12; upstream Wan 2.2: 11)"
    )
    dense_layers: int | None = option(
        None, low=0, help="layers with index < N run dense (None: family default: Wan 1, HunyuanVideo 0, CogVideoX 1)"
    )
    dense_last_steps: int = option(
        0, low=0, help="the last N steps also run dense (needs the step count; users report fewer artifacts)"
    )
    decay_factor: float | None = option(
        None, low=0.0, low_inclusive=False, high=16.0,
        help="band-width multiplier, lower is sparser (None: family default: Wan 0.2, HunyuanVideo 0.95, CogVideoX 1.0)",
    )
    block_size: int = option(
        128, choices=(16, 32, 64, 128), help="mask block size in tokens (128 default; 64 as upstream Wan 2.2; 16/32 small models)"
    )
    sink: bool | None = option(
        None, help="every query attends all of frame 0 (None: family default: Wan and CogVideoX yes, HunyuanVideo no)"
    )


class RadialMethod(AttentionMethod):
    def __init__(self, config: RadialConfig) -> None:
        super().__init__(config)
        self._masks: dict[tuple, torch.Tensor] = {}

    def settings(self, family: str) -> dict:
        """The effective settings for `family`: explicit options over the family defaults."""
        out = dict(FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["wan"]))
        for key in out:
            value = getattr(self.config, key)
            if value is not None:
                out[key] = value
        out["block_size"] = self.config.block_size
        out["dense_last_steps"] = self.config.dense_last_steps
        return out

    def runs_dense(self, call: AttentionCall, s: dict) -> bool:
        """Warm-up steps, dense first layers, and the optional last steps."""
        warmup = DenseWarmup(s["dense_layers"], s["dense_timesteps"], s["dense_last_steps"])
        return warmup.runs_dense(call, self.name)

    def mask_for(self, frames: int, tokens_per_frame: int, s: dict, device: torch.device) -> torch.Tensor:
        """The block mask on `device`, built once per geometry and device (its index lists are cached per mask)."""
        key = (frames, tokens_per_frame, s["block_size"], s["decay_factor"], s["sink"], str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = radial_mask(
                frames, tokens_per_frame, block_size=s["block_size"], decay_factor=s["decay_factor"], sink=s["sink"]
            ).to(device)
            self._masks[key] = mask
            density = mask.float().mean().item()
            log_once(
                f"radial:{key}",
                "diffattn radial: %d frames x %d tokens, block %d: mask density %.3f",
                frames, tokens_per_frame, s["block_size"], density,
            )
        return mask

    def attend(self, call: AttentionCall) -> torch.Tensor:
        if call.role not in ("self", "joint"):
            return dense_attention(call)  # text / image cross-attention is not masked
        family = call.context.family if call.context is not None else "wan"
        s = self.settings(family)
        if self.runs_dense(call, s):
            return dense_attention(call)
        grid = require_grid(call, self.name)
        if grid.frames < 2:
            log_once(f"radial:single-frame:{call.layer.path}", "diffattn radial: a single frame has no temporal decay; running dense")
            return dense_attention(call)
        mask = self.mask_for(grid.frames, grid.tokens_per_frame, s, call.q.device)
        return block_masked_attention(call, mask, s["block_size"])


# ---- what other tools read: the quality bench's demo options and the Mask explorer's picture --------------------
def _demo_options(g: DemoGeometry) -> dict[str, Any]:
    # Radial's blocks must tile a frame several times for its frame-distance bands to mean anything: the largest
    # allowed block with >= 4 blocks per frame (256 tokens/frame -> 64). Its warm-up is 12 dense steps of 50
    # upstream; keep that share of our (fewer) steps.
    per_frame = g.grid.tokens_per_frame
    block = max([b for b in (16, 32, 64, 128) if per_frame // b >= 4] or [16])
    return {"block_size": block, "dense_timesteps": round(g.steps * 12 / 50)}


def _preview(label: str, grid: tuple[int, ...], family: str, cfg: RadialConfig, extras: dict[str, Any]) -> MaskView:
    """Radial's block mask at `grid` with the family's defaults under the given options."""
    if len(grid) != 3 or grid[0] < 2:
        raise ValueError(f"radial needs a video geometry with at least 2 frames (frames, height, width); got {label}")
    s = RadialMethod(cfg).settings(family)
    frames, tokens = grid[0], grid[1] * grid[2]
    nb = -(-frames * tokens // s["block_size"])
    check_mask_size(nb, nb, f"the radial mask of {label} at block size {s['block_size']}",
                    "use a larger block_size or a smaller grid")
    kwargs = {"block_size": s["block_size"], "decay_factor": float(s["decay_factor"]), "sink": bool(s["sink"])}
    mask = radial_mask(frames, tokens, **kwargs)
    info = {"method": "radial", "geometry": label, "family": family, "grid": "x".join(map(str, grid)),
            **describe(frames, tokens, **kwargs)}
    density = info["density"]
    caption = (f"radial {label} ({frames}x{tokens}) block {s['block_size']} decay {s['decay_factor']:g}"
               f"{'' if s['sink'] else ' no sink'} - density {density:.1%} ({info['kept_blocks']}/{mask.numel()} blocks)")
    image, info["picture"] = block_picture(mask, caption, tokens_per_frame=tokens, block_size=s["block_size"])
    return MaskView("radial", grid, image, density, 1.0 / density, info)


SPEC = MethodSpec(
    name="radial",
    summary="Radial Attention: static O(n log n) spatio-temporal block mask, dense warm-up steps and layers",
    config_cls=RadialConfig,
    families=("wan", "hunyuan_video", "cogvideox"),
    build=RadialMethod,
    demo_options=_demo_options,
    preview_mask=MaskPreview(_preview, options=("block_size", "decay_factor", "sink")),
    cli_flags=("decay_factor", "dense_timesteps", "dense_layers", "block_size"),
)
