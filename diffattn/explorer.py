"""Mask explorer: the block/tile pattern a method computes at a named model geometry, its density and the speed-up
that density bounds. One function (`explore_mask`) serves `diffattn mask` and the app's Mask explorer.

Every method whose spec has a `preview_mask` can be explored (`METHODS`); the spec says which of its options shape
the mask and draws it (radial: its block mask; gna and freeswim: the key tiles our neighborhood-attention kernel
visits, from the same tables the kernel reads). The pictures and numbers are `diffattn.masks.preview`'s.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import parse_structured
from .masks.preview import MaskView
from .methods.spec import MethodSpec
from .registry import get_method, method_specs

logger = logging.getLogger("diffattn")

__all__ = ["GEOMETRIES", "METHODS", "Geometry", "MaskView", "explore_mask", "mask_options", "parse_mask_options"]


@dataclass(frozen=True)
class Geometry:
    """A model's token grid after patchify: ``(frames, height, width)`` for video, ``(height, width)`` for images."""

    name: str
    grid: tuple[int, ...]
    family: str  # a diffattn.adapters family name; "image" for an image model whose family does not matter here
    doc: str

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


def _geometries(*items: Geometry) -> dict[str, Geometry]:
    return {g.name: g for g in items}


# Exact production shapes: /work/shared/ecosystem.md section 5 (latent frames (F-1)/4+1, tokens (H/16)x(W/16)).
GEOMETRIES: dict[str, Geometry] = _geometries(
    Geometry("wan-1.3b-480p", (21, 30, 52), "wan", "Wan2.1 T2V 1.3B, 480x832, 81 frames (32,760 tokens)"),
    Geometry("wan-14b-480p", (21, 30, 52), "wan", "Wan2.1 T2V 14B, 480x832, 81 frames (32,760 tokens)"),
    Geometry("wan-14b-720p", (21, 45, 80), "wan", "Wan2.1 T2V 14B, 720x1280, 81 frames (75,600 tokens)"),
    Geometry("wan-14b-768p", (18, 48, 80), "wan", "Wan2.1 14B at Radial's default 768x1280, 69 frames (69,120 tokens)"),
    Geometry("hunyuan-720p", (33, 45, 80), "hunyuan_video", "HunyuanVideo, 720x1280, 129 frames (118,800 tokens)"),
    Geometry("hunyuan-768p", (30, 48, 80), "hunyuan_video",
             "HunyuanVideo, 768x1280, 117 frames (115,200 tokens; STA/NATTEN's shape, gna preset hunyuan-720p)"),
    Geometry("cogvideox-480p", (13, 30, 45), "cogvideox", "CogVideoX 2B/5B, 480x720, 49 frames (17,550 tokens)"),
    Geometry("flux-1024", (64, 64), "flux", "FLUX.1-dev 1024x1024 (4,096 image tokens)"),
    Geometry("flux-4k", (256, 256), "flux", "FLUX.1-dev 4096x4096 (65,536 tokens; gna preset flux-4k)"),
    Geometry("sd3-1024", (64, 64), "sd3", "SD3 / SD3.5 1024x1024 (4,096 image tokens)"),
)


def model_geometry(name: str, folder: str | Path, doc: str) -> Geometry:
    """The token grid a pipeline folder's transformer sees at the size its weights were trained at, read from its
    configs (no weights loaded): `training.json` (height, width, frames or size), the VAE's scale factors and the
    transformer's patch size and class (its family)."""
    from .adapters import FAMILIES

    root = Path(folder)

    def read(rel: str) -> dict[str, Any]:
        return json.loads((root / rel).read_text())

    trained = read("training.json")["config"]
    if (root / "unet" / "config.json").is_file():  # a UNet folder: its top level sees the latent grid itself
        factor = 2 ** (len(read("vae/config.json").get("block_out_channels", [0, 0, 0, 0])) - 1)
        return Geometry(name, (trained["size"] // factor, trained["size"] // factor), "unet", doc)
    vae, transformer = read("vae/config.json"), read("transformer/config.json")
    spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
    patch = transformer["patch_size"]
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (1, patch, patch)
    family = next((a.name for a in FAMILIES.values() if transformer["_class_name"] in a.model_classes), "image")
    if "num_frames" in trained:
        grid = ((trained["num_frames"] - 1) // temporal // patch[0] + 1, trained["height"] // spatial // patch[1],
                trained["width"] // spatial // patch[2])
    else:
        grid = (trained["size"] // spatial // patch[1], trained["size"] // spatial // patch[2])
    return Geometry(name, grid, family, doc)


def _demo_geometries() -> list[Geometry]:
    """The bundled demo models' grids, from their configs (left out when the weights are not installed)."""
    from .demo import DEMO_MODELS, assets_dir

    out = []
    for kind, name in DEMO_MODELS.items():
        folder = assets_dir() / name
        if (folder / "training.json").is_file() and (folder / "transformer" / "config.json").is_file():  # DiTs only
            out.append(model_geometry(name, folder, f"the bundled demo {kind} model (diffattn.demo), from its config"))
    return out


GEOMETRIES.update(_geometries(*_demo_geometries()))


# Methods the explorer can draw: those whose spec has a `preview_mask`, in registration order.
METHODS: tuple[str, ...] = tuple(spec.name for spec in method_specs() if spec.preview_mask is not None)

def _spec(method: str) -> MethodSpec:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"no mask picture for method {method!r}; accepted methods: {', '.join(METHODS)}")
    return get_method(method)


def mask_options(method: str) -> dict[str, str]:
    """Options `explore_mask` accepts for `method`, with their help text (the method's own, where it has one)."""
    spec = _spec(method)
    specs = {s.name: s for s in spec.config_cls.option_specs()}
    out = {name: f"{specs[name].help} ({specs[name].accepted()})" for name in spec.preview_mask.options}
    out.update(spec.preview_mask.extras)
    return out


def parse_mask_options(method: str, pairs: list[str] | dict[str, str]) -> dict[str, Any]:
    """CLI/app text (``["decay_factor=0.2", "kernel_size=18,24,24"]`` or a dict of strings) -> typed options.

    Config options are parsed by the method's config (its types and messages); the explorer-only options (tile
    shapes, ``layer``) as structured values (comma-separated ints). Unknown names raise `ValueError` listing the
    accepted ones.
    """
    spec = _spec(method)
    items: list[tuple[str, str]] = []
    if isinstance(pairs, dict):
        items = [(str(k), str(v)) for k, v in pairs.items()]
    else:
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"mask options are key=value, got {pair!r}")
            items.append((key.strip(), value))
    out: dict[str, Any] = {}
    for key, value in items:
        if key in spec.preview_mask.options:
            out[key] = spec.config_cls.parse_option(key, value)
        elif key in spec.preview_mask.extras:
            out[key] = parse_structured(value.strip())
        else:
            raise ValueError(_unknown_option(spec, key))
    return out


def _unknown_option(spec: MethodSpec, key: str) -> str:
    accepted = ", ".join((*spec.preview_mask.options, *spec.preview_mask.extras))
    return f"unknown mask option {key!r} for method {spec.name!r}; accepted: {accepted}"


def _resolve_geometry(geometry: str | tuple[int, ...] | list[int], family: str | None) -> tuple[str, tuple[int, ...], str]:
    """(label, grid, family) from a name of `GEOMETRIES` or an explicit grid."""
    if isinstance(geometry, str):
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {geometry!r}; accepted: {', '.join(GEOMETRIES)} or a grid (F, H, W) / (H, W)")
        g = GEOMETRIES[geometry]
        return g.name, g.grid, family or g.family
    if not isinstance(geometry, (tuple, list)) or len(geometry) not in (2, 3) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in geometry
    ):
        raise ValueError(
            f"geometry must be a name ({', '.join(GEOMETRIES)}) or a grid of 2 or 3 ints >= 1 "
            f"((frames, height, width) or (height, width)), got {geometry!r}"
        )
    grid = tuple(int(v) for v in geometry)
    return "x".join(map(str, grid)), grid, family or ("wan" if len(grid) == 3 else "image")


def explore_mask(method: str, geometry: str | tuple[int, ...], *, family: str | None = None, **options: Any) -> MaskView:
    """The mask `method` computes at `geometry`, with the method's own options and defaults.

    Args:
        method: a method of `METHODS` (``radial``, ``gna``, ``freeswim``).
        geometry: a name from `GEOMETRIES` or a token grid ``(frames, height, width)`` / ``(height, width)``.
        family: the model family whose defaults apply (default: the geometry's; ``wan`` for explicit video grids).
        options: the method's mask options (`mask_options(method)` lists them), e.g. ``decay_factor=0.2``,
            ``kernel_size=(18, 24, 24)``, ``base_height=480``; ``q_tile``/``kv_tile`` pick tile shapes (gna, freeswim).

    Raises:
        ValueError: unknown method, geometry or option, or a value the method refuses; the message names it and
            what is accepted.
    """
    spec = _spec(method)
    label, grid, fam = _resolve_geometry(geometry, family)
    preview = spec.preview_mask
    unknown = [k for k in options if k not in preview.options and k not in preview.extras]
    if unknown:
        raise ValueError(_unknown_option(spec, unknown[0]))
    config = spec.config_cls.from_options(**{k: v for k, v in options.items() if k in preview.options})
    extras = {k: v for k, v in options.items() if k in preview.extras}
    if preview.needs_activations:
        extras["activations"] = capture_self_attention(grid, model=extras.get("model"), layer=int(extras.get("layer", 2)))
    return preview.draw(label, grid, fam, config, extras)


_CAPTURE_MAX_TOKENS = 40_000  # one CPU forward of the model at the explorer's grid


def capture_self_attention(
    grid: tuple[int, ...], *, model: str | None = None, layer: int = 2, timestep: float = 700.0, seed: int = 0
) -> tuple[Any, Any]:
    """One forward of a Wan transformer (default: the bundled demo video model) on a noise latent at `grid`, with a
    random text embedding; returns the transformer and layer `layer`'s self-attention `AttentionCall` (real q/k/v,
    for methods whose selection depends on them)."""
    import torch
    from diffusers import WanTransformer3DModel

    from . import api
    from .demo import demo_model_path
    from .methods.toolkit import dense_attention

    if len(grid) != 3:
        raise ValueError(f"this preview needs a video grid (frames, height, width), got {grid}")
    if grid[0] * grid[1] * grid[2] > _CAPTURE_MAX_TOKENS:
        raise ValueError(f"this preview runs one CPU forward at the grid; {grid} has more than "
                         f"{_CAPTURE_MAX_TOKENS:,} tokens: pick a smaller geometry (e.g. the demo model's)")
    tr = WanTransformer3DModel.from_pretrained(model or demo_model_path("video"), subfolder="transformer").eval()
    if not 0 <= layer < tr.config.num_layers:
        raise ValueError(f"layer must be in 0..{tr.config.num_layers - 1}, got {layer}")
    pt, ph, pw = tr.config.patch_size
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, tr.config.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw, generator=g),
        "timestep": torch.tensor([timestep]),
        "encoder_hidden_states": torch.randn(1, 16, tr.config.text_dim, generator=g),
    }
    captured: dict[str, Any] = {}

    class _Grab:
        name = "dense"

        def attend(self, call):
            if call.role == "self" and call.layer.index == layer:
                captured["call"] = call
            return dense_attention(call)

    api.apply(tr, "dense")
    try:
        api.replace_runtime(tr, _Grab())
        with torch.no_grad():
            tr(**inputs, return_dict=False)
    finally:
        api.remove(tr)
    return tr, captured["call"]
