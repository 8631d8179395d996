"""Model-family adapters: one per family, sharing the processor base in `base.py`."""

from __future__ import annotations

import torch

from .base import DiffattnProcessor, FamilyAdapter, Slot
from .cogvideox import ADAPTER as _COGVIDEOX
from .flux import ADAPTER as _FLUX
from .hunyuan_video import ADAPTER as _HUNYUAN
from .sd3 import ADAPTER as _SD3
from .unet import ADAPTER as _UNET
from .wan import ADAPTER as _WAN

FAMILIES: dict[str, FamilyAdapter] = {a.name: a for a in (_WAN, _HUNYUAN, _COGVIDEOX, _FLUX, _SD3, _UNET)}


def family_of(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter for `model`, or `ValueError` naming the supported model classes."""
    for adapter in FAMILIES.values():
        if adapter.matches(model):
            return adapter
    supported = ", ".join(f"{cls} ({a.name})" for a in FAMILIES.values() for cls in a.model_classes)
    raise ValueError(f"unsupported model class {type(model).__name__}; diffattn supports: {supported}")


__all__ = ["FAMILIES", "DiffattnProcessor", "FamilyAdapter", "Slot", "family_of"]
