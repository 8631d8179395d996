"""`rectified`: Rectified SpaAttn (Liu et al., arXiv 2511.19835) on video/image DiT self- and joint attention.

The video tokens run in a compact 3-D order (`diffattn.masks.reorder`): the whole block stack of each forward runs
in it (`diffattn.token_order`: permuted once as they enter the first block, the rotary table permuted alike so RoPE
sees the original positions, put back once before the output norm), so no layer gathers; where a forward must keep
the model's order (Wan 2.2 TI2V's per-token timesteps, HunyuanVideo token-replace I2V, FLUX ControlNet, context
parallelism, processors installed without `apply`) each call gathers q, k, v after RoPE and its output instead. Each
query block keeps the key blocks that hold `tau` of its pooled attention mass (at least
`int((1 - sa_drop_rate) * blocks)`, plus its 3-D neighbours and, on Wan, the frame-0 square), and the dropped mass
is put back from the pooled map (`R * O_spa + C`, fused into the block-sparse kernel's epilogue). Text keys are
token-level in the pooled map and always attended (IPAR); text queries run dense. The attention function itself
is `rectified_core.rectified_attention`.

Differences from upstream, on purpose: any token count (no multiple-of-128 rule), any batch (per-element
selection, batched CFG), any text length with padding honoured per batch element, Sq != Sk allowed, a backward
pass (training / LoRA), and the first-frame square is the exact set of frame-0 blocks of the order used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..call import AttentionCall
from ..config import MethodConfig, option
from ..masks import reorder as _reorder
from ..token_order import TokenOrder, active_order, begin
from .base import AttentionMethod
from .spec import DemoGeometry, MaskPreview, MethodSpec
from .toolkit import DenseWarmup, can_split, dense_attention, log_once, per_forward, require_grid, visual_with_text
from .rectified_core import (
    RectifiedPlan,
    rectified_attention,
    rectified_attention_reference,
    rectified_plan,
    resolve_k_min,
    threshold_select,
)

__all__ = [
    "MODEL_DEFAULTS",
    "RectifiedConfig",
    "RectifiedMethod",
    "RectifiedPlan",
    "model_variant",
    "rectified_attention",
    "rectified_attention_reference",
    "rectified_plan",
    "resolve_k_min",
    "threshold_select",
    "to_order",
]

logger = logging.getLogger("diffattn")


# ---- the method ---------------------------------------------------------------------------------------------------

# Upstream defaults per model (scripts of BienLuky/Rectified-SpaAttn; facts file table 2.2). tau is 0.3 everywhere.
# sa_drop_rate sets the top-k floor k_min = int((1 - sa_drop_rate) * key blocks). Warm-up: layers with index <
# dense_layers run dense (per expert on Wan 2.2), and the first dense_timesteps steps. first_frame: the square of
# frame-0 blocks is always kept (upstream's Wan processors only).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v": dict(sa_drop_rate=0.75, dense_layers=2, dense_timesteps=5, first_frame=True),
    "wan2.1-i2v": dict(sa_drop_rate=0.75, dense_layers=2, dense_timesteps=0, first_frame=True),
    "wan2.2-t2v": dict(sa_drop_rate=0.85, dense_layers=2, dense_timesteps=3, first_frame=True),
    "wan2.2-i2v": dict(sa_drop_rate=0.85, dense_layers=2, dense_timesteps=0, first_frame=True),
    # TI2V-5B: upstream gives the drop rate only; the warm-up is ours (Wan 2.2 I2V's)
    "wan2.2-ti2v": dict(sa_drop_rate=0.75, dense_layers=2, dense_timesteps=0, first_frame=True),
    "hunyuan_video": dict(sa_drop_rate=0.8, dense_layers=0, dense_timesteps=0, first_frame=False),
    "cogvideox-t2v": dict(sa_drop_rate=0.85, dense_layers=0, dense_timesteps=0, first_frame=False),
    "cogvideox-i2v": dict(sa_drop_rate=0.75, dense_layers=0, dense_timesteps=0, first_frame=False),
    "flux": dict(sa_drop_rate=0.9, dense_layers=0, dense_timesteps=0, first_frame=False),
}
FAMILY_VARIANT = {"wan": "wan2.1-t2v", "hunyuan_video": "hunyuan_video", "cogvideox": "cogvideox-t2v", "flux": "flux"}


def model_variant(family: str, model: Any = None, two_experts: bool = False) -> str:
    """Which row of `MODEL_DEFAULTS` a model is, from its config (Wan: `in_channels`, `image_dim`; Wan 2.2 T2V
    needs the pipeline's second expert to be told apart from Wan 2.1 T2V)."""
    cfg = getattr(model, "config", None)
    if family == "wan" and cfg is not None:
        in_ch = cfg.get("in_channels", 16) if hasattr(cfg, "get") else getattr(cfg, "in_channels", 16)
        image_dim = cfg.get("image_dim") if hasattr(cfg, "get") else getattr(cfg, "image_dim", None)
        if in_ch == 48:
            return "wan2.2-ti2v"
        if image_dim is not None:
            return "wan2.1-i2v"
        if in_ch > 16:
            return "wan2.2-i2v" if two_experts else "wan2.1-i2v"
        return "wan2.2-t2v" if two_experts else "wan2.1-t2v"
    if family == "cogvideox" and cfg is not None:
        in_ch = cfg.get("in_channels", 16) if hasattr(cfg, "get") else getattr(cfg, "in_channels", 16)
        return "cogvideox-i2v" if in_ch > 16 else "cogvideox-t2v"
    return FAMILY_VARIANT.get(family, "wan2.1-t2v")


@dataclass
class RectifiedConfig(MethodConfig):
    tau: float = option(0.3, low=0.0, high=1.0, help="cumulative pooled attention mass each query block keeps (1: dense)")
    sa_drop_rate: float | None = option(
        None, low=0.0, high=1.0,
        help="top-k floor: at least int((1 - rate) * key blocks) blocks (None: the model's upstream default, "
        "Wan 2.1 0.75, Wan 2.2 0.85, HunyuanVideo 0.8, CogVideoX 0.85 (I2V 0.75), FLUX 0.9)",
    )
    gapr: bool = option(True, help="GAPR: do not compensate dropped blocks whose pooling error bound exceeds the gain")
    dense_layers: int | None = option(
        None, low=0, help="layers with index < N run dense (None: model default: Wan 2, others 0)"
    )
    dense_timesteps: int | None = option(
        None, low=0, help="the first N steps run dense (None: model default: Wan 2.1 T2V 5, Wan 2.2 T2V 3, others 0)"
    )
    dense_last_steps: int = option(0, low=0, help="the last N steps also run dense")
    reorder: str = option(
        "tiles", choices=_reorder.ORDERS,
        help="token order that makes each block a compact 3-D region (tiles: serpentine boxes; gilbert: generalized "
        "Hilbert curve; none: raster order)",
    )
    block_size: int = option(128, choices=(16, 32, 64, 128), help="pooling and kernel block size in tokens")
    neighbors: bool = option(True, help="always keep the blocks adjacent in 3-D (26-neighbourhood) to each query block")
    first_frame: bool | None = option(
        None, help="always keep the frame-0 block square (None: model default: Wan yes, others no)"
    )


class RectifiedMethod(AttentionMethod):
    @property
    def reorders_tokens(self) -> bool:  # type: ignore[override]
        return self.config.reorder != "none"

    def __init__(self, config: RectifiedConfig) -> None:
        super().__init__(config)
        self._geo: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
        self._two_experts = False
        self._variants: dict[int, str] = {}
        self.record_stats = False  # benchmarks: keep per-call stats (adds a host sync per call)
        self.stats: list[dict[str, float]] = []

    def bind_pipeline(self, pipe: Any) -> None:
        """Wan 2.2 (two experts) is told apart from Wan 2.1 by the pipeline's `transformer_2`."""
        self._two_experts = getattr(pipe, "transformer_2", None) is not None

    def variant_of(self, family: str, model: Any = None) -> str:
        if model is None:
            return FAMILY_VARIANT.get(family, "wan2.1-t2v")
        key = id(model)
        if key not in self._variants:
            self._variants[key] = model_variant(family, model, self._two_experts)
            log_once(f"rectified:variant:{key}", "diffattn rectified: %s uses the %s defaults", type(model).__name__,
                     self._variants[key])
        return self._variants[key]

    def settings(self, family: str, model: Any = None) -> dict[str, Any]:
        """Effective settings: explicit options over the model's upstream defaults."""
        out = dict(MODEL_DEFAULTS[self.variant_of(family, model)])
        for key in ("sa_drop_rate", "dense_layers", "dense_timesteps", "first_frame"):
            value = getattr(self.config, key)
            if value is not None:
                out[key] = value
        for key in ("tau", "gapr", "dense_last_steps", "reorder", "block_size", "neighbors"):
            out[key] = getattr(self.config, key)
        return out

    def geometry(self, grid: tuple[int, int, int], s: dict[str, Any], device: torch.device):
        """(perm, inverse, forced blocks) on `device` for a grid, built once per grid and device."""
        key = (grid, s["reorder"], s["block_size"], s["neighbors"], s["first_frame"], str(device))
        hit = self._geo.get(key)
        if hit is None:
            order, bs = s["reorder"], s["block_size"]
            perm = inv = None
            if order != "none":
                perm = _reorder.token_order(grid, order, bs).to(device)
                inv = _reorder.inverse((grid, order, bs)).to(device)
            forced = None
            if s["neighbors"]:
                forced = _reorder.neighbor_blocks(grid, order, bs)
            if s["first_frame"] and grid[0] > 1:
                ff = _reorder.first_frame_blocks(grid, order, bs)
                forced = ff if forced is None else forced | ff
            if forced is not None:
                forced = forced.to(device)[None, None]
            hit = self._geo[key] = (perm, inv, forced)
        return hit

    def prepare_forward(self, ctx, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """Run this forward's block stack in the order of `reorder` (once per forward instead of gathers per layer),
        on every step (dense warm-up steps too: caches that reuse block outputs across steps need one order)."""
        hidden = arguments.get("hidden_states")
        if self.config.reorder == "none" or ctx.grid is None or not isinstance(hidden, torch.Tensor):
            return None
        s = ctx.extras[_SETTINGS_KEY] = self.settings(ctx.family, ctx.extras.get("module"))
        g3 = (int(ctx.grid.frames), int(ctx.grid.height), int(ctx.grid.width))
        perm, inv, _ = ctx.extras[_geometry_key(g3, hidden.device)] = self.geometry(g3, s, hidden.device)
        return begin(ctx, arguments, TokenOrder(perm, inv))

    def attend(self, call: AttentionCall) -> torch.Tensor:
        if call.role not in ("self", "joint") or not can_split(call):
            return dense_attention(call)
        ctx = call.context
        family = ctx.family if ctx is not None else "wan"
        model = ctx.extras.get("module") if ctx is not None else None
        s = per_forward(call, _SETTINGS_KEY, lambda: self.settings(family, model))
        if DenseWarmup(s["dense_layers"], s["dense_timesteps"], s["dense_last_steps"]).runs_dense(call, self.name):
            return dense_attention(call)
        grid = require_grid(call, self.name)
        g3 = (int(grid.frames), int(grid.height), int(grid.width))
        if grid.num_tokens != call.num_visual:
            log_once(f"rectified:tokens:{call.layer.path}", "diffattn rectified: layer %s has %d visual tokens for a "
                     "%s grid; it runs dense", call.layer.path, call.num_visual, g3)
            return dense_attention(call)
        # the permutation, its inverse and the forced blocks: looked up once per forward (built once per grid,
        # order and device); the per-layer work left is the gather of q, k, v (into contiguous [B, H, S, D], the
        # layout the sparse kernels run fastest on: measured, BENCHMARKS.md) and of the output (into [B, S, H, D]
        # memory, which replaces the adapter's own copy to [B, S, H * D])
        perm, inv, forced = per_forward(call, _geometry_key(g3, call.q.device),
                                        lambda: self.geometry(g3, s, call.q.device))
        if active_order(call) is not None:  # the whole forward runs in the order already: nothing to gather
            perm = inv = None
        k_min = 1.0 - s["sa_drop_rate"]

        def visual(batch_index, q, k, v, extra_k, extra_v):
            if perm is not None:
                q, k, v = q.index_select(2, perm), k.index_select(2, perm), v.index_select(2, perm)
            result = rectified_attention(
                q, k, v, block_size=s["block_size"], tau=s["tau"], k_min=k_min, gapr=s["gapr"], extra_k=extra_k,
                extra_v=extra_v, forced_blocks=forced, scale=call.scale, return_stats=self.record_stats,
            )
            if self.record_stats:
                result, st = result
                self.stats.append({**st, "layer": call.layer.index})
            return result if inv is None else to_order(result, inv)

        return visual_with_text(call, visual)


# per-forward values (`per_forward`), filled by `prepare_forward` where the forward has a context and reused by
# every attention call of that forward
_SETTINGS_KEY = "rectified:settings"


def _geometry_key(grid: tuple[int, int, int], device: torch.device) -> tuple:
    return ("rectified:geometry", grid, str(device))


def to_order(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[:, :, index]` of a `[B, H, S, D]` tensor, gathered as whole token rows of `H * D` values.

    The result is a `[B, H, S, D]` view of `[B, S, H, D]` memory, so that the adapters flatten it to `[B, S, H * D]`
    with no copy: used for the inverse gather of the attention output, which thereby takes the place of the copy the
    adapter would make anyway. (Not used for q, k, v: the sparse kernels run slower on that layout at HunyuanVideo
    720p, 104.5 vs 97.3 ms, BENCHMARKS.md.)"""
    return x.transpose(1, 2).index_select(1, index).transpose(1, 2)


# ---- what other tools read: the quality bench's demo options ------------------------------------------------------
def _demo_options(g: DemoGeometry) -> dict[str, Any]:
    """Small grids: 64-token blocks when there are >= 32 of them (else 16), and the upstream warm-up's share of the
    depth and the steps (Wan 2.1: 2 of 40 layers, 5 of 50 steps; the others none)."""
    block = 64 if g.grid.num_tokens >= 64 * 32 else 16
    s = MODEL_DEFAULTS[FAMILY_VARIANT.get(g.family, "wan2.1-t2v")]
    return {
        "block_size": block,
        "dense_layers": round(g.num_layers * s["dense_layers"] / 40),
        "dense_timesteps": round(g.steps * s["dense_timesteps"] / 50),
    }


def preview_selection(
    model: torch.nn.Module, call: AttentionCall, grid: tuple[int, ...], cfg: RectifiedConfig
) -> tuple[RectifiedPlan, dict[str, Any]]:
    """The selection rectified computes on the real q/k/v of `call` (one self-attention call of `model` at `grid`,
    captured by the Mask explorer). Returns the plan of that call (all heads) and its settings."""
    if len(grid) != 3:
        raise ValueError(f"rectified's preview needs a video grid (frames, height, width), got {grid}")
    method = RectifiedMethod(cfg)
    s = method.settings("wan", model)
    g3 = (int(grid[0]), int(grid[1]), int(grid[2]))
    perm, _, forced = method.geometry(g3, s, call.q.device)
    q, k, v = (x if perm is None else to_order(x, perm) for x in (call.q, call.k, call.v))
    plan = rectified_plan(q, k, v, block_size=s["block_size"], tau=s["tau"], k_min=1.0 - s["sa_drop_rate"],
                          gapr=s["gapr"], forced_blocks=forced, scale=call.scale)
    return plan, s


def _preview(label: str, grid: tuple[int, ...], family: str, cfg: RectifiedConfig, extras: dict[str, Any]):
    """The Mask explorer's picture: the kept blocks of one head (in the tiles order) of a real forward."""
    from ..masks.preview import MaskView, block_picture

    layer, head = int(extras.get("layer", 2)), int(extras.get("head", 0))
    model, call = extras["activations"]
    plan, s = preview_selection(model, call, grid, cfg)
    if not 0 <= head < plan.block_mask.shape[1]:
        raise ValueError(f"head must be in 0..{plan.block_mask.shape[1] - 1}, got {head}")
    mask = plan.block_mask[0, head]
    density = plan.density
    info = {"method": "rectified", "geometry": label, "family": family, "grid": "x".join(map(str, grid)),
            "layer": layer, "head": head, "density_all_heads": density,
            "density_head": mask.float().mean().item(), "mean_r": plan.out_scale.mean().item(),
            "unsafe_share_of_dropped": (plan.unsafe.sum() / (~plan.block_mask).sum().clamp_min(1)).item(),
            **{k: s[k] for k in ("tau", "sa_drop_rate", "block_size", "reorder", "gapr")}}
    caption = (f"rectified {label} layer {layer} head {head}: tau {s['tau']:g}, drop {s['sa_drop_rate']:g}, "
               f"block {s['block_size']} ({s['reorder']} order) - density {info['density_head']:.1%} "
               f"(all heads {density:.1%})")
    image, info["picture"] = block_picture(mask, caption, block_size=s["block_size"])
    return MaskView("rectified", tuple(grid), image, density, 1.0 / density, info)


SPEC = MethodSpec(
    name="rectified",
    summary="Rectified SpaAttn: dynamic top-p block selection + pooled-attention rectification (IPAR, GAPR)",
    config_cls=RectifiedConfig,
    families=("wan", "hunyuan_video", "cogvideox", "flux"),
    build=RectifiedMethod,
    demo_options=_demo_options,
    preview_mask=MaskPreview(
        _preview, options=("tau", "sa_drop_rate", "gapr", "block_size", "reorder", "neighbors", "first_frame"),
        extras={"model": "Wan model folder (default: the bundled demo video model)",
                "layer": "layer whose q/k are used (default 2)", "head": "head drawn (default 0)"},
        needs_activations=True,
    ),
)
