"""A layout for layout-to-image generation: phrases placed in boxes or polygons (geometry layer, pure functions).

Coordinates are normalised to the image, origin top left, x to the right and y down: a box is `[x0, y0, x1, y1]`
with `0 <= x0 < x1 <= 1` and `0 <= y0 < y1 <= 1`; a polygon is a list of `[x, y]` vertices (at least 3) inside
`[0, 1]`. JSON form (what `diffattn generate --layout` and the app read and write):

    {"background": "a blue background",
     "instances": [{"phrase": "a red circle", "box": [0.1, 0.1, 0.4, 0.4]},
                   {"phrase": "a green triangle", "polygon": [[0.6, 0.9], [0.8, 0.5], [0.95, 0.9]]}]}

`occupancy(layout, h, w)` rasterises the instances to **soft occupancy maps** at an attention resolution: each cell
holds the fraction of its area the instance covers (sampled on a `supersample` x `supersample` grid of points per
cell, as FICGen area-pools a 512² raster down to each layer), so a box edge that cuts a cell gives a fractional
value and every resolution of a UNet sees the same geometry.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_INSTANCES = 16


class LayoutError(ValueError):
    """A layout that cannot be used; the message names the instance and the field."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LayoutError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise LayoutError(f"{where} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class Instance:
    """One phrase and where it goes: a `box` `(x0, y0, x1, y1)` or a `polygon` `((x, y), ...)`, normalised."""

    phrase: str
    box: tuple[float, float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] | None = None

    def bbox(self) -> tuple[float, float, float, float]:
        """The axis-aligned box (the polygon's bounding box for polygons)."""
        if self.box is not None:
            return self.box
        xs = [p[0] for p in self.polygon or ()]
        ys = [p[1] for p in self.polygon or ()]
        return (min(xs), min(ys), max(xs), max(ys))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phrase": self.phrase}
        if self.box is not None:
            out["box"] = list(self.box)
        if self.polygon is not None:
            out["polygon"] = [list(p) for p in self.polygon]
        return out


@dataclass(frozen=True)
class Layout:
    """Instances (phrase + box or polygon) and an optional background phrase. Hashable, so rasters are cached."""

    instances: tuple[Instance, ...]
    background: str | None = None
    max_instances: int = field(default=MAX_INSTANCES, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(self.instances))
        self.validate()

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `LayoutError` naming the first problem (instance index, field, what is accepted)."""
        if not isinstance(self.max_instances, int) or self.max_instances < 1:
            raise LayoutError(f"max_instances must be a positive int, got {self.max_instances!r}")
        if not self.instances:
            raise LayoutError("a layout needs at least one instance (a phrase with a box or polygon)")
        if len(self.instances) > self.max_instances:
            raise LayoutError(
                f"a layout holds at most {self.max_instances} instances, got {len(self.instances)}"
            )
        if self.background is not None and (not isinstance(self.background, str) or not self.background.strip()):
            raise LayoutError(f"background must be a non-empty phrase or absent, got {self.background!r}")
        for i, inst in enumerate(self.instances):
            where = f"instance {i}"
            if not isinstance(inst, Instance):
                raise LayoutError(f"{where} must be an Instance, got {type(inst).__name__}")
            if not isinstance(inst.phrase, str) or not inst.phrase.strip():
                raise LayoutError(f"{where}: 'phrase' must be a non-empty string, got {inst.phrase!r}")
            if (inst.box is None) == (inst.polygon is None):
                raise LayoutError(f"{where} ({inst.phrase!r}) needs exactly one of 'box' or 'polygon'")
            if inst.box is not None:
                if len(inst.box) != 4:
                    raise LayoutError(f"{where} ({inst.phrase!r}): 'box' must be [x0, y0, x1, y1], got {list(inst.box)}")
                x0, y0, x1, y1 = (_number(v, f"{where}: box coordinate") for v in inst.box)
                for name, v in (("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1)):
                    if not 0.0 <= v <= 1.0:
                        raise LayoutError(
                            f"{where} ({inst.phrase!r}): box {name}={v} is outside [0, 1] (coordinates are normalised, "
                            "origin top left)"
                        )
                if not x0 < x1:
                    raise LayoutError(f"{where} ({inst.phrase!r}): box needs x0 < x1, got x0={x0}, x1={x1}")
                if not y0 < y1:
                    raise LayoutError(f"{where} ({inst.phrase!r}): box needs y0 < y1, got y0={y0}, y1={y1}")
            else:
                poly = inst.polygon
                if len(poly) < 3:
                    raise LayoutError(f"{where} ({inst.phrase!r}): 'polygon' needs at least 3 [x, y] points, got {len(poly)}")
                for j, p in enumerate(poly):
                    if len(p) != 2:
                        raise LayoutError(f"{where} ({inst.phrase!r}): polygon point {j} must be [x, y], got {list(p)}")
                    for v in p:
                        v = _number(v, f"{where}: polygon point {j}")
                        if not 0.0 <= v <= 1.0:
                            raise LayoutError(
                                f"{where} ({inst.phrase!r}): polygon point {j} {list(p)} is outside [0, 1]"
                            )
                if _polygon_area(poly) <= 0.0:
                    raise LayoutError(f"{where} ({inst.phrase!r}): polygon has zero area")

    # ---- conversions -----------------------------------------------------------------------------------------
    @property
    def phrases(self) -> list[str]:
        return [inst.phrase for inst in self.instances]

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [inst.bbox() for inst in self.instances]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.background is not None:
            out["background"] = self.background
        out["instances"] = [inst.to_dict() for inst in self.instances]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Any, *, max_instances: int = MAX_INSTANCES) -> Layout:
        """Build from the JSON form; unknown keys and wrong types raise `LayoutError`."""
        if not isinstance(data, dict):
            raise LayoutError(f"a layout must be a JSON object with 'instances', got {type(data).__name__}")
        unknown = sorted(set(data) - {"background", "instances"})
        if unknown:
            raise LayoutError(f"unknown layout key(s) {unknown}; accepted: 'background', 'instances'")
        items = data.get("instances")
        if not isinstance(items, list):
            raise LayoutError(f"'instances' must be a list of {{'phrase', 'box' | 'polygon'}} objects, got {items!r}")
        instances = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise LayoutError(f"instance {i} must be an object with 'phrase' and 'box' or 'polygon', got {item!r}")
            bad = sorted(set(item) - {"phrase", "box", "polygon"})
            if bad:
                raise LayoutError(f"instance {i}: unknown key(s) {bad}; accepted: 'phrase', 'box', 'polygon'")
            box, poly = item.get("box"), item.get("polygon")
            if box is not None and not isinstance(box, (list, tuple)):
                raise LayoutError(f"instance {i}: 'box' must be [x0, y0, x1, y1], got {box!r}")
            if poly is not None and (not isinstance(poly, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in poly)):
                raise LayoutError(f"instance {i}: 'polygon' must be a list of [x, y] points, got {poly!r}")
            instances.append(
                Instance(
                    phrase=item.get("phrase"),
                    box=None if box is None else tuple(box),
                    polygon=None if poly is None else tuple(tuple(p) for p in poly),
                )
            )
        return cls(tuple(instances), data.get("background"), max_instances=max_instances)

    @classmethod
    def from_json(cls, text: str, **kwargs: Any) -> Layout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"layout is not valid JSON: {exc}") from None
        return cls.from_dict(data, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> Layout:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), **kwargs)

    @classmethod
    def coerce(cls, value: Any) -> Layout:
        """A `Layout`, its dict form, a JSON string or a path to a JSON file -> `Layout`."""
        if isinstance(value, Layout):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            text = str(value)
            if text.lstrip().startswith("{"):
                return cls.from_json(text)
            if os.path.isfile(text):
                return cls.load(text)
            raise LayoutError(f"layout {text!r} is neither JSON nor an existing file")
        raise LayoutError(f"layout must be a Layout, a dict, JSON text or a path; got {type(value).__name__}")


def _polygon_area(points: Any) -> float:
    s = 0.0
    n = len(points)
    for i in range(n):
        x0, y0 = points[i]
        x1, y1 = points[(i + 1) % n]
        s += x0 * y1 - x1 * y0
    return abs(s) / 2


def _inside_polygon(px: torch.Tensor, py: torch.Tensor, points: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """Even-odd rule for sample points `px, py` (same shape)."""
    inside = torch.zeros_like(px, dtype=torch.bool)
    n = len(points)
    for i in range(n):
        x0, y0 = points[i]
        x1, y1 = points[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (py >= min(y0, y1)) & (py < max(y0, y1))
        x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < x_at)
    return inside


def instance_coverage(inst: Instance, height: int, width: int, supersample: int = 8) -> torch.Tensor:
    """`[height, width]` float32 in [0, 1]: the fraction of each cell that `inst` covers."""
    if height < 1 or width < 1 or supersample < 1:
        raise ValueError(f"height, width and supersample must be >= 1, got {height}, {width}, {supersample}")
    s = supersample
    ys = (torch.arange(height * s, dtype=torch.float64) + 0.5) / (height * s)
    xs = (torch.arange(width * s, dtype=torch.float64) + 0.5) / (width * s)
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    if inst.box is not None:
        x0, y0, x1, y1 = inst.box
        hit = (px >= x0) & (px < x1) & (py >= y0) & (py < y1)
    else:
        hit = _inside_polygon(px, py, inst.polygon)
    return hit.to(torch.float32).view(height, s, width, s).mean(dim=(1, 3))


@functools.lru_cache(maxsize=256)
def _occupancy_cached(layout: Layout, height: int, width: int, supersample: int) -> torch.Tensor:
    return torch.stack([instance_coverage(inst, height, width, supersample) for inst in layout.instances])


def occupancy(layout: Layout, height: int, width: int, *, supersample: int = 8) -> torch.Tensor:
    """Soft occupancy maps `[n, height, width]` (float32, CPU) of the layout's instances at one resolution."""
    return _occupancy_cached(layout, int(height), int(width), int(supersample)).clone()


def background_map(maps: torch.Tensor) -> torch.Tensor:
    """`1 - max_i M_i` over the instance axis (-3): the soft form of FICGen's `M_bg = 1 - OR_i M_i`."""
    if maps.shape[-3] == 0:
        return torch.ones_like(maps[..., :1, :, :]).squeeze(-3)
    return 1.0 - maps.amax(dim=-3)


def unet_resolutions(height: int, width: int, levels: int = 4) -> list[tuple[int, int]]:
    """Token grids of a UNet's attention levels for a latent `height x width` (ceil halving, as the down blocks)."""
    out = [(height, width)]
    for _ in range(levels - 1):
        h, w = out[-1]
        out.append((math.ceil(h / 2), math.ceil(w / 2)))
    return out


def occupancy_pyramid(layout: Layout, height: int, width: int, levels: int = 4) -> dict[tuple[int, int], torch.Tensor]:
    """Soft occupancy maps at every attention resolution of a UNet with latent `height x width`."""
    return {hw: occupancy(layout, *hw) for hw in unet_resolutions(height, width, levels)}


def draw_layout(image: Any, layout: Layout, *, width: int = 2) -> Any:
    """A copy of PIL `image` with the layout's boxes/polygons and phrases drawn over it (for the app and sidecars)."""
    from PIL import ImageDraw

    palette = [(255, 64, 64), (64, 200, 255), (255, 210, 40), (120, 255, 120), (255, 120, 255), (255, 160, 60)]
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    for i, inst in enumerate(layout.instances):
        color = palette[i % len(palette)]
        if inst.box is not None:
            x0, y0, x1, y1 = inst.box
            draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=color, width=width)
        else:
            draw.polygon([(x * w, y * h) for x, y in inst.polygon], outline=color, width=width)
        x0, y0, _, _ = inst.bbox()
        draw.text((x0 * w + 3, y0 * h + 2), f"{i + 1}: {inst.phrase}", fill=color)
    return out
