"""Tiny models of every supported family, built from configs (random weights), saved with `save_pretrained` and
loaded back with `from_pretrained`, so the real loading path is exercised without a hub.

Each builder returns `(model, make_inputs)` where `make_inputs(batch, generator)` gives the forward's kwargs on odd,
non-square token grids.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch

Inputs = Callable[..., dict[str, Any]]


def roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    """Save with `save_pretrained` and load back with `from_pretrained` (safetensors)."""
    cls = type(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = cls.from_pretrained(tmp)
    return loaded.eval()


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def tiny_wan(i2v: bool = False) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=16,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=20 if i2v else None,
        added_kv_proj_dim=32 if i2v else None,
        rope_max_seq_len=64,
    )
    model = roundtrip(model)

    def make_inputs(batch: int = 1, gen: torch.Generator | None = None, frames: int = 3, height: int = 10, width: int = 14, text: int | None = None):
        gen = gen or torch.Generator().manual_seed(1)
        # The stock I2V processor assumes 512 text tokens (umT5); use them so stock and diffattn agree.
        text = text if text is not None else (512 if i2v else 7)
        inputs = {
            "hidden_states": _randn(gen, batch, 4, frames, height, width),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": _randn(gen, batch, text, 24),
        }
        if i2v:
            inputs["encoder_hidden_states_image"] = _randn(gen, batch, 5, 20)
        return inputs

    return model, make_inputs


def tiny_hunyuan_video() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=24,
        pooled_projection_dim=12,
        rope_theta=256.0,
        rope_axes_dim=(4, 6, 6),
    )
    model = roundtrip(model)

    def make_inputs(batch: int = 1, gen: torch.Generator | None = None, frames: int = 3, height: int = 10, width: int = 14, text: int = 9):
        gen = gen or torch.Generator().manual_seed(1)
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[:, text - 3 :] = 0  # padding at the end of the text, as the pipeline produces
        if batch > 1:
            mask[1:, text - 5 :] = 0
        return {
            "hidden_states": _randn(gen, batch, 4, frames, height, width),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": _randn(gen, batch, text, 24),
            "encoder_attention_mask": mask,
            "pooled_projections": _randn(gen, batch, 12),
            "guidance": torch.full((batch,), 6000.0),
        }

    return model, make_inputs


def tiny_cogvideox(rope: bool = True) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=24,
        num_layers=2,
        sample_width=14,
        sample_height=10,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=7,
        use_rotary_positional_embeddings=rope,
        use_learned_positional_embeddings=False,
    )
    model = roundtrip(model)

    def make_inputs(batch: int = 1, gen: torch.Generator | None = None, frames: int = 3, height: int = 10, width: int = 14, text: int = 7):
        gen = gen or torch.Generator().manual_seed(1)
        inputs = {
            "hidden_states": _randn(gen, batch, frames, 4, height, width),
            "encoder_hidden_states": _randn(gen, batch, text, 24),
            "timestep": torch.full((batch,), 500, dtype=torch.long),
        }
        if rope:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=16, crops_coords=((0, 0), (height // 2, width // 2)), grid_size=(height // 2, width // 2),
                temporal_size=frames,
            )
            inputs["image_rotary_emb"] = (cos, sin)
        return inputs

    return model, make_inputs


def tiny_flux() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    model = roundtrip(model)

    def make_inputs(batch: int = 1, gen: torch.Generator | None = None, height: int = 5, width: int = 7, text: int = 6):
        gen = gen or torch.Generator().manual_seed(1)
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        return {
            "hidden_states": _randn(gen, batch, height * width, 8),
            "encoder_hidden_states": _randn(gen, batch, text, 24),
            "pooled_projections": _randn(gen, batch, 12),
            "timestep": torch.full((batch,), 0.5),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(text, 3),
            "guidance": torch.full((batch,), 3.5),
        }

    return model, make_inputs


def tiny_sd3() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    model = roundtrip(model)

    def make_inputs(batch: int = 1, gen: torch.Generator | None = None, height: int = 10, width: int = 14, text: int = 7):
        gen = gen or torch.Generator().manual_seed(1)
        return {
            "hidden_states": _randn(gen, batch, 4, height, width),
            "encoder_hidden_states": _randn(gen, batch, text, 24),
            "pooled_projections": _randn(gen, batch, 12),
            "timestep": torch.full((batch,), 500.0),
        }

    return model, make_inputs


def tiny_unet() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=24,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    model = roundtrip(model)

    def make_inputs(batch: int = 1, gen: torch.Generator | None = None, height: int = 12, width: int = 20, text: int = 7):
        gen = gen or torch.Generator().manual_seed(1)
        return {
            "sample": _randn(gen, batch, 4, height, width),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": _randn(gen, batch, text, 24),
        }

    return model, make_inputs


BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, Inputs]]] = {
    "wan": tiny_wan,
    "wan_i2v": lambda: tiny_wan(i2v=True),
    "hunyuan_video": tiny_hunyuan_video,
    "cogvideox": tiny_cogvideox,
    "flux": tiny_flux,
    "sd3": tiny_sd3,
    "unet": tiny_unet,
}


def output_of(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out
