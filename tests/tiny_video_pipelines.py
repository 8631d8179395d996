"""Whole tiny `CogVideoXPipeline` and `HunyuanVideoPipeline` built offline (no hub): word-level tokenizers from the
`tokenizers` library, tiny T5 / Llama / CLIP text encoders, tiny video VAEs and transformers from configs. Each is
saved with `save_pretrained` and loaded with `from_pretrained`, so the real loading path runs.

Sizes are picked so that the latent token grid is 3 frames x 4 x 6 tokens (24 tokens per frame): Radial Attention
with `block_size=16` then has a genuinely sparse block mask, and a generation of 3 steps takes about a second on CPU.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

# Both pipelines: 9 pixel frames (3 latent frames, temporal factor 4), 32 x 48 pixels (8 x 12 latent, spatial
# factor 4), patch 2 -> token grid (3, 4, 6). CogVideoX 1.5 (temporal patch 2) runs 17 frames: 5 latent frames,
# padded by the pipeline to 6, hence the same grid.
HEIGHT, WIDTH, NUM_FRAMES = 32, 48, 9
NUM_FRAMES_COGVIDEOX_15 = 17
TOKEN_GRID = (3, 4, 6)
MAX_TEXT = 12

PROMPT = "a red circle moving left"
NEGATIVE_PROMPT = "green square"

WORDS = (
    "a red blue green circle square moving left right up down on background of the small big describe video "
    "system user scene : . ,"
).split()

# HunyuanVideo's Llama prompt template, shortened so that our word-level tokenizer covers it. `crop_start=None`
# makes the pipeline compute the crop itself (tokens of the template, minus "{}" and the final <|eot_id|>).
HUNYUAN_TEMPLATE: dict[str, Any] = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video: the scene, the background."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "crop_start": None,
}


def word_tokenizer(
    specials: list[str],
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str = "<pad>",
    unk: str = "<unk>",
    extra_words: tuple[str, ...] = (),
):
    """A word-level `PreTrainedTokenizerFast` (whitespace/punctuation split, lower-cased) that adds `bos`/`eos`
    around each text, as the real T5 (eos), Llama (bos) and CLIP (both) tokenizers do."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [pad, unk, *specials, *WORDS, *extra_words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    special_pairs = [(t, vocab[t]) for t in (bos, eos) if t]
    if special_pairs:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_pairs)
    named = {"pad_token": pad, "unk_token": unk}
    if bos:
        named["bos_token"] = bos
    if eos:
        named["eos_token"] = eos
    others = [t for t in specials if t not in (bos, eos)]
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=others or None, **named)


def _roundtrip(pipe, path: str | None):
    cls = type(pipe)
    if path is not None:
        pipe.save_pretrained(path)
        loaded = cls.from_pretrained(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pipe.save_pretrained(tmp)
            loaded = cls.from_pretrained(tmp)
    loaded.set_progress_bar_config(disable=True)
    return loaded


# ---- CogVideoX ------------------------------------------------------------------------------------------------
def build_tiny_cogvideox_pipeline(path: str | None = None, *, patch_size_t: int | None = None):
    """Build, save and reload a tiny CogVideoX (5B-style: rotary embeddings, no learned positions) pipeline with a
    `CogVideoXDDIMScheduler` configured as CogVideoX-5B's; `patch_size_t=2` gives the CogVideoX 1.5 layout.
    Returns the loaded pipeline (CPU, fp32)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = word_tokenizer(["</s>"], eos="</s>")
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        )
    )
    # Three blocks: two spatial and two temporal downsamplings (factor 4 each), like the real VAE's 8 x 4.
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=24, num_layers=2, sample_width=WIDTH // 4, sample_height=HEIGHT // 4, sample_frames=NUM_FRAMES,
        patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=MAX_TEXT,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, snr_shift_scale=1.0,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _roundtrip(pipe, path)


def run_tiny_cogvideox(pipe, *, steps: int = 3, guidance: float = 6.0, seed: int = 0, **kwargs) -> torch.Tensor:
    """9 frames (CogVideoX 1.5: 17) of 32x48 pixels with a fixed seed; CFG (guidance > 1) runs as one batch-2
    forward per step. Returns the frames `[B, F, C, H, W]` in [0, 1]."""
    frames = NUM_FRAMES if pipe.transformer.config.patch_size_t is None else NUM_FRAMES_COGVIDEOX_15
    options: dict[str, Any] = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=HEIGHT, width=WIDTH, num_frames=frames,
        num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=MAX_TEXT,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    )
    options.update(kwargs)
    return pipe(**options).frames


# ---- HunyuanVideo ---------------------------------------------------------------------------------------------
def build_tiny_hunyuan_video_pipeline(path: str | None = None):
    """Build, save and reload a tiny HunyuanVideo pipeline: Llama text encoder (hidden state 3rd from last, as
    the real one) with a Llama-like tokenizer (bos, header tokens, <|eot_id|>), CLIP for the pooled projection,
    guidance-distilled transformer. Returns the loaded pipeline (CPU, fp32).

    Call it with `prompt_template=HUNYUAN_TEMPLATE` (as `run_tiny_hunyuan_video` does): the pipeline's default
    template hard-codes `crop_start=95`, the length of the real Llama-3 tokenization of its system prompt."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    headers = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = word_tokenizer(headers, bos="<|begin_of_text|>", extra_words=("{}",))
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=24, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        )
    )
    # CLIP pools at the first eos token (any eos id but the legacy 2).
    tokenizer_2 = word_tokenizer(["<|startoftext|>", "<|endoftext|>"], bos="<|startoftext|>", eos="<|endoftext|>")
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=12, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, pad_token_id=tokenizer_2.pad_token_id,
            bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=24, pooled_projection_dim=12, rope_theta=256.0, rope_axes_dim=(4, 6, 6),
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    return _roundtrip(pipe, path)


def run_tiny_hunyuan_video(
    pipe, *, steps: int = 3, guidance: float = 6.0, true_cfg_scale: float = 1.0, seed: int | list[int] = 0, **kwargs
) -> torch.Tensor:
    """9 frames of 32x48 pixels with a fixed seed (a list of seeds gives one generator per prompt). The embedded
    (distilled) guidance is one forward per step; `true_cfg_scale > 1` adds a separate negative-prompt forward.
    Returns the frames `[B, F, C, H, W]` in [0, 1]."""
    generator = (
        [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else torch.Generator().manual_seed(seed)
    )
    options: dict[str, Any] = dict(
        prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, num_inference_steps=steps,
        guidance_scale=guidance, true_cfg_scale=true_cfg_scale, max_sequence_length=MAX_TEXT,
        prompt_template=HUNYUAN_TEMPLATE, generator=generator, output_type="pt",
    )
    if true_cfg_scale > 1:
        options["negative_prompt"] = NEGATIVE_PROMPT
    options.update(kwargs)
    return pipe(**options).frames


def hunyuan_prompt_mask(pipe, prompt: str | list[str] = PROMPT) -> torch.Tensor:
    """The prompt attention mask `[B, MAX_TEXT]` that the pipeline computes for `prompt` (after the crop)."""
    _, _, mask = pipe.encode_prompt(prompt=prompt, prompt_template=HUNYUAN_TEMPLATE, max_sequence_length=MAX_TEXT)
    return mask
