"""Inspecting block masks: their density and a PNG picture (Pillow only, no matplotlib)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("diffattn")

__all__ = ["block_mask_density", "block_mask_image", "draw_block_mask"]

_KEPT = (236, 236, 228)  # light
_DROPPED = (28, 30, 40)  # dark
_FRAME_LINE = (215, 70, 60)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _as_2d_bool(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool block mask), got {type(mask).__name__}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
    if mask.dim() < 2 or mask.numel() == 0:
        raise ValueError(f"{name} must have shape [..., q_blocks, k_blocks] with no empty dim, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def block_mask_density(mask: torch.Tensor) -> float:
    """Fraction of kept blocks (``1 - sparsity``): the share of dense attention's block work that remains.

    Accepts ``[q_blocks, k_blocks]`` or batched ``[..., q_blocks, k_blocks]`` masks (density over all of them).
    """
    m = _as_2d_bool(mask)
    return float(m.sum().item()) / float(m.numel())


def _font(size: int):  # Pillow's font classes differ between versions
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def draw_block_mask(
    mask: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    tokens_per_frame: int | None = None,
    block_size: int = 128,
    cell: int | None = None,
) -> Path:
    """Write ``mask`` as a PNG: kept blocks light, dropped blocks dark, density in the caption.

    Args:
        mask: bool block mask ``[q_blocks, k_blocks]`` (leading singleton dims such as ``[1, 1, ...]`` are dropped).
        path: output file (``.png``); parent folders are created.
        title: caption text; the density and kept/total block counts are appended.
        tokens_per_frame: when given (with ``block_size``), frame boundaries are drawn as thin red lines at
            ``i * tokens_per_frame / block_size`` blocks, also where they fall inside a block.
        block_size: tokens per block, used only to place frame boundaries.
        cell: pixels per block; default scales the picture to about 768 pixels (at least 1 pixel per block).

    Returns:
        The path written.
    """
    canvas = block_mask_image(mask, title=title, tokens_per_frame=tokens_per_frame, block_size=block_size, cell=cell)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG", optimize=True)
    logger.debug("wrote block mask picture %s (%dx%d px)", out, canvas.width, canvas.height)
    return out


def block_mask_image(
    mask: torch.Tensor,
    *,
    title: str | None = None,
    tokens_per_frame: int | None = None,
    block_size: int = 128,
    cell: int | None = None,
    caption: str | None = None,
):  # -> PIL.Image.Image (Pillow is imported lazily)
    """The picture ``draw_block_mask`` writes, as a ``PIL.Image`` (for the app and the Mask explorer).

    ``caption`` replaces the whole caption (title and the density of ``mask``): for a picture of a down-sampled
    mask, whose own density is not the real one.
    """
    from PIL import Image, ImageDraw

    m = _as_2d_bool(mask)
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"mask must be 2-D after dropping leading singleton dims, got shape {tuple(mask.shape)}")
    if tokens_per_frame is not None and (isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1):
        raise ValueError(f"tokens_per_frame must be an int >= 1 or None, got {tokens_per_frame!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    nq, nk = m.shape
    if cell is None:
        cell = max(1, min(24, 768 // max(nq, nk)))
    elif isinstance(cell, bool) or not isinstance(cell, int) or not 1 <= cell <= 64:
        raise ValueError(f"cell must be an int in [1, 64] (pixels per block), got {cell!r}")

    arr = m.detach().to("cpu").numpy()
    rgb = np.empty((nq, nk, 3), dtype=np.uint8)
    rgb[arr] = _KEPT
    rgb[~arr] = _DROPPED
    body = Image.fromarray(rgb, mode="RGB").resize((nk * cell, nq * cell), Image.NEAREST)

    if tokens_per_frame is not None:
        draw = ImageDraw.Draw(body)
        px_per_token = cell / block_size
        for axis_len, horizontal in ((nq, True), (nk, False)):
            i = 1
            while i * tokens_per_frame < axis_len * block_size:
                x = round(i * tokens_per_frame * px_per_token)
                if horizontal:
                    draw.line([(0, x), (nk * cell - 1, x)], fill=_FRAME_LINE, width=1)
                else:
                    draw.line([(x, 0), (x, nq * cell - 1)], fill=_FRAME_LINE, width=1)
                i += 1

    if caption is None:
        kept = int(arr.sum())
        caption = f"density {kept / arr.size:.1%} ({kept}/{arr.size} blocks of {nq}x{nk})"
        if title:
            caption = f"{title} - {caption}"
    font_size = 14
    pad = 6
    margin = 8
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), caption, font=font)
    text_w, text_h = right - left, bottom - top
    width = max(body.width + 2 * margin, text_w + 2 * margin)
    height = body.height + text_h + 2 * pad + margin
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    ImageDraw.Draw(canvas).text((margin, pad - top), caption, fill=_TEXT, font=font)
    canvas.paste(body, ((width - body.width) // 2, text_h + 2 * pad))

    return canvas
