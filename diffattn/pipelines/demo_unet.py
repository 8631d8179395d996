"""The UNet demo model's architecture: a small SD1.5-layout `UNet2DConditionModel` in a stock
`StableDiffusionPipeline` folder (the offline model for UNet methods: AgentSD, FICGen, SoftPAG on UNets).

What is ours and why:

- `SpaceToDepthVAE`: a lossless 2x2 pixel (un)shuffle instead of a learned autoencoder: 128x128x3 pixels are a
  64x64x12 latent, so the UNet's top level holds 64x64 = 4,096 tokens, the token count of SD1.5 at 512x512 (a
  trained VAE would cost training time and blur the shapes). Its config carries what the stock SD pipeline reads
  (`block_out_channels` gives `vae_scale_factor = 2`, `scaling_factor = 1`, `latent_channels`).
- `DemoUNetPipeline(StableDiffusionPipeline)`: the stock pipeline with the trained settings as call defaults;
  `diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)` loads the same folder.
- Text: one tiny CLIP text encoder (`CLIPTextModel`, as SD1.5) over the word-level demo vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    ConfigMixin,
    DPMSolverMultistepScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from .demo import word_tokenizer
from .demo_data import vocabulary


class SpaceToDepthVAE(ModelMixin, ConfigMixin):
    """Pixels `[B, C, H, W]` <-> latents `[B, C * f * f, H / f, W / f]` by `pixel_unshuffle` (lossless).

    `encode` returns a `DiagonalGaussianDistribution` with zero spread (what the stock pipelines'
    `retrieve_latents` expects of an `AutoencoderKL`)."""

    @register_to_config
    def __init__(self, channels: int = 3, factor: int = 2, latent_channels: int | None = None,
                 block_out_channels: list[int] | None = None, scaling_factor: float = 1.0,
                 shift_factor: float | None = None, force_upcast: bool = False) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two >= 1, got {factor!r}")
        z = channels * factor * factor
        levels = factor.bit_length()  # vae_scale_factor = 2 ** (len(block_out_channels) - 1) = factor
        if latent_channels not in (None, z):
            raise ValueError(f"SpaceToDepthVAE: latent_channels={latent_channels} contradicts channels * factor**2 = {z}")
        if block_out_channels is not None and len(block_out_channels) != levels:
            raise ValueError(f"SpaceToDepthVAE: block_out_channels needs {levels} entries for factor {factor}")
        if scaling_factor != 1.0 or shift_factor not in (None, 0.0):
            raise ValueError("SpaceToDepthVAE is lossless: scaling_factor=1 and no shift_factor")
        self.register_to_config(latent_channels=z, block_out_channels=[z] * levels)
        self.register_buffer("pixel_scale", torch.ones(()))  # `.dtype`/`.device`/offloading like any model

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        f = self.config.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        z = torch.nn.functional.pixel_unshuffle(x * self.pixel_scale.to(x.dtype), f)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        pixels = torch.nn.functional.pixel_shuffle(z, self.config.factor) / self.pixel_scale.to(z.dtype)
        return DecoderOutput(sample=pixels) if return_dict else (pixels,)


@dataclass(frozen=True)
class DemoUNetConfig:
    """SD1.5-layout UNet at 128x128 px (64x64x12 latents): CrossAttnDownBlock2D x (levels - 1) + DownBlock2D, the
    mirror going up, `layers_per_block` resnets+transformers per down level (SD1.5: 2, so 5 self-attention blocks at
    the top level), heads of `head_dim` channels, cross-attention to `text_length` CLIP tokens."""

    size: int = 128
    text_length: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 2
    head_dim: int = 16
    text_dim: int = 64
    text_layers: int = 2
    steps: int = 20
    guidance: float = 5.0
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self) -> None:
        if self.size % 2:
            raise ValueError(f"size must be even (2x2 space-to-depth), got {self.size}")
        if not 2 <= len(self.channels) <= 4:
            raise ValueError(f"channels: 2 to 4 levels, got {self.channels}")
        if any(c % self.head_dim or c % 32 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of head_dim={self.head_dim} and of 32 (GroupNorm)")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")


SAMPLING_FIELDS = ("steps", "guidance")
_U = DemoUNetConfig()


class DemoUNetPipeline(StableDiffusionPipeline):
    """`StableDiffusionPipeline` with the UNet demo model's defaults (128x128, 20 steps, guidance 5) in its
    signature, no safety checker."""

    def __init__(self, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any,
                 safety_checker: Any = None, feature_extractor: Any = None, image_encoder: Any = None,
                 requires_safety_checker: bool = False) -> None:
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)

    def __call__(self, prompt: Any = None, height: int = _U.size, width: int = _U.size,
                 num_inference_steps: int = _U.steps, guidance_scale: float = _U.guidance, negative_prompt: Any = None,
                 num_images_per_prompt: int | None = 1, generator: Any = None, latents: torch.Tensor | None = None,
                 output_type: str | None = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 callback_on_step_end: Any = None,
                 callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
                 **kwargs: Any):
        return super().__call__(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )


def demo_unet_scheduler_config(cfg: DemoUNetConfig) -> dict[str, Any]:
    """The noise schedule shared by training (`DDPMScheduler`) and sampling (`DPMSolverMultistepScheduler`)."""
    return {"num_train_timesteps": 1000, "beta_schedule": cfg.beta_schedule, "prediction_type": cfg.prediction_type,
            "steps_offset": 1, "timestep_spacing": "trailing"}


def build_demo_unet_pipeline(cfg: DemoUNetConfig | None = None, seed: int = 0) -> DemoUNetPipeline:
    """A fresh (untrained) UNet demo pipeline; the weights come from `demo_train --kind unet`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = cfg or DemoUNetConfig()
    torch.manual_seed(seed)
    levels = len(cfg.channels)
    vae = SpaceToDepthVAE(channels=3, factor=2)
    latent = vae.config.latent_channels
    unet = UNet2DConditionModel(
        sample_size=cfg.size // 2, in_channels=latent, out_channels=latent,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_dim, attention_head_dim=tuple(c // cfg.head_dim for c in cfg.channels),
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocabulary()) + 3, hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.text_length,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))
    scheduler = DPMSolverMultistepScheduler(**demo_unet_scheduler_config(cfg))
    return DemoUNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=word_tokenizer(cfg.text_length), unet=unet,
                            scheduler=scheduler)
