"""Mask pictures and numbers for the Mask explorer: a block mask, or the key tiles our neighborhood-attention kernel
visits, drawn with the density and the speed-up that density bounds (`MaskView`).

Methods draw themselves with these (their spec's `preview_mask`); `diffattn.explorer` picks the method and the
geometry. Pictures larger than `MAX_PICTURE` blocks per side are down-sampled (a pixel is kept when any block it
covers is kept); the density and speed-up are always those of the full mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.neighborhood.simulator import simulate
from ..kernels.neighborhood.tiling import make_plan
from .draw import block_mask_image

__all__ = ["MAX_MASK_ELEMENTS", "MAX_PICTURE", "TILE_EXTRAS", "MaskView", "block_picture", "check_mask_size", "window_view"]

# The picture never has more than this many blocks (tiles) per side: larger masks are OR-pooled down to it.
MAX_PICTURE = 768
# Block masks built whole for a picture may hold at most this many (query block, key block) pairs: building one
# costs ~17 bytes per pair at its peak (the bool mask, its float copy for pooling, temporaries; measured on CPU), so
# this bounds a request at ~1.1 GB (the radial mask of a 150^3 grid would need ~12 GB).
MAX_MASK_ELEMENTS = 1 << 26
# Tile masks up to this many elements are built whole (then pooled); above it rows/columns are point-sampled.
_MAX_FULL_ELEMENTS = 1 << 24
# The explorer-only options of `window_view`: the kernel's tile shapes.
TILE_EXTRAS = {
    "q_tile": "query tile shape per axis (default: the kernel's choice)",
    "kv_tile": "key tile shape per axis (default: the kernel's choice)",
}


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


def check_mask_size(rows: int, cols: int, what: str, advice: str) -> None:
    """Refuse a whole mask of `rows` x `cols` blocks beyond `MAX_MASK_ELEMENTS` (a clear `ValueError` instead of
    gigabytes of memory)."""
    if rows * cols > MAX_MASK_ELEMENTS:
        raise ValueError(
            f"{what} has {rows:,} x {cols:,} blocks ({rows * cols:,}), more than the Mask explorer builds "
            f"({MAX_MASK_ELEMENTS:,}, about {MAX_MASK_ELEMENTS * 17 / 2**30:.1f} GB); {advice}"
        )


def _pool_any(mask: torch.Tensor, limit: int = MAX_PICTURE) -> tuple[torch.Tensor, int]:
    """OR-pool a bool mask so that no side exceeds `limit`; returns (mask, blocks per pixel)."""
    factor = max(1, -(-max(mask.shape) // limit))
    if factor == 1:
        return mask, 1
    pooled = torch.nn.functional.max_pool2d(mask.float()[None, None], factor, factor, ceil_mode=True)[0, 0]
    return pooled > 0, factor


def block_picture(mask: torch.Tensor, caption: str, *, tokens_per_frame: int | None = None, block_size: int = 128):
    """The picture of a block mask (OR-pooled to at most `MAX_PICTURE` per side) and how it was pooled."""
    pooled, factor = _pool_any(mask)
    how = "all blocks"
    if factor > 1:
        how = f"{factor}x{factor} blocks/px (a pixel is kept when any of its blocks is)"
        caption += f" [{factor}x{factor} blocks/px]"
    image = block_mask_image(pooled, caption=caption, tokens_per_frame=tokens_per_frame, block_size=block_size * factor)
    return image, how


# ------------------------------------------------------------------------------------------------------------------
# neighborhood windows (gna, freeswim): the kernel's tile visits
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
        image, how = block_picture(_tile_mask(plan, torch.arange(n_q), torch.arange(n_k)), caption)
        return image, how.replace("block", "tile")
    # too many tiles to build: sample evenly spaced rows and columns (each pixel shows one tile pair)
    rows = torch.linspace(0, n_q - 1, MAX_PICTURE).round().long().unique()
    cols = torch.linspace(0, n_k - 1, MAX_PICTURE).round().long().unique()
    caption += f" [picture: sampled {rows.numel()} of {n_q} query tiles, {cols.numel()} of {n_k} key tiles]"
    return block_mask_image(_tile_mask(plan, rows, cols), caption=caption), "sampled tiles"


def window_view(method: str, label: str, grid: tuple[int, ...], settings: dict[str, Any], extra: dict[str, Any],
                head: dict[str, Any]) -> MaskView:
    """Neighborhood attention with `settings` (already fitted to `grid`) in our kernel: numbers and picture."""
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
