"""`freeswim`: FreeSwim (arXiv 2511.14712), training-free high-resolution video for Wan.

Self-attention is an inward sliding window whose spatial extent is the training resolution's token grid (full along
time): NATTEN's neighborhood attention with kernel (T, 2*dh+1, 2*dw+1). A second, full-attention branch runs in the
same batch (each conditional forward is duplicated: rows [window; full], the full branch re-seeded from the window
latent every step) and its text cross-attention output replaces the window branch's in every layer; image
cross-attention (I2V) is not overridden. Every `cache_steps` steps the full branch runs and its cross-attention
outputs are cached per layer; in between, conditional forwards run the window branch alone with the cached outputs.
Unconditional passes run the window branch with its own cross-attention.

Differences from upstream, on purpose: the window comes from `base_height/base_width` and the VAE and patch factors
(not fixed numbers); the attention scale is computed from the token counts (below) instead of upstream's constant
sqrt(log_1560(3120)); the text length is whatever the prompt has (upstream assumes 512); batch > 1 works; non-guide
steps run batch 1 instead of a wasted second row.

Scale (`scale_mode`): "keys" (default) multiplies the default 1/sqrt(d) by sqrt(log(n_keys) / log(n_train)), with
n_train the training token count (frames x base grid) and n_keys the keys the branch's queries attend (the window's
or all tokens); "upstream" uses upstream's factor computed from the base grid, sqrt(log(2 s) / log(s)) with s the base
tokens per frame; "none" keeps 1/sqrt(d).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttentionCall, ForwardContext
from ..config import MethodConfig, option
from ..geometry import TokenGrid
from ..kernels.neighborhood import grid_neighborhood_attention
from ..masks.preview import TILE_EXTRAS, MaskView, window_view
from .base import AttentionMethod
from .spec import DemoGeometry, MaskPreview, MethodSpec
from .toolkit import append_rows, keep_rows, log_once, require_grid

logger = logging.getLogger("diffattn")

DUAL, CACHED, WINDOW = "dual", "cached", "window"
# Wan's spatial patch (height, width): used when no per-forward context gives the model's own (processors
# installed by hand, the Mask explorer)
WAN_PATCH = (2, 2)


@dataclass
class FreeSwimConfig(MethodConfig):
    base_height: int = option(480, low=16, help="training height in pixels (the window is its token grid)")
    base_width: int = option(832, low=16, help="training width in pixels")
    cache_steps: int = option(2, low=1, help="the full branch runs every N steps; its cross-attention is reused between")
    cache_device: str = option("same", choices=("same", "cpu"), help="where the cross-attention cache lives")
    scale_mode: str = option("keys", choices=("keys", "upstream", "none"), help="attention scale rule (see docs)")
    vae_scale_factor: int = option(8, choices=(4, 8, 16), help="VAE spatial compression (Wan 2.1: 8; Wan 2.2 TI2V: 16)")
    dual_path: bool = option(True, help="run the full branch and its cross-attention override (False: window only)")


class FreeSwimMethod(AttentionMethod):
    def __init__(self, config: FreeSwimConfig) -> None:
        super().__init__(config)
        self.cache: dict[int, torch.Tensor] = {}
        self._cache_batch: int | None = None

    # ---- forward-level: duplicate the conditional input into [window; full] on guide steps --------------------
    def _mode(self, ctx: ForwardContext) -> str:
        if not self.config.dual_path:
            return WINDOW
        if ctx.pass_name not in ("cond", "uncond", None):
            log_once(
                "freeswim:batched-cfg",
                "diffattn freeswim: CFG runs as one batched pass (%s); the full branch and its cross-attention "
                "override need separate cond/uncond passes, so only the window branch runs",
                ctx.pass_name,
            )
            return WINDOW
        conditional = ctx.pass_name == "cond" or (ctx.pass_name is None and ctx.pass_index == 0)
        if not conditional:
            return WINDOW
        if ctx.step_index % self.config.cache_steps == 0 or not self.cache:
            return DUAL
        return CACHED

    def prepare_forward(self, ctx: ForwardContext, args: dict[str, Any]) -> dict[str, Any] | None:
        if ctx.step_index == 0 and ctx.pass_index == 0:
            self.cache.clear()  # a new generation
        mode = self._mode(ctx)
        ctx.extras["freeswim_mode"] = mode
        ctx.extras["freeswim_batch"] = ctx.batch_size
        if mode != DUAL:
            return None
        return append_rows(args, ctx.batch_size, slice(0, ctx.batch_size))  # rows [window; full]

    def finish_forward(self, ctx: ForwardContext | None, output: Any) -> Any:
        mode = ctx.extras.get("freeswim_mode") if ctx is not None else None
        if mode in (DUAL, CACHED) and ctx.num_steps is not None and ctx.step_index >= ctx.num_steps - 1:
            # the generation's last conditional pass: nothing reads the cache again, so it does not outlive the
            # generation (up to ~15 GB at 1080p, on the GPU with cache_device="same")
            self.cache.clear()
        if mode != DUAL:
            return output
        return keep_rows(output, ctx.extras["freeswim_batch"])  # the window rows

    # ---- attention ------------------------------------------------------------------------------------------
    def base_grid(self, patch: tuple[int, int] = WAN_PATCH) -> tuple[int, int]:
        """The training resolution's token grid (height, width): base pixels / VAE factor / the model's patch."""
        vae = self.config.vae_scale_factor
        return self.config.base_height // vae // patch[0], self.config.base_width // vae // patch[1]

    def window(self, grid, patch: tuple[int, int] = WAN_PATCH) -> tuple[int, int, int]:
        """Kernel (T, 2*dh+1, 2*dw+1) from the base resolution, clamped to the grid."""
        base_h, base_w = self.base_grid(patch)
        dh, dw = base_h // 2, base_w // 2
        return grid.frames, min(2 * dh + 1, grid.height), min(2 * dw + 1, grid.width)

    def scale(self, head_dim: int, grid, n_keys: int, patch: tuple[int, int] = WAN_PATCH) -> float:
        default = head_dim**-0.5
        base_h, base_w = self.base_grid(patch)
        if self.config.scale_mode == "none":
            return default
        if self.config.scale_mode == "upstream":
            s = base_h * base_w
            return default * math.sqrt(math.log(2 * s) / math.log(s))
        n_train = grid.frames * base_h * base_w
        return default * math.sqrt(max(math.log(n_keys) / math.log(n_train), 1.0))

    def _window_attention(self, q, k, v, grid, patch: tuple[int, int]) -> torch.Tensor:
        kernel = self.window(grid, patch)
        scale = self.scale(q.shape[-1], grid, kernel[0] * kernel[1] * kernel[2], patch)
        return grid_neighborhood_attention(q, k, v, tuple(grid), kernel, scale=scale)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        ctx = call.context
        mode = ctx.extras.get("freeswim_mode", WINDOW) if ctx is not None else WINDOW
        if call.role == "self":
            grid = require_grid(call, self.name)
            patch = tuple(ctx.patch_size[1:]) if ctx is not None and ctx.patch_size else WAN_PATCH
            if mode != DUAL:
                return self._window_attention(call.q, call.k, call.v, grid, patch)
            b = call.q.shape[0] // 2
            out_w = self._window_attention(call.q[:b], call.k[:b], call.v[:b], grid, patch)
            scale = self.scale(call.q.shape[-1], grid, grid.num_tokens, patch)
            out_f = F.scaled_dot_product_attention(call.q[b:], call.k[b:], call.v[b:], scale=scale)
            return torch.cat([out_w, out_f], dim=0)
        if call.role == "cross" and mode == DUAL:
            b = call.q.shape[0] // 2
            out_f = F.scaled_dot_product_attention(call.q[b:], call.k[b:], call.v[b:], attn_mask=None, scale=call.scale)
            if self.config.cache_steps > 1:  # with 1 nothing is ever reused: holding it would only cost memory
                store = out_f.to("cpu", non_blocking=True) if self.config.cache_device == "cpu" else out_f
                self.cache[call.layer.index] = store
            return torch.cat([out_f, out_f], dim=0)
        if call.role == "cross" and mode == CACHED:
            cached = self.cache.get(call.layer.index)
            if cached is None or cached.shape[0] != call.q.shape[0] or cached.shape[2] != call.q.shape[2]:
                raise RuntimeError(
                    f"freeswim: no cached cross-attention for layer {call.layer.path} at this shape; the cache was "
                    "filled for another batch or resolution"
                )
            return cached.to(call.q.device, non_blocking=True)
        return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask, scale=call.scale)

    def __repr__(self) -> str:
        return f"FreeSwimMethod({self.config}, cached layers: {len(self.cache)})"


# ---- what other tools read ---------------------------------------------------------------------------------------
def _demo_options(g: DemoGeometry) -> dict[str, Any]:
    # FreeSwim's window is the training resolution's token grid, given in pixels through Wan's VAE factor (4, 8, 16)
    # and patch 2. At the demo's native size that grid would cover everything; use a base grid of half the
    # generated one (window 2*(H/4)+1 tokens, 16x16 -> 9x9), expressed in those pixel units with factor 4.
    bh, bw = max(2, g.grid.height // 2), max(2, g.grid.width // 2)
    return {"vae_scale_factor": 4, "base_height": bh * 2 * 4, "base_width": bw * 2 * 4}


def _preview(label: str, grid: tuple[int, ...], family: str, cfg: FreeSwimConfig, extras: dict[str, Any]) -> MaskView:
    """The window branch's key-tile visits: neighborhood attention with the window FreeSwim derives."""
    if len(grid) != 3:
        raise ValueError(f"freeswim needs a video geometry (frames, height, width); got {label}")
    window = FreeSwimMethod(cfg).window(TokenGrid(*grid))
    settings = {"kernel_size": window, "stride": (1, 1, 1), "dilation": (1, 1, 1), "is_causal": (False,) * 3}
    head = {"method": "freeswim", "geometry": label, "family": family, "base_height": cfg.base_height,
            "base_width": cfg.base_width, "vae_scale_factor": cfg.vae_scale_factor,
            "note": "window branch only; the full-attention branch runs dense every cache_steps steps"}
    return window_view("freeswim", label, grid, settings, extras, head)


SPEC = MethodSpec(
    name="freeswim",
    summary="FreeSwim: inward window + full-branch cross-attention override + cache, training-free high-res",
    config_cls=FreeSwimConfig,
    families=("wan",),
    build=FreeSwimMethod,
    demo_options=_demo_options,
    preview_mask=MaskPreview(_preview, options=("base_height", "base_width", "vae_scale_factor"), extras=TILE_EXTRAS),
    schedule_period=lambda cfg: cfg.cache_steps,
    pipeline_only="freeswim's work changes from step to step (full branch, cache reuse, CFG passes)",
)
