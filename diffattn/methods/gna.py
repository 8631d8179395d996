"""`gna`: generalized neighborhood attention (NATTEN semantics: window, stride, dilation, causal per axis) over the
video/image token grid, text tokens as extra keys every visual query attends, text queries dense.

Video families (Wan, HunyuanVideo, CogVideoX) use 3-D windows over (frames, height, width); image families (FLUX,
SD3) use 2-D windows over (height, width). Settings may differ per layer (`per_layer`, or a preset such as the
published HunyuanVideo and FLUX-4K configurations). A window larger than the grid at the running resolution is
clamped to the grid (logged once); -1 means the whole axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..call import AttentionCall
from ..config import MethodConfig, option
from ..families import IMAGE_FAMILIES
from ..kernels.neighborhood import grid_neighborhood_attention
from ..masks.preview import TILE_EXTRAS, MaskView, window_view
from .base import AttentionMethod
from .spec import DemoGeometry, MaskPreview, MethodSpec
from .toolkit import DenseWarmup, can_split, dense_attention, log_once, require_grid, visual_with_text

# Published configurations (NATTEN docs / GNA paper) and a Cosmos-style per-layer mix for Wan 720p.
PRESETS: dict[str, dict[str, Any]] = {
    "hunyuan-720p": {
        "doc": "HunyuanVideo 720p (latent 30x48x80): window (18,24,24), stride (16,8,8), ~91% sparse (GNA paper)",
        "kernel_size": (18, 24, 24),
        "stride": (16, 8, 8),
    },
    "hunyuan-720p-na": {
        "doc": "HunyuanVideo 720p: plain neighborhood attention window (18,24,24), stride 1",
        "kernel_size": (18, 24, 24),
        "stride": 1,
    },
    "flux-4k": {
        "doc": "FLUX.1-dev 4K (256x256 tokens): window (80,80), stride (16,16), ~90% sparse (GNA paper)",
        "kernel_size": (80, 80),
        "stride": (16, 16),
    },
    "wan-720p-cosmos-mix": {
        "doc": (
            "Wan 720p (21x45x80): a Cosmos-Predict2-style per-layer mix: every 4th layer (0, 4, ...) a wide window "
            "(-1,20,40) stride (1,4,8), every 4th from 2 a sparse-global window (-1,4,16) dilation (1,11,5), the "
            "others a local window (-1,12,24) stride (1,4,8). The mix rule is ours; the three windows are Cosmos'"
        ),
        "kernel_size": (-1, 12, 24),
        "stride": (1, 4, 8),
        "per_layer_rule": "cosmos-mix",
    },
}


def _per_axis_values(value: Any, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


@dataclass
class GNAConfig(MethodConfig):
    kernel_size: Any = option(
        None, help="window per axis (int, or (T,H,W) / (H,W)); -1 = the whole axis. Needed unless a preset is given"
    )
    stride: Any = option(1, help="stride per axis (1 = sliding window, = kernel_size = blocked)")
    dilation: Any = option(1, help="dilation per axis")
    is_causal: Any = option(False, help="causal per axis (bool or tuple)")
    preset: str | None = option(None, choices=(None, *PRESETS), help="a published configuration by name")
    layers: list | None = option(None, help="layer indices that use GNA (None: all); the others run dense")
    per_layer: dict | None = option(
        None, help="{layer_index: {kernel_size/stride/dilation/is_causal: ...}} overrides for single layers"
    )
    dense_timesteps: int = option(0, low=0, help="the first N denoising steps run dense")

    def check(self) -> None:
        if self.kernel_size is None and self.preset is None:
            raise ValueError("method 'gna' needs kernel_size=... or preset=...; presets: " + ", ".join(PRESETS))
        for name in ("kernel_size", "stride", "dilation"):
            value = getattr(self, name)
            if value is None:
                continue
            for v in _per_axis_values(value, name):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"option {name!r} of method 'gna' must be ints, got {value!r}")
                low = -1 if name == "kernel_size" else 1
                if v < low or v == 0:
                    raise ValueError(
                        f"option {name!r} of method 'gna' got {value!r}; expected ints >= 1"
                        + (" (or -1 for the whole axis)" if name == "kernel_size" else "")
                    )
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"option 'layers' of method 'gna' must be a list of layer indices >= 0, got {self.layers!r}")
        if self.per_layer is not None:
            allowed = {"kernel_size", "stride", "dilation", "is_causal"}
            for key, settings in self.per_layer.items():
                if not isinstance(key, int) or key < 0 or not isinstance(settings, dict) or set(settings) - allowed:
                    raise ValueError(
                        "option 'per_layer' of method 'gna' must map layer indices >= 0 to dicts with keys "
                        f"{sorted(allowed)}, got {{{key!r}: {settings!r}}}"
                    )


def spatial_shape(grid: tuple[int, ...], family: str) -> tuple[int, ...]:
    """The grid GNA attends over: (frames, height, width) for video, (height, width) for image families and
    single frames."""
    if len(grid) == 3 and (family in IMAGE_FAMILIES or grid[0] == 1):
        return tuple(grid[1:])
    return tuple(grid)


class GNAMethod(AttentionMethod):
    def settings_for(self, layer_index: int) -> dict[str, Any]:
        """Window, stride, dilation and causality of one layer (preset, then options, then per-layer overrides)."""
        cfg = self.config
        out: dict[str, Any] = {"kernel_size": None, "stride": 1, "dilation": 1, "is_causal": False}
        if cfg.preset is not None:
            preset = PRESETS[cfg.preset]
            out.update({k: preset[k] for k in ("kernel_size", "stride", "dilation", "is_causal") if k in preset})
            if preset.get("per_layer_rule") == "cosmos-mix" and layer_index >= 0:
                if layer_index % 4 == 0:
                    out.update(kernel_size=(-1, 20, 40), stride=(1, 4, 8), dilation=1)
                elif layer_index % 4 == 2:
                    out.update(kernel_size=(-1, 4, 16), stride=1, dilation=(1, 11, 5))
        if cfg.kernel_size is not None:
            out["kernel_size"] = cfg.kernel_size
        for key in ("stride", "dilation", "is_causal"):
            if getattr(cfg, key) != {"stride": 1, "dilation": 1, "is_causal": False}[key]:
                out[key] = getattr(cfg, key)
        if cfg.per_layer and layer_index in cfg.per_layer:
            out.update(cfg.per_layer[layer_index])
        return out

    def fit(self, shape: tuple[int, ...], s: dict[str, Any], where: str) -> dict[str, tuple]:
        """Per-axis settings for a spatial `shape`, clamped to it (logged once when anything is clamped)."""
        n = len(shape)

        def axes(value, name):
            values = _per_axis_values(value, name)
            if len(values) == 1:
                values = values * n
            if len(values) == n + 1 and n == 2:  # a (T, H, W) setting on an image grid: drop T
                values = values[1:]
            if len(values) != n:
                raise ValueError(f"gna: {name}={value!r} does not fit a {n}-D token grid {shape} ({where})")
            return tuple(values)

        ks, st, dl = axes(s["kernel_size"], "kernel_size"), axes(s["stride"], "stride"), axes(s["dilation"], "dilation")
        causal = axes(s["is_causal"], "is_causal")
        new_ks, new_dl, new_st = [], [], []
        for size, k, d, st_i in zip(shape, ks, dl, st):
            d = min(d, size)
            k = size // d if k == -1 else min(k, size // d)
            new_ks.append(k)
            new_dl.append(d)
            new_st.append(min(st_i, k))
        fitted = {"kernel_size": tuple(new_ks), "stride": tuple(new_st), "dilation": tuple(new_dl), "is_causal": causal}
        if fitted["kernel_size"] != tuple(size // d if k == -1 else k for size, k, d in zip(shape, ks, dl)) or (
            tuple(new_dl) != dl or tuple(new_st) != st
        ):
            log_once(
                f"gna:clamp:{shape}:{s}",
                "diffattn gna: window %s stride %s dilation %s clamped to %s for token grid %s",
                ks, st, dl, fitted, shape,
            )
        return fitted

    def attend(self, call: AttentionCall) -> torch.Tensor:
        if not can_split(call):
            return dense_attention(call)
        if self.config.layers is not None and call.layer.index not in self.config.layers:
            return dense_attention(call)
        if DenseWarmup(first_steps=self.config.dense_timesteps).runs_dense(call, self.name):
            return dense_attention(call)
        grid = require_grid(call, self.name)
        shape = spatial_shape(tuple(grid), call.context.family if call.context is not None else "")
        s = self.fit(shape, self.settings_for(call.layer.index), call.layer.path)

        def visual(batch_index, q, k, v, extra_k, extra_v):
            return grid_neighborhood_attention(q, k, v, shape, **s, scale=call.scale, extra_k=extra_k, extra_v=extra_v)

        return visual_with_text(call, visual)


# ---- what other tools read: the quality bench's demo options and the Mask explorer's picture --------------------
def _odd_half(n: int) -> int:
    """About half of an axis, odd (a centred window), at least 1 and at most the axis."""
    k = max(1, n // 2)
    return k if k % 2 else k + 1  # n // 2 + 1 <= n for n >= 2


def _demo_options(g: DemoGeometry) -> dict[str, Any]:
    # GNA has no default window; the presets are for 720p/4K grids, larger than the demo grids. Use about half of
    # each axis (odd, centred): 17x16x16 -> (9, 9, 9), 64x64 -> (33, 33); each query sees ~17-27% of the keys.
    axes = tuple(g.grid) if g.family not in IMAGE_FAMILIES else (g.grid.height, g.grid.width)
    return {"kernel_size": tuple(_odd_half(n) for n in axes)}


def _preview(label: str, grid: tuple[int, ...], family: str, cfg: GNAConfig, extras: dict[str, Any]) -> MaskView:
    """The key tiles our kernel visits for one layer's window at `grid`."""
    extras = dict(extras)
    layer = extras.pop("layer", 0)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")
    method = GNAMethod(cfg)
    shape = spatial_shape(grid, family)
    settings = method.fit(shape, method.settings_for(layer), "mask explorer")
    head = {"method": "gna", "geometry": label, "family": family, "layer": layer}
    if cfg.preset:
        head["preset"] = cfg.preset
    return window_view("gna", label, shape, settings, extras, head)


SPEC = MethodSpec(
    name="gna",
    summary="generalized neighborhood attention (window, stride, dilation, causal) over the token grid",
    config_cls=GNAConfig,
    families=("wan", "hunyuan_video", "cogvideox", "flux", "sd3"),
    build=GNAMethod,
    demo_options=_demo_options,
    preview_mask=MaskPreview(
        _preview,
        options=("kernel_size", "stride", "dilation", "is_causal", "preset"),
        extras={**TILE_EXTRAS, "layer": "layer index, for presets whose window differs per layer (default 0)"},
    ),
)
