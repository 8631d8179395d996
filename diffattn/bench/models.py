"""The real model configurations the benchmarks build (Diffusers' config.json of the released checkpoints), with
random weights: nothing is downloaded. `diffattn bench step` builds the transformers, `diffattn bench highres` the
whole Wan pipeline (transformer, UMT5-XXL text encoder, VAE)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MODELS", "UMT5_XXL", "count_parameters", "umt5_config", "umt5_xxl_parameters"]

# Real configurations (Diffusers' config.json of the released checkpoints).
MODELS: dict[str, dict[str, Any]] = {
    "wan2.1-14b": {
        "class": "WanTransformer3DModel",
        "config": {
            "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        },
        "vae": (4, 8),  # temporal, spatial compression
        "text_len": 512,
        "text_dim": 4096,
    },
    "hunyuan-video": {
        "class": "HunyuanVideoTransformer3DModel",
        "config": {
            "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
            "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
            "patch_size_t": 1,
            "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096, "pooled_projection_dim": 768,
            "rope_theta": 256.0, "rope_axes_dim": (16, 56, 56),
        },
        "vae": (4, 8),
        "text_len": 256,
        "text_dim": 4096,
    },
}


# Wan2.1-T2V-1.3B differs from 14B only in width, depth and FFN size.
MODELS["wan2.1-1.3b"] = {
    **MODELS["wan2.1-14b"],
    "config": {**MODELS["wan2.1-14b"]["config"], "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
}

# google/umt5-xxl (Wan's text encoder; the pipelines use its encoder only).
UMT5_XXL: dict[str, Any] = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
}


def umt5_config(fields: dict[str, Any]):
    from transformers import UMT5Config

    return UMT5Config(**fields)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def umt5_xxl_parameters() -> int:
    """Parameters of the UMT5-XXL encoder, counted on the meta device (nothing allocated)."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        return count_parameters(UMT5EncoderModel(umt5_config(UMT5_XXL)))
