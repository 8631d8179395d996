"""The demo models' architecture: stock Diffusers pipelines and transformers, a pixel-space "VAE" and a word tokenizer.

No model hub is reachable here, so the project trains its own small models (`diffattn.pipelines.demo_train`) and
ships them in `assets/`. What is ours and why:

- `PixelSpaceVAE`: a lossless rearrangement of pixels instead of a learned autoencoder (a trained VAE would cost
  training time and blur the shapes). For video it packs frames like Wan's causal VAE packs time: the first frame
  alone (repeated 4x in the channels), then groups of 4 frames, so the stock `WanPipeline` frame rule
  (`num_frames = 4k + 1`) holds; spatially it is the identity. For images it is the identity.
- `DemoVideoPipeline(WanPipeline)` / `DemoImagePipeline(StableDiffusion3Pipeline)`: the stock pipelines with the
  defaults the demo models were trained at (size, frames, steps, text length), so `pipe(prompt)` is right.
- The text encoders are tiny, randomly initialised and frozen (a word-level vocabulary makes their outputs distinct
  per prompt; the transformer learns to read them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    ConfigMixin,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

from .demo_data import vocabulary

# --------------------------------------------------------------------------------------------------- the "VAE"


class _Deterministic:
    """What `retrieve_latents` expects from `vae.encode(x).latent_dist`: a distribution with no spread."""

    def __init__(self, value: torch.Tensor) -> None:
        self.mean = value

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


@dataclass
class PixelEncoderOutput:
    latent_dist: _Deterministic


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """Pixels as latents. `temporal_pack=4` packs video frames `[f0] [f1..f4] [f5..f8] ...` into channels
    (`f0` repeated 4x), `temporal_pack=1` is the identity (images). The config carries the fields the stock Wan and
    SD3 pipelines read (`z_dim`, `latents_mean/std`, `scale_factor_*`, `block_out_channels`, `scaling_factor`)."""

    @register_to_config
    def __init__(
        self,
        channels: int = 3,
        temporal_pack: int = 1,
        z_dim: int | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        scale_factor_temporal: int | None = None,
        scale_factor_spatial: int = 1,
        block_out_channels: list[int] | None = None,
        latent_channels: int | None = None,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        if temporal_pack not in (1, 4):
            raise ValueError(f"temporal_pack must be 1 (images) or 4 (video), got {temporal_pack!r}")
        z = channels * temporal_pack
        derived = {
            "z_dim": z, "latent_channels": z, "latents_mean": [0.0] * z, "latents_std": [1.0] * z,
            "scale_factor_temporal": temporal_pack, "block_out_channels": [z],
        }
        given = {"z_dim": z_dim, "latent_channels": latent_channels, "latents_mean": latents_mean,
                 "latents_std": latents_std, "scale_factor_temporal": scale_factor_temporal,
                 "block_out_channels": block_out_channels}
        for key, value in given.items():
            if value is not None and value != derived[key]:
                raise ValueError(f"PixelSpaceVAE: {key}={value!r} contradicts channels/temporal_pack ({derived[key]!r})")
        self.register_to_config(**derived)
        if scale_factor_spatial != 1 or scaling_factor != 1.0 or shift_factor != 0.0:
            raise ValueError("PixelSpaceVAE is the identity in space: scale_factor_spatial=1, scaling_factor=1, shift_factor=0")
        # One buffer so that `.dtype`/`.device` and offloading work like any model; pixels are multiplied by it (1).
        self.register_buffer("pixel_scale", torch.ones(()))

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.temporal_pack == 1:
            return x
        if x.ndim != 5 or (x.shape[2] - 1) % 4:
            raise ValueError(f"video must be [B, C, 4k+1, H, W], got shape {tuple(x.shape)}")
        b, c, f, h, w = x.shape
        first = x[:, :, :1].repeat(1, 1, 4, 1, 1)
        frames = torch.cat([first, x[:, :, 1:]], dim=2)  # [B, C, 4 * (k+1), H, W]
        frames = frames.reshape(b, c, f // 4 + 1, 4, h, w).permute(0, 1, 3, 2, 4, 5)
        return frames.reshape(b, c * 4, f // 4 + 1, h, w)

    def _unpack(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.temporal_pack == 1:
            return z
        b, cz, lat, h, w = z.shape
        c = cz // 4
        frames = z.reshape(b, c, 4, lat, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c, lat * 4, h, w)
        first = frames[:, :, :4].mean(dim=2, keepdim=True)
        return torch.cat([first, frames[:, :, 4:]], dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        latents = self._pack(x * self.pixel_scale.to(x.dtype))
        return PixelEncoderOutput(_Deterministic(latents)) if return_dict else (_Deterministic(latents),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        pixels = self._unpack(z) / self.pixel_scale.to(z.dtype)
        return DecoderOutput(sample=pixels) if return_dict else (pixels,)


# --------------------------------------------------------------------------------------------------- tokenizer


def word_tokenizer(max_length: int):
    """A word-level fast tokenizer over the demo vocabulary; `</s>` appended (CLIP pools there, umT5 expects it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


# --------------------------------------------------------------------------------------------------- configs


# Config fields that are only call defaults of the pipelines (tunable after training without retraining).
SAMPLING_FIELDS = ("steps", "guidance")


@dataclass(frozen=True)
class DemoVideoConfig:
    """Wan-architecture text-to-video at 17 frames x 64x64 px: latent 5x64x64 (12 ch), patch (1,2,2) ->
    5x32x32 = 5,120 tokens, 4 heads x 64."""

    height: int = 64
    width: int = 64
    num_frames: int = 17
    text_length: int = 16
    dim_head: int = 64
    heads: int = 4
    layers: int = 6
    ffn: int = 1024
    text_dim: int = 64
    steps: int = 16  # sampling default: 12 lost the shape for some prompts on an earlier model; 16 looks like 20 (~36 s on 2 cores)
    guidance: float = 5.0
    shift: float = 3.0

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (Wan's frame rule), got {self.num_frames}")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"height and width must be even (patch 2), got {self.height}x{self.width}")


@dataclass(frozen=True)
class DemoImageConfig:
    """SD3-architecture text-to-image at 128x128 px, patch 2 -> 64x64 = 4,096 tokens, 4 heads x 64; no T5 (the
    pipeline's zero T5 tokens are kept short with `max_sequence_length`)."""

    size: int = 128
    text_length: int = 16
    t5_length: int = 4
    dim_head: int = 64
    heads: int = 4
    layers: int = 6
    clip_dim: int = 64
    steps: int = 12
    guidance: float = 5.0
    shift: float = 2.0

    def __post_init__(self) -> None:
        if self.size % 2:
            raise ValueError(f"size must be even (patch 2), got {self.size}")


# --------------------------------------------------------------------------------------------------- pipelines

_V, _I = DemoVideoConfig(), DemoImageConfig()  # the settings the shipped weights were trained at: call defaults


class DemoVideoPipeline(WanPipeline):
    """`WanPipeline` with the demo video model's defaults (64x64, 17 frames, 16 steps, 16 text tokens) in its
    signature, so callers that read defaults from it (the CLI, the app) see the trained settings."""

    def __init__(self, tokenizer: Any, text_encoder: Any, vae: PixelSpaceVAE, scheduler: Any, transformer: Any = None,
                 transformer_2: Any = None, boundary_ratio: float | None = None, expand_timesteps: bool = False) -> None:
        # Same components as WanPipeline; the annotation tells Diffusers' loader that a PixelSpaceVAE is expected.
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer=transformer, transformer_2=transformer_2,
                         boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)

    def __call__(
        self, prompt: Any = None, negative_prompt: Any = None, height: int = _V.height, width: int = _V.width,
        num_frames: int = _V.num_frames, num_inference_steps: int = _V.steps, guidance_scale: float = _V.guidance,
        num_videos_per_prompt: int | None = 1, generator: Any = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np", return_dict: bool = True, attention_kwargs: dict | None = None,
        callback_on_step_end: Any = None, callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
        max_sequence_length: int = _V.text_length,
    ):
        return super().__call__(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )


class DemoImagePipeline(StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with the demo image model's defaults (128x128, 12 steps, short text)."""

    def __init__(self, transformer: Any, scheduler: Any, vae: PixelSpaceVAE, text_encoder: Any, tokenizer: Any,
                 text_encoder_2: Any, tokenizer_2: Any, text_encoder_3: Any = None, tokenizer_3: Any = None,
                 image_encoder: Any = None, feature_extractor: Any = None) -> None:
        # Same components as StableDiffusion3Pipeline (no T5 by default); a PixelSpaceVAE is the expected VAE.
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder=image_encoder, feature_extractor=feature_extractor)

    def __call__(
        self, prompt: Any = None, negative_prompt: Any = None, height: int = _I.size, width: int = _I.size,
        num_inference_steps: int = _I.steps, guidance_scale: float = _I.guidance,
        num_images_per_prompt: int | None = 1, generator: Any = None, latents: torch.Tensor | None = None,
        output_type: str | None = "pil", return_dict: bool = True, joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Any = None, callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
        max_sequence_length: int = _I.t5_length,
    ):
        return super().__call__(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            output_type=output_type, return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )


def build_demo_video_pipeline(cfg: DemoVideoConfig | None = None, seed: int = 0) -> DemoVideoPipeline:
    """A fresh (untrained) demo video pipeline; the weights come from `demo_train`."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = cfg or DemoVideoConfig()
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(cfg.text_length)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=cfg.text_dim // 4, d_ff=2 * cfg.text_dim, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=cfg.text_length,
        pad_token_id=0, eos_token_id=1,
    ))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.heads, attention_head_dim=cfg.dim_head, in_channels=12,
        out_channels=12, text_dim=cfg.text_dim, freq_dim=64, ffn_dim=cfg.ffn, num_layers=cfg.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256,
    )
    pipe = DemoVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
        vae=PixelSpaceVAE(channels=3, temporal_pack=4), scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
    )
    return pipe


def build_demo_image_pipeline(cfg: DemoImageConfig | None = None, seed: int = 0) -> DemoImagePipeline:
    """A fresh (untrained) demo image pipeline: SD3 transformer, two tiny CLIP text encoders, no T5."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = cfg or DemoImageConfig()
    torch.manual_seed(seed)

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocabulary()) + 3, hidden_size=cfg.clip_dim, intermediate_size=2 * cfg.clip_dim,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=cfg.text_length,
            projection_dim=cfg.clip_dim, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        ))

    grid = cfg.size // 2
    transformer = SD3Transformer2DModel(
        sample_size=cfg.size, patch_size=2, in_channels=3, num_layers=cfg.layers, attention_head_dim=cfg.dim_head,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.clip_dim, caption_projection_dim=cfg.heads * cfg.dim_head,
        pooled_projection_dim=2 * cfg.clip_dim, out_channels=3, pos_embed_max_size=grid, qk_norm="rms_norm",
    )
    pipe = DemoImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
        vae=PixelSpaceVAE(channels=3, temporal_pack=1), text_encoder=clip(), tokenizer=word_tokenizer(cfg.text_length),
        text_encoder_2=clip(), tokenizer_2=word_tokenizer(cfg.text_length), text_encoder_3=None, tokenizer_3=None,
    )
    return pipe
