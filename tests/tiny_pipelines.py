"""A whole tiny `WanPipeline` built offline: word-level tokenizer, tiny umT5 encoder, tiny Wan VAE and
transformer, flow-matching scheduler; saved with `save_pretrained` and loaded with `from_pretrained`."""

from __future__ import annotations

import tempfile

import torch

WORDS = "a red blue green circle square moving left right up down on background of the small big".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_wan_pipeline(path: str | None = None):
    """Build, save and reload a tiny WanPipeline. Returns the loaded pipeline (CPU, fp32)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    if path is not None:
        pipe.save_pretrained(path)
        return WanPipeline.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        return WanPipeline.from_pretrained(tmp)


def run_tiny_wan(pipe, *, steps: int = 3, guidance: float = 5.0, seed: int = 0, **kwargs):
    """Run the tiny pipeline at 5 frames of 32x48 pixels (latent 2x4x6, 2x2x3 tokens per frame)."""
    return pipe(
        prompt="a red circle moving left",
        negative_prompt="blue square",
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).frames
