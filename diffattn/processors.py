"""diffattn's Diffusers attention processors, one per model family.

They work with `diffattn.apply` and with Diffusers' own `model.set_attn_processor(...)`, e.g.
`pipe.transformer.set_attn_processor(WanProcessor("dense"))`.
"""

from .adapters.base import DiffattnProcessor
from .adapters.cogvideox import CogVideoXProcessor
from .adapters.flux import FluxProcessor
from .adapters.hunyuan_video import HunyuanVideoProcessor
from .adapters.sd3 import SD3Processor
from .adapters.unet import UNetProcessor
from .adapters.wan import WanProcessor

__all__ = [
    "DiffattnProcessor",
    "WanProcessor",
    "HunyuanVideoProcessor",
    "CogVideoXProcessor",
    "FluxProcessor",
    "SD3Processor",
    "UNetProcessor",
]
