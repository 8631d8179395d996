"""Image and video similarity metrics for comparing a method's output with the dense output: PSNR and SSIM.

Written here (no scikit-image dependency) in PyTorch. Inputs are images `[H, W, C]` or videos `[F, H, W, C]` with
values in [0, 1] (what a Diffusers pipeline returns with `output_type="np"`), as numpy arrays or tensors.

- PSNR: `10 log10(1 / MSE)` over every pixel, channel and frame (peak 1); `inf` for identical inputs.
- SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, C1 = (0.01)^2, C2 = (0.03)^2, "valid" windows only
  (no padding), computed per channel and per frame and averaged. Frames smaller than the window use the largest odd
  window that fits (logged once).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("diffattn")

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
_warned_small = False


def _as_frames(x: Any, name: str) -> torch.Tensor:
    """`[H, W, C]` or `[F, H, W, C]` (numpy or torch) -> float64 tensor `[F, C, H, W]`."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float64)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{name} must be an image [H, W, C] or a video [F, H, W, C], got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_frames(a, "a"), _as_frames(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)} ([F, C, H, W])")
    return x, y


def psnr(a: Any, b: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of `a` against `b` (symmetric); `inf` when they are identical."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    x, y = _pair(a, b)
    mse = torch.mean((x - y) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian `[size, size]` (float64), the outer product of the 1-D one."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd int, got {size}")
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: Any, b: Any, data_range: float = 1.0, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity of `a` and `b` (symmetric, 1.0 for identical inputs), per channel and frame."""
    global _warned_small
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    x, y = _pair(a, b)
    _frames, channels, h, w = x.shape
    size = min(window, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"images must be at least 1x1 pixels, got {h}x{w}")
    if size < window and not _warned_small:
        _warned_small = True
        logger.info("diffattn ssim: %dx%d frames are smaller than the %d-pixel window; using %d", h, w, window, size)
    kernel = gaussian_window(size, sigma)[None, None].expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s_map.mean().item())
