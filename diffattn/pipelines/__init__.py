"""Multi-pass generation built on diffattn: high-res, guidance, layout, long video, presets.

- `FreeSwimPipeline` (diffattn/pipelines/freeswim.py): training-free high-resolution Wan video.
- `radial_lora` (diffattn/pipelines/radial_lora.py): LoRA length-extension training with the Radial mask.
- `DemoVideoPipeline`, `DemoImagePipeline`, `PixelSpaceVAE` (diffattn/pipelines/demo.py): the bundled demo models' classes;
  `demo_train` trains them on `demo_data`'s procedural shapes.
- `DemoUNetPipeline`, `SpaceToDepthVAE` (diffattn/pipelines/demo_unet.py): the UNet demo model (SD1.5 layout).

Imported lazily, so `import diffattn.pipelines` stays cheap.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "FreeSwimPipeline": "freeswim",
    "DemoVideoPipeline": "demo",
    "DemoImagePipeline": "demo",
    "PixelSpaceVAE": "demo",
    "DemoUNetPipeline": "demo_unet",
    "SpaceToDepthVAE": "demo_unet",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffattn.pipelines' has no attribute {name!r}")
