"""Tiny SD3, SD 1.5 and FLUX pipelines built offline (random weights, word-level tokenizers), saved with
`save_pretrained` and loaded back with `from_pretrained`, so the real loading path is exercised without a hub.

Shared by the SoftPAG tests and the HeadHunter tests. Every `run_*` helper uses a fixed prompt, seed and a tiny size,
and returns the pipeline's output tensor (`output_type="pt"` images by default, or `"latent"`).

Sizes (tokens of the attention layers):
- SD3: 4 heads x 8, 3 joint blocks (layer index = block index, 0..2), image 24x32 px -> 6x8 = 48 image tokens,
  16 text tokens (8 CLIP + 8 zero "T5" tokens: `text_encoder_3=None`). Diffusers' "blocks.1" = our layer 1.
- SD 1.5 UNet: BasicTransformerBlocks in `named_modules()` order: 0 = down_blocks.0, 1 = mid_block ("mid"),
  2, 3 = up_blocks.1; 8 heads; image 24x40 px -> latent 12x20.
- FLUX (dev-like, guidance-distilled): 2 double + 2 single blocks (layer 0..3), 2 heads x 16, image 32x48 px ->
  8x12 = 96 image tokens, 8 text tokens.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

WORDS = (
    "a an the photo of cat dog red blue green golden hour warm cool light dark sunlit glow vintage film glossy "
    "bokeh portrait landscape city night street house tree sky sea mountain small big"
).split()

CLIP_LEN = 8
PROMPT = "a photo of a cat"
NEGATIVE = "dark blue"


def tiny_word_tokenizer(max_length: int = CLIP_LEN):
    """A word-level fast tokenizer: `<pad>`=0, `</s>`=1, `<unk>`=2, then `WORDS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _clip(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=projection or hidden,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection is not None else CLIPTextModel(config)


def _vae(latent_channels: int = 4, **kwargs: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **kwargs,
    )


def _roundtrip(pipe, cls, path: str | None):
    # Components that are None are not saved; from_pretrained must be told they are None again.
    absent = {name: None for name, value in pipe.components.items() if value is None}
    if path is not None:
        pipe.save_pretrained(path)
        return cls.from_pretrained(path, **absent)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        return cls.from_pretrained(tmp, **absent)


def tiny_sd3_components() -> dict[str, Any]:
    """Components of a tiny SD3 pipeline (no T5: `text_encoder_3=None`, the pipeline then uses zero T5 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16,
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _vae(shift_factor=0.1, scaling_factor=1.2),
        "text_encoder": _clip(8, 6),
        "tokenizer": tiny_word_tokenizer(),
        "text_encoder_2": _clip(8, 6),
        "tokenizer_2": tiny_word_tokenizer(),
        "text_encoder_3": None,
        "tokenizer_3": None,
    }


def build_tiny_sd3_pipeline(path: str | None = None, pag: bool = False, pag_applied_layers: Any = "blocks.1"):
    """A tiny `StableDiffusion3Pipeline` (or `StableDiffusion3PAGPipeline` with `pag=True`), saved and reloaded."""
    from diffusers import StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    components = tiny_sd3_components()
    if pag:
        pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=pag_applied_layers)
        return _roundtrip(pipe, StableDiffusion3PAGPipeline, path)
    return _roundtrip(StableDiffusion3Pipeline(**components), StableDiffusion3Pipeline, path)


def run_tiny_sd3(pipe, *, steps: int = 3, guidance: float = 4.0, seed: int = 0, prompt: str = PROMPT,
                 output_type: str = "pt", **kwargs: Any) -> torch.Tensor:
    """24x32 px, `steps` steps, fixed seed; CFG on when `guidance > 1`."""
    return pipe(
        prompt=prompt, negative_prompt=NEGATIVE if guidance > 1 else None, height=24, width=32,
        num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=8,
        generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs,
    ).images


def tiny_sd_components() -> dict[str, Any]:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    return {
        "unet": unet,
        "scheduler": DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "vae": _vae(scaling_factor=0.5),
        "text_encoder": _clip(16),
        "tokenizer": tiny_word_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def build_tiny_sd_pipeline(path: str | None = None, pag: bool = False, pag_applied_layers: Any = "mid"):
    """A tiny `StableDiffusionPipeline` (or `StableDiffusionPAGPipeline` with `pag=True`), saved and reloaded."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

    components = tiny_sd_components()
    if pag:
        pipe = StableDiffusionPAGPipeline(**components, requires_safety_checker=False,
                                          pag_applied_layers=pag_applied_layers)
        return _roundtrip(pipe, StableDiffusionPAGPipeline, path)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    return _roundtrip(pipe, StableDiffusionPipeline, path)


def run_tiny_sd(pipe, *, steps: int = 3, guidance: float = 5.0, seed: int = 0, prompt: str = PROMPT,
                output_type: str = "pt", **kwargs: Any) -> torch.Tensor:
    """24x40 px (latent 12x20), `steps` DDIM steps, fixed seed; CFG on when `guidance > 1`."""
    return pipe(
        prompt=prompt, negative_prompt=NEGATIVE if guidance > 1 else None, height=24, width=40,
        num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
        output_type=output_type, **kwargs,
    ).images


def tiny_flux_components() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(WORDS) + 3, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0)
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0),
        "vae": _vae(shift_factor=0.1, scaling_factor=1.2),
        "text_encoder": _clip(12),
        "tokenizer": tiny_word_tokenizer(),
        "text_encoder_2": t5,
        "tokenizer_2": tiny_word_tokenizer(8),
    }


def build_tiny_flux_pipeline(path: str | None = None):
    """A tiny guidance-distilled (FLUX.1-dev-like) `FluxPipeline`, saved and reloaded."""
    from diffusers import FluxPipeline

    return _roundtrip(FluxPipeline(**tiny_flux_components()), FluxPipeline, path)


def run_tiny_flux(pipe, *, steps: int = 3, guidance: float = 3.5, seed: int = 0, prompt: str = PROMPT,
                  output_type: str = "pt", **kwargs: Any) -> torch.Tensor:
    """32x48 px (8x12 packed tokens), `steps` steps, fixed seed; one conditional forward per step (no CFG)."""
    return pipe(
        prompt=prompt, height=32, width=48, num_inference_steps=steps, guidance_scale=guidance,
        max_sequence_length=8, generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs,
    ).images
