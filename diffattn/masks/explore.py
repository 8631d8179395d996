"""Mask explorer: the block/tile pattern a method computes at a named model geometry, its density and the speed-up
that density bounds. One function (`explore_mask`) serves `diffattn mask` and the app's Mask explorer.

- ``radial``: Radial Attention's block mask (`diffattn.masks.radial_mask`), the family's defaults from the method.
- ``gna``: the key tiles each query tile of our neighborhood-attention kernel visits, from the same tables the
  kernel reads (`diffattn.gna.simulate` gives the numbers).
- ``freeswim``: FreeSwim's inward window is neighborhood attention with the kernel FreeSwim derives from
  ``base_height``/``base_width`` (`FreeSwimMethod.window`), so it takes the ``gna`` path with that window.

Pictures larger than `MAX_PICTURE` blocks per side are down-sampled (a pixel is kept when any block it covers is
kept); the density and speed-up are always those of the full mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("diffattn")

__all__ = ["GEOMETRIES", "METHODS", "Geometry", "MaskView", "explore_mask", "mask_options", "parse_mask_options"]

# The picture never has more than this many blocks (tiles) per side: larger masks are OR-pooled down to it.
MAX_PICTURE = 768
# Tile masks up to this many elements are built whole (then pooled); above it rows/columns are point-sampled.
_MAX_FULL_ELEMENTS = 1 << 24


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
    Geometry("demo-video", (17, 16, 16), "wan", "the bundled demo video model (diffattn.demo)"),
    Geometry("demo-image", (64, 64), "image", "the bundled demo image model (diffattn.demo)"),
)


@dataclass(frozen=True)
class MaskView:
    """What the explorer shows for one (method, geometry, options).

    image: PIL picture of the block/tile mask (kept light, dropped dark) with a caption.
    density: kept fraction of dense attention's FLOPs that the kernel computes (kept blocks / all blocks).
    predicted_speedup: ``1 / density``, the attention speed-up bound at equal per-FLOP speed.
    info: the numbers `diffattn mask` prints (geometry, effective options, counts).
    """

    method: str
    grid: tuple[int, ...]
    image: Any = field(repr=False)
    density: float
    predicted_speedup: float
    info: dict[str, Any]

    def save(self, path: str) -> str:
        """Write the picture as PNG (parent folders are created); returns the path."""
        from pathlib import Path

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(out, format="PNG", optimize=True)
        return str(out)


# ------------------------------------------------------------------------------------------------------------------
# options: each method accepts the options of its own config that shape the mask, plus the kernel's tile shapes
# ------------------------------------------------------------------------------------------------------------------
_TILE_OPTIONS = ("q_tile", "kv_tile")
_CONFIG_OPTIONS = {
    "radial": ("block_size", "decay_factor", "sink"),
    "gna": ("kernel_size", "stride", "dilation", "is_causal", "preset"),
    "freeswim": ("base_height", "base_width", "vae_scale_factor"),
}
_EXTRA_OPTIONS = {"radial": (), "gna": (*_TILE_OPTIONS, "layer"), "freeswim": _TILE_OPTIONS}
_EXTRA_HELP = {
    "q_tile": "query tile shape per axis (default: the kernel's choice)",
    "kv_tile": "key tile shape per axis (default: the kernel's choice)",
    "layer": "layer index, for presets whose window differs per layer (default 0)",
}


def mask_options(method: str) -> dict[str, str]:
    """Options `explore_mask` accepts for `method`, with their help text (the method's own, where it has one)."""
    from ..registry import get_method

    _check_method(method)
    specs = {s.name: s for s in get_method(method).config_cls.option_specs()}
    out = {name: f"{specs[name].help} ({specs[name].accepted()})" for name in _CONFIG_OPTIONS[method]}
    out.update({name: _EXTRA_HELP[name] for name in _EXTRA_OPTIONS[method]})
    return out


def _check_method(method: str) -> None:
    if method not in _CONFIG_OPTIONS:
        raise ValueError(f"no mask picture for method {method!r}; accepted methods: {', '.join(METHODS)}")


def parse_mask_options(method: str, pairs: list[str] | dict[str, str]) -> dict[str, Any]:
    """CLI/app text (``["decay_factor=0.2", "kernel_size=18,24,24"]`` or a dict of strings) -> typed options.

    Config options are parsed by the method's config (its types and messages); tile shapes and ``layer`` as
    comma-separated ints. Unknown names raise `ValueError` listing the accepted ones.
    """
    from ..config import _parse_structured
    from ..registry import get_method

    _check_method(method)
    items: list[tuple[str, str]] = []
    if isinstance(pairs, dict):
        items = [(str(k), str(v)) for k, v in pairs.items()]
    else:
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"mask options are key=value, got {pair!r}")
            items.append((key.strip(), value))
    cfg = get_method(method).config_cls
    out: dict[str, Any] = {}
    for key, value in items:
        if key in _CONFIG_OPTIONS[method]:
            out[key] = cfg.parse_option(key, value)
        elif key in _EXTRA_OPTIONS[method]:
            out[key] = _parse_structured(value.strip())
        else:
            raise ValueError(_unknown_option(method, key))
    return out


def _unknown_option(method: str, key: str) -> str:
    accepted = ", ".join((*_CONFIG_OPTIONS[method], *_EXTRA_OPTIONS[method]))
    return f"unknown mask option {key!r} for method {method!r}; accepted: {accepted}"


def _split_options(method: str, options: dict[str, Any]):
    """(config object built from the config options, extra options); ValueErrors name the option."""
    from ..registry import get_method

    unknown = [k for k in options if k not in _CONFIG_OPTIONS[method] and k not in _EXTRA_OPTIONS[method]]
    if unknown:
        raise ValueError(_unknown_option(method, unknown[0]))
    cfg_opts = {k: v for k, v in options.items() if k in _CONFIG_OPTIONS[method]}
    extra = {k: v for k, v in options.items() if k in _EXTRA_OPTIONS[method]}
    return get_method(method).config_cls.from_options(**cfg_opts), extra


# ------------------------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------------------------
def _pool_any(mask: torch.Tensor, limit: int = MAX_PICTURE) -> tuple[torch.Tensor, int]:
    """OR-pool a bool mask so that no side exceeds `limit`; returns (mask, blocks per pixel)."""
    factor = max(1, -(-max(mask.shape) // limit))
    if factor == 1:
        return mask, 1
    pooled = torch.nn.functional.max_pool2d(mask.float()[None, None], factor, factor, ceil_mode=True)[0, 0]
    return pooled > 0, factor


def _picture(mask: torch.Tensor, caption: str, *, tokens_per_frame: int | None = None, block_size: int = 128):
    from .draw import block_mask_image

    pooled, factor = _pool_any(mask)
    how = "all blocks"
    if factor > 1:
        how = f"{factor}x{factor} blocks/px (a pixel is kept when any of its blocks is)"
        caption += f" [{factor}x{factor} blocks/px]"
    image = block_mask_image(pooled, caption=caption, tokens_per_frame=tokens_per_frame, block_size=block_size * factor)
    return image, how


# ------------------------------------------------------------------------------------------------------------------
# radial
# ------------------------------------------------------------------------------------------------------------------
def _explore_radial(label: str, grid: tuple[int, ...], family: str, options: dict[str, Any]) -> MaskView:
    from ..methods.radial import RadialMethod
    from .radial import describe, radial_mask

    if len(grid) != 3 or grid[0] < 2:
        raise ValueError(f"radial needs a video geometry with at least 2 frames (frames, height, width); got {label}")
    cfg, _ = _split_options("radial", options)
    s = RadialMethod(cfg).settings(family)
    frames, tokens = grid[0], grid[1] * grid[2]
    kwargs = {"block_size": s["block_size"], "decay_factor": float(s["decay_factor"]), "sink": bool(s["sink"])}
    mask = radial_mask(frames, tokens, **kwargs)
    info = {"method": "radial", "geometry": label, "family": family, "grid": "x".join(map(str, grid)),
            **describe(frames, tokens, **kwargs)}
    density = info["density"]
    caption = (f"radial {label} ({frames}x{tokens}) block {s['block_size']} decay {s['decay_factor']:g}"
               f"{'' if s['sink'] else ' no sink'} - density {density:.1%} ({info['kept_blocks']}/{mask.numel()} blocks)")
    image, info["picture"] = _picture(mask, caption, tokens_per_frame=tokens, block_size=s["block_size"])
    return MaskView("radial", grid, image, density, 1.0 / density, info)


# ------------------------------------------------------------------------------------------------------------------
# gna and freeswim: the kernel's tile visits
# ------------------------------------------------------------------------------------------------------------------
def _axis_tables(plan) -> list[torch.Tensor]:
    """Per axis a bool tensor [groups, n_q_tiles, n_kv_tiles]: key tile visited by query tile (group-local)."""
    out = []
    for a in plan.axes:
        tab = torch.tensor(a.q_tab, dtype=torch.int64)  # [G, nq, 4]
        kt = torch.arange(a.n_kv_tiles)
        out.append((kt.view(1, 1, -1) >= tab[..., 0:1]) & (kt.view(1, 1, -1) < tab[..., 1:2]))
    return out


def _tile_mask(plan, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The tile-visit mask at the given global query/key tile indices (order: dilation group, then tile grid)."""
    tabs = _axis_tables(plan)
    nq = [t.shape[1] for t in tabs]
    nk = [t.shape[2] for t in tabs]
    groups = [t.shape[0] for t in tabs]

    def split(index: torch.Tensor, sizes: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        per_group = math.prod(sizes)
        g, t = index // per_group, index % per_group
        gs, ts = [], []
        for size in reversed(sizes):
            ts.append(t % size)
            t = t // size
        for ng in reversed(groups):
            gs.append(g % ng)
            g = g // ng
        return gs[::-1], ts[::-1]

    gq, tq = split(rows, nq)
    gk, tk = split(cols, nk)
    mask = torch.ones(rows.numel(), cols.numel(), dtype=torch.bool)
    for axis, tab in enumerate(tabs):
        mask &= gq[axis].view(-1, 1) == gk[axis].view(1, -1)
        mask &= tab[gq[axis].view(-1, 1), tq[axis].view(-1, 1), tk[axis].view(1, -1)]
    return mask


def _tile_picture(plan, caption: str):
    n_q = plan.groups * math.prod(a.n_q_tiles for a in plan.axes)
    n_k = plan.groups * math.prod(a.n_kv_tiles for a in plan.axes)
    if n_q * n_k <= _MAX_FULL_ELEMENTS:
        image, how = _picture(_tile_mask(plan, torch.arange(n_q), torch.arange(n_k)), caption)
        return image, how.replace("block", "tile")
    # too many tiles to build: sample evenly spaced rows and columns (each pixel shows one tile pair)
    rows = torch.linspace(0, n_q - 1, MAX_PICTURE).round().long().unique()
    cols = torch.linspace(0, n_k - 1, MAX_PICTURE).round().long().unique()
    from .draw import block_mask_image

    caption += f" [picture: sampled {rows.numel()} of {n_q} query tiles, {cols.numel()} of {n_k} key tiles]"
    return block_mask_image(_tile_mask(plan, rows, cols), caption=caption), "sampled tiles"


def _explore_window(method: str, label: str, grid: tuple[int, ...], settings: dict[str, Any], extra: dict[str, Any],
                    head: dict[str, Any]) -> MaskView:
    """Neighborhood attention with `settings` (already fitted to `grid`) in our kernel: numbers and picture."""
    from ..gna import simulate
    from ..kernels.neighborhood.tiling import make_plan

    q_tile, kv_tile = extra.get("q_tile"), extra.get("kv_tile")
    for name, tile in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        if tile is not None:
            tile = (tile,) if isinstance(tile, int) else tile
            if not isinstance(tile, tuple) or len(tile) != len(grid) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tile
            ):
                raise ValueError(f"{name} must be {len(grid)} ints >= 1 (one per axis of {label}), got {extra[name]!r}")
            extra = {**extra, name: tile}
    q_tile, kv_tile = extra.get("q_tile"), extra.get("kv_tile")
    sim = simulate(grid, settings["kernel_size"], settings["stride"], settings["dilation"], settings["is_causal"],
                   q_tile=q_tile, kv_tile=kv_tile)
    plan = make_plan(sim.shape, sim.kernel_size, sim.stride, sim.dilation, sim.is_causal, sim.q_tile, sim.kv_tile)

    def fmt(t) -> str:
        return "x".join(str(int(v)) for v in t)

    info = {
        **head, "grid": fmt(grid), "num_tokens": sim.tokens, "kernel_size": fmt(sim.kernel_size),
        "stride": fmt(sim.stride), "dilation": fmt(sim.dilation), "is_causal": any(sim.is_causal),
        "q_tile": fmt(sim.q_tile), "kv_tile": fmt(sim.kv_tile), "q_tiles": sim.q_tiles,
        "kv_tiles_per_q_tile": round(sim.kv_tiles_per_q_tile, 2), "max_kv_tiles_per_q_tile": sim.max_kv_tiles_per_q_tile,
        "visited_pairs": sim.visited_pairs, "masked_pairs": sim.masked_pairs,
        "perfectly_block_sparse": sim.perfectly_block_sparse, "flop_density": sim.flop_density,
        "density": sim.visited_density, "sparsity": 1.0 - sim.visited_density,
        "flop_bound_speedup": sim.flop_bound_speedup, "speedup_upper_bound": sim.upper_bound_speedup,
        "expected_speedup": sim.expected_speedup,
    }
    caption = (f"{method} {label} window {fmt(sim.kernel_size)} stride {fmt(sim.stride)}"
               f"{'' if set(sim.dilation) == {1} else ' dilation ' + fmt(sim.dilation)}"
               f" tiles {fmt(sim.q_tile)}/{fmt(sim.kv_tile)} - computed density {sim.visited_density:.1%}"
               f" (useful {sim.flop_density:.1%})")
    if sim.visited_density > 1:
        info["padding_note"] = "the tiles pad the grid: the kernel computes more than dense attention would"
    image, how = _tile_picture(plan, caption)
    info["picture"] = how
    return MaskView(method, grid, image, sim.visited_density, sim.upper_bound_speedup, info)


def _spatial_shape(grid: tuple[int, ...], family: str) -> tuple[int, ...]:
    """The grid the gna method attends over: 2-D for image families and single frames (as `GNAMethod.attend`)."""
    from ..methods.neighborhood import IMAGE_FAMILIES

    if len(grid) == 3 and (family in IMAGE_FAMILIES or grid[0] == 1):
        return grid[1:]
    return grid


def _explore_gna(label: str, grid: tuple[int, ...], family: str, options: dict[str, Any]) -> MaskView:
    from ..methods.neighborhood import GNAMethod

    cfg, extra = _split_options("gna", options)
    layer = extra.pop("layer", 0)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")
    method = GNAMethod(cfg)
    shape = _spatial_shape(grid, family)
    settings = method.fit(shape, method.settings_for(layer), "mask explorer")
    head = {"method": "gna", "geometry": label, "family": family, "layer": layer}
    if cfg.preset:
        head["preset"] = cfg.preset
    return _explore_window("gna", label, shape, settings, extra, head)


def _explore_freeswim(label: str, grid: tuple[int, ...], family: str, options: dict[str, Any]) -> MaskView:
    from ..context import TokenGrid
    from ..methods.freeswim import FreeSwimMethod

    if len(grid) != 3:
        raise ValueError(f"freeswim needs a video geometry (frames, height, width); got {label}")
    cfg, extra = _split_options("freeswim", options)
    window = FreeSwimMethod(cfg).window(TokenGrid(*grid))
    settings = {"kernel_size": window, "stride": (1, 1, 1), "dilation": (1, 1, 1), "is_causal": (False,) * 3}
    head = {"method": "freeswim", "geometry": label, "family": family, "base_height": cfg.base_height,
            "base_width": cfg.base_width, "vae_scale_factor": cfg.vae_scale_factor,
            "note": "window branch only; the full-attention branch runs dense every cache_steps steps"}
    return _explore_window("freeswim", label, grid, settings, extra, head)


METHODS: dict[str, Callable[[str, tuple[int, ...], str, dict[str, Any]], MaskView]] = {
    "radial": _explore_radial,
    "gna": _explore_gna,
    "freeswim": _explore_freeswim,
}


def explore_mask(method: str, geometry: str | tuple[int, ...], *, family: str | None = None, **options: Any) -> MaskView:
    """The mask `method` computes at `geometry`, with the method's own options and defaults.

    Args:
        method: ``radial``, ``gna`` or ``freeswim``.
        geometry: a name from `GEOMETRIES` or a token grid ``(frames, height, width)`` / ``(height, width)``.
        family: the model family whose defaults apply (default: the geometry's; ``wan`` for explicit video grids).
        options: the method's mask options (`mask_options(method)` lists them), e.g. ``decay_factor=0.2``,
            ``kernel_size=(18, 24, 24)``, ``base_height=480``; ``q_tile``/``kv_tile`` pick tile shapes (gna, freeswim).

    Raises:
        ValueError: unknown method, geometry or option, or a value the method refuses; the message names it and
            what is accepted.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"no mask picture for method {method!r}; accepted methods: {', '.join(METHODS)}")
    label, grid, fam = _resolve_geometry(geometry, family)
    return METHODS[method](label, grid, fam, dict(options))
