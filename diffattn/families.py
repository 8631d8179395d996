"""The model-family names, at the bottom of the layers so that methods can name the families they support
without importing the adapters (which sit above them). `diffattn.adapters.FAMILIES` has one adapter per name here;
a test checks the two agree."""

from __future__ import annotations

FAMILY_NAMES: tuple[str, ...] = ("wan", "hunyuan_video", "cogvideox", "flux", "sd3", "unet")
# Families whose visual stream is one image (a 2-D token grid); the others are video (frames, height, width).
IMAGE_FAMILIES: tuple[str, ...] = ("flux", "sd3")
