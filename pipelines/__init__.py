"""Multi-pass generation built on diffattn: high-res, guidance, layout, long video, presets.

- `FreeSwimPipeline` (pipelines/freeswim.py): training-free high-resolution Wan video.
- `radial_lora` (pipelines/radial_lora.py): LoRA length-extension training with the Radial mask.

Imported lazily, so `import diffattn.pipelines` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FreeSwimPipeline"]


def __getattr__(name: str) -> Any:
    if name == "FreeSwimPipeline":
        from .freeswim import FreeSwimPipeline

        return FreeSwimPipeline
    raise AttributeError(f"module 'diffattn.pipelines' has no attribute {name!r}")
