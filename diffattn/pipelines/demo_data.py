"""Procedural training data for the demo models: coloured shapes over coloured backgrounds, with prompts that say
what and where ("a red circle moving left on a blue background", "a yellow square at the top on a gray background").

Drawn on the fly on any device from signed distances (anti-aliased edges), so training needs no dataset on disk and
every batch is new. Pixels are in [-1, 1], videos `[B, 3, T, H, W]`, images `[B, 3, H, W]`.

`sample_scenes` draws 1-3 shapes per image at distinct cells of a 3x3 grid ("a red circle at the top left and a
blue square in the center on a gray background") and returns each shape's box and phrase too (`ShapeBox`), for the
layout methods, which train and measure on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPE_COLORS = {
    "red": (220, 40, 40), "green": (60, 200, 70), "blue": (60, 110, 240), "yellow": (245, 220, 50),
    "white": (245, 245, 245), "orange": (250, 140, 30),
}
BACKGROUNDS = {
    "black": (12, 12, 16), "gray": (115, 115, 120), "blue": (25, 35, 110), "green": (20, 85, 40), "purple": (75, 30, 95),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
PLACES = {"on the left": (0.2, 0.5), "on the right": (0.8, 0.5), "at the top": (0.5, 0.2), "at the bottom": (0.5, 0.8),
          "in the center": (0.5, 0.5)}
# The 3x3 grid of `sample_scenes`: cell centres (x, y), normalised, origin top left.
GRID_PLACES = {
    "at the top left": (0.2, 0.2), "at the top": (0.5, 0.2), "at the top right": (0.8, 0.2),
    "on the left": (0.2, 0.5), "in the center": (0.5, 0.5), "on the right": (0.8, 0.5),
    "at the bottom left": (0.2, 0.8), "at the bottom": (0.5, 0.8), "at the bottom right": (0.8, 0.8),
}


def vocabulary() -> list[str]:
    """Every word a demo prompt can contain, in a fixed order (the tokenizer's ids)."""
    words: list[str] = ["a", "an", "moving", "on", "background", "the", "at", "in"]
    for group in (SHAPE_COLORS, BACKGROUNDS, SHAPES, MOTIONS, PLACES, GRID_PLACES, ("and",)):
        for phrase in group:  # words new to a later group go last: the shipped tokenizers' ids stay the same
            for word in phrase.split():
                if word not in words:
                    words.append(word)
    return words


def _rgb(table: dict[str, tuple[int, int, int]], names: list[str], device: torch.device) -> torch.Tensor:
    return torch.tensor([table[n] for n in names], dtype=torch.float32, device=device) / 127.5 - 1.0


def _choice(options: list[str] | tuple[str, ...], n: int, g: torch.Generator) -> list[str]:
    idx = torch.randint(len(options), (n,), generator=g).tolist()
    return [options[i] for i in idx]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _uniform(lo: torch.Tensor | float, hi: torch.Tensor | float, n: int, g: torch.Generator) -> torch.Tensor:
    return lo + (torch.as_tensor(hi) - lo) * torch.rand(n, generator=g)


def _alpha(shape_ids: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, height: int,
           width: int) -> torch.Tensor:
    """Coverage of shapes at centres `cx, cy` `[B, T]` (pixels), radius `r` `[B]` -> `[B, 1, T, H, W]` in [0, 1]."""
    device = cx.device
    y = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1) + 0.5
    x = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width) + 0.5
    dx, dy = x - cx[..., None, None], y - cy[..., None, None]
    rr = r.view(-1, 1, 1, 1)
    circle = torch.sqrt(dx**2 + dy**2) - rr
    square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF * rr
    triangle = torch.maximum(dy - TRIANGLE_BASE * rr, dx.abs() - (dy + rr) / 1.8)  # apex up, base below the centre
    sid = shape_ids.view(-1, 1, 1, 1)
    dist = torch.where(sid == 0, circle, torch.where(sid == 1, square, triangle))
    return (0.5 - dist).clamp(0, 1)[:, None]  # one-pixel anti-aliased edge


def _background(bg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[B, 3]` colours -> `[B, 3, 1, H, 1]` with a gentle vertical gradient (broadcasts over frames and width)."""
    y = torch.arange(height, device=bg.device, dtype=torch.float32).view(1, 1, height, 1) + 0.5
    shade = 0.85 + 0.3 * (y / height)[:, None]
    return (bg.view(-1, 3, 1, 1, 1) + 1) * shade - 1


def _draw(shape_ids: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, color: torch.Tensor,
          bg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Shapes at centres `cx, cy` `[B, T]` (pixels), radius `r` `[B]` -> `[B, 3, T, H, W]` in [-1, 1]."""
    alpha = _alpha(shape_ids, cx, cy, r, height, width)
    return _background(bg, height, width) * (1 - alpha) + color.view(-1, 3, 1, 1, 1) * alpha


# Shape extents in units of the radius r, the same numbers `_alpha` draws with: circle |d| <= r, square half side
# SQUARE_HALF * r, triangle apex at -r, base at +TRIANGLE_BASE * r, half width r at the base.
SQUARE_HALF = 0.85
TRIANGLE_BASE = 0.8


def shape_box(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """The tight box `(x0, y0, x1, y1)` (pixels) of a shape drawn at centre `cx, cy` with radius `r`."""
    if shape == "circle":
        return cx - r, cy - r, cx + r, cy + r
    if shape == "square":
        h = SQUARE_HALF * r
        return cx - h, cy - h, cx + h, cy + h
    if shape == "triangle":
        return cx - r, cy - r, cx + r, cy + TRIANGLE_BASE * r
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _scene(n: int, g: torch.Generator) -> tuple[list[str], list[str], list[str]]:
    colors = _choice(tuple(SHAPE_COLORS), n, g)
    backgrounds = []
    for c in colors:  # never the shape's own colour name
        options = [b for b in BACKGROUNDS if b != c]
        backgrounds.append(options[int(torch.randint(len(options), (1,), generator=g))])
    return colors, backgrounds, _choice(SHAPES, n, g)


def sample_videos(batch: int, *, frames: int = 17, height: int = 64, width: int = 64, seed: int | None = None,
                  generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
    """`batch` clips of one shape moving in a straight line; returns (pixels `[B, 3, T, H, W]`, prompts)."""
    g = generator or torch.Generator().manual_seed(0 if seed is None else seed)
    colors, backgrounds, shapes = _scene(batch, g)
    motions = _choice(tuple(MOTIONS), batch, g)
    size = min(height, width)
    r = _uniform(0.09 * size, 0.16 * size, batch, g)
    speed = _uniform(0.35, 0.55, batch, g) * size / max(frames - 1, 1)  # crosses 35-55% of the frame
    travel = speed * (frames - 1)
    direction = torch.tensor([MOTIONS[m] for m in motions])
    along_x = direction[:, 0] != 0
    extent = torch.where(along_x, torch.full((batch,), float(width)), torch.full((batch,), float(height)))
    across = torch.where(along_x, torch.full((batch,), float(height)), torch.full((batch,), float(width)))
    start = _uniform(r + 1, extent - r - 1 - travel, batch, g)
    start = torch.where(direction.sum(1) < 0, extent - start, start)  # left/up start on the far side
    offset = _uniform(r + 1, across - r - 1, batch, g)
    t = torch.arange(frames, dtype=torch.float32)
    along = start[:, None] + direction.sum(1, keepdim=True) * speed[:, None] * t
    cx = torch.where(along_x[:, None], along, offset[:, None].expand(-1, frames))
    cy = torch.where(along_x[:, None], offset[:, None].expand(-1, frames), along)
    device = torch.device(device)
    shape_ids = torch.tensor([SHAPES.index(s) for s in shapes], device=device)
    pixels = _draw(shape_ids, cx.to(device), cy.to(device), r.to(device), _rgb(SHAPE_COLORS, colors, device),
                   _rgb(BACKGROUNDS, backgrounds, device), height, width)
    prompts = [f"{_article(c)} {c} {s} moving {m} on a {b} background" for c, s, m, b in zip(colors, shapes, motions, backgrounds)]
    return pixels, prompts


def sample_images(batch: int, *, size: int = 128, seed: int | None = None, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu"):
    """`batch` images of one shape at a named place; returns (pixels `[B, 3, H, W]`, prompts)."""
    g = generator or torch.Generator().manual_seed(0 if seed is None else seed)
    colors, backgrounds, shapes = _scene(batch, g)
    places = _choice(tuple(PLACES), batch, g)
    r = _uniform(0.09 * size, 0.16 * size, batch, g)
    centre = torch.tensor([PLACES[p] for p in places]) * size
    jitter = (torch.rand(batch, 2, generator=g) - 0.5) * 0.16 * size
    cx = (centre[:, 0] + jitter[:, 0]).clamp(r + 1, size - r - 1)
    cy = (centre[:, 1] + jitter[:, 1]).clamp(r + 1, size - r - 1)
    device = torch.device(device)
    shape_ids = torch.tensor([SHAPES.index(s) for s in shapes], device=device)
    pixels = _draw(shape_ids, cx[:, None].to(device), cy[:, None].to(device), r.to(device),
                   _rgb(SHAPE_COLORS, colors, device), _rgb(BACKGROUNDS, backgrounds, device), size, size)
    prompts = [f"{_article(c)} {c} {s} {p} on a {b} background" for c, s, p, b in zip(colors, shapes, places, backgrounds)]
    return pixels[:, :, 0], prompts


@dataclass(frozen=True)
class ShapeBox:
    """One shape of a scene: the prompt's phrase for it, its box `(x0, y0, x1, y1)` normalised to [0, 1] with the
    origin at the top left (x to the right, y down), and what the phrase names."""

    phrase: str
    box: tuple[float, float, float, float]
    shape: str
    color: str
    place: str


def scene_prompt(phrases: list[str], background: str) -> str:
    """`["a red circle on the left", "a blue square at the top"]`, `"gray"` -> the scene's prompt."""
    return f"{' and '.join(phrases)} on a {background} background"


def sample_scenes(batch: int, *, size: int = 128, min_shapes: int = 1, max_shapes: int = 3, seed: int | None = None,
                  generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
    """`batch` images of `min_shapes`..`max_shapes` shapes, each in its own cell of a 3x3 grid (`GRID_PLACES`), in
    distinct colours, over a background of none of their colour names. Returns (pixels `[B, 3, H, W]`, prompts,
    boxes: per image a list of `ShapeBox` in the prompt's order). Shapes do not overlap: a radius of at most 0.12
    of the size and a jitter of at most 0.03 keep neighbouring cells apart."""
    if not 1 <= min_shapes <= max_shapes <= min(len(GRID_PLACES), len(SHAPE_COLORS)):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 6, got min_shapes={min_shapes}, max_shapes={max_shapes}")
    g = generator or torch.Generator().manual_seed(0 if seed is None else seed)
    places, colours = list(GRID_PLACES), list(SHAPE_COLORS)
    counts = torch.randint(min_shapes, max_shapes + 1, (batch,), generator=g).tolist()
    device = torch.device(device)
    prompts: list[str] = []
    boxes: list[list[ShapeBox]] = []
    layers: list[tuple[int, int, int, float, float, float, str]] = []  # (image, k-th shape, id, cx, cy, r, colour)
    backgrounds: list[str] = []
    for i, n in enumerate(counts):
        cells = torch.randperm(len(places), generator=g)[:n].tolist()
        picks = torch.randperm(len(colours), generator=g)[:n].tolist()
        shapes = _choice(SHAPES, n, g)
        r = _uniform(0.07 * size, 0.12 * size, n, g).tolist()
        jitter = ((torch.rand(n, 2, generator=g) - 0.5) * 0.06 * size).tolist()
        options = [b for b in BACKGROUNDS if b not in {colours[c] for c in picks}]
        background = options[int(torch.randint(len(options), (1,), generator=g))]
        scene = []
        for k in range(n):
            place, colour, shape = places[cells[k]], colours[picks[k]], shapes[k]
            cx = GRID_PLACES[place][0] * size + jitter[k][0]
            cy = GRID_PLACES[place][1] * size + jitter[k][1]
            x0, y0, x1, y1 = shape_box(shape, cx, cy, r[k])
            box = tuple(min(max(v / size, 0.0), 1.0) for v in (x0, y0, x1, y1))
            scene.append(ShapeBox(f"{_article(colour)} {colour} {shape} {place}", box, shape, colour, place))
            layers.append((i, k, SHAPES.index(shape), cx, cy, r[k], colour))
        prompts.append(scene_prompt([s.phrase for s in scene], background))
        boxes.append(scene)
        backgrounds.append(background)
    pixels = _background(_rgb(BACKGROUNDS, backgrounds, device), size, size)[:, :, 0].expand(batch, 3, size, size)
    pixels = pixels.clone()
    # All shapes of the batch drawn in one call, then composited into their images in prompt order.
    column = list(zip(*layers))
    alpha = _alpha(torch.tensor(column[2], device=device), torch.tensor(column[3], device=device)[:, None],
                   torch.tensor(column[4], device=device)[:, None], torch.tensor(column[5], device=device),
                   size, size)[:, :, 0]  # [shapes, 1, H, W]
    color = _rgb(SHAPE_COLORS, list(column[6]), device).view(-1, 3, 1, 1)
    for k in range(max(counts)):
        idx = torch.tensor([j for j, layer in enumerate(layers) if layer[1] == k], device=device)
        rows = torch.tensor([layers[j][0] for j in idx.tolist()], device=device)
        pixels[rows] = pixels[rows] * (1 - alpha[idx]) + color[idx] * alpha[idx]
    return pixels, prompts, boxes
