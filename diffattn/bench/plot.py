"""Line plots drawn with Pillow (a dependency already), so loss curves and benchmark plots need no matplotlib: one
log-y panel drawer (`log_panel`) shared by the energy-decay figure and `line_plot`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
LEGEND_ROW = 16


def default_font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


LEGEND_ROW = 16


def _dashed(draw, a: tuple[float, float], b: tuple[float, float], color, dash: float = 6.0) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    n = max(1, int(length // dash))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(1.0, (i + 1) / n)
        draw.line((a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0,
                   a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1), fill=color, width=2)


def log_panel(draw, box, title: str, xlabel: str, series: list[tuple[str, list[tuple[float, float]], tuple, bool]], font):
    """One log-y line panel in `box` = (x0, y0, x1, y1), legend below the axes; series: (label, [(x, y)], color,
    dashed)."""
    x0, y0, x1, y1 = box
    left, right, top = x0 + 58, x1 - 16, y0 + 30
    bottom = y1 - 50 - LEGEND_ROW * len(series)
    draw.text((left, y0 + 8), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")
    points = [(x, y) for _, pts, _, _ in series for x, y in pts if y > 0]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill="black", font=font)
        return
    xmax = max(1.0, max(x for x, _ in points))
    lo = math.floor(math.log10(min(y for _, y in points)))
    hi = math.ceil(math.log10(max(y for _, y in points)))
    hi = hi if hi > lo else lo + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * x / xmax, bottom - (bottom - top) * (math.log10(y) - lo) / (hi - lo)

    for e in range(lo, hi + 1):  # decades, with light lines at 2x and 5x
        for mult, shade in ((1, 200), (2, 235), (5, 235)):
            if mult > 1 and e == hi:
                continue
            _, yy = px(0, mult * 10.0**e)
            draw.line((left + 1, yy, right - 1, yy), fill=(shade, shade, shade))
        _, yy = px(0, 10.0**e)
        draw.text((x0 + 6, yy - 7), f"1e{e}", fill="black", font=font)
    step = max(1, math.ceil(xmax / 10))
    for xt in range(0, int(xmax) + 1, step):
        xx, _ = px(xt, 10.0**lo)
        draw.line((xx, bottom, xx, bottom + 4), fill="black")
        draw.text((xx - 4, bottom + 6), str(xt), fill="black", font=font)
    draw.text(((left + right) / 2 - 3 * len(xlabel), bottom + 22), xlabel, fill="black", font=font)
    for i, (label, pts, color, dashed) in enumerate(series):
        pix = [px(x, y) for x, y in pts if y > 0]
        for a, b in itertools.pairwise(pix):
            if dashed:
                _dashed(draw, a, b, color)
            else:
                draw.line((a, b), fill=color, width=2)
        if not dashed:
            for p in pix:
                draw.ellipse((p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5), fill=color)
        ly = bottom + 42 + LEGEND_ROW * i
        if dashed:
            _dashed(draw, (left, ly + 7), (left + 28, ly + 7), color)
        else:
            draw.line((left, ly + 7, left + 28, ly + 7), fill=color, width=2)
        draw.text((left + 36, ly), label, fill="black", font=font)


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    width: int = 720,
) -> Path:
    """One log-y panel with each named (xs, ys) series as a line (non-positive and non-finite y dropped)."""
    if not series:
        raise ValueError("line_plot needs at least one series")
    lines = []
    for i, (name, (xs, ys)) in enumerate(series.items()):
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y)) and y > 0]
        lines.append((name, pts, PALETTE[i % len(PALETTE)], False))
    if not any(pts for _, pts, _, _ in lines):
        raise ValueError("line_plot: no finite positive points to draw")
    height = 380 + LEGEND_ROW * len(lines)
    image = Image.new("RGB", (width, height), "white")
    log_panel(ImageDraw.Draw(image), (0, 0, width, height), title, xlabel, lines, default_font())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
