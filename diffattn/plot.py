"""Small line plots drawn with Pillow (a dependency already), so loss curves and benchmark plots need no matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if 1000 <= abs(value) < 1e7:
        return f"{value:,.0f}"
    if abs(value) >= 1e7 or abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.3g}"


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (720, 420),
) -> Path:
    """Draw each named (xs, ys) series as a line with a legend; `log_y` plots log10(y) (non-positive y dropped)."""
    if not series:
        raise ValueError("line_plot needs at least one series")
    points: dict[str, list[tuple[float, float]]] = {}
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y)) and (not log_y or y > 0)]
        points[name] = [(x, math.log10(y) if log_y else y) for x, y in pts]
    every = [p for pts in points.values() for p in pts]
    if not every:
        raise ValueError("line_plot: no finite points to draw")
    x_lo, x_hi = min(p[0] for p in every), max(p[0] for p in every)
    y_lo, y_hi = min(p[1] for p in every), max(p[1] for p in every)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for y in _ticks(y_lo, y_hi):
        _, py = to_px(x_lo, y)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.line([left, py, width - right, py], fill=(230, 230, 230))
        draw.text((4, py - 6), _fmt(10**y if log_y else y), fill=(0, 0, 0))
    for x in _ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        draw.line([px, height - bottom, px, height - bottom + 4], fill=(0, 0, 0))
        draw.text((px - 12, height - bottom + 8), _fmt(x), fill=(0, 0, 0))
    draw.text((left, 10), title, fill=(0, 0, 0))
    draw.text(((width - len(xlabel) * 6) / 2, height - 18), xlabel, fill=(0, 0, 0))
    draw.text((4, top - 16), ylabel + (" (log)" if log_y else ""), fill=(0, 0, 0))
    for i, (name, pts) in enumerate(points.items()):
        color = PALETTE[i % len(PALETTE)]
        if len(pts) > 1:
            draw.line([to_px(x, y) for x, y in pts], fill=color, width=2)
        for x, y in pts if len(pts) <= 40 else []:
            px, py = to_px(x, y)
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        lx, ly = width - right - 30 - 6 * max(len(n) for n in points), top + 8 + 14 * i
        draw.line([lx, ly + 6, lx + 18, ly + 6], fill=color, width=3)
        draw.text((lx + 24, ly), name, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
