"""SD1.5 / SDXL UNets (`UNet2DConditionModel`): `attn1` image self-attention and `attn2` text cross-attention
(77 tokens) in every `BasicTransformerBlock`, at several resolutions.

Layer index = order of the transformer blocks as `named_modules()` walks them: down blocks, then up blocks, then
the mid block (Diffusers' registration order; SD1.5's mid block is layer 15); `attn1` and `attn2` of a block share
it. The grid of a level is derived from the latent size and the level's token count.
Mirrors `AttnProcessor2_0` and `FusedAttnProcessor2_0` (diffusers 0.42.1).
"""

from __future__ import annotations

from typing import Any

import torch

from ..call import AttentionCall, LayerInfo
from ..context import ForwardContext, TokenGrid
from .base import DiffattnProcessor, FamilyAdapter, forward_context, Slot, legacy_qkv, merge_heads, split_heads


class UNetProcessor(DiffattnProcessor):
    family = "unet"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        ctx = self.context()
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if is_cross and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query, key, value = legacy_qkv(attn, hidden_states, encoder_hidden_states)
        query = split_heads(query, batch_size, attn.heads)
        key = split_heads(key, batch_size, attn.heads)
        value = split_heads(value, batch_size, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        role = "cross" if is_cross else "self"
        call = AttentionCall(
            query, key, value, self.layer_info(role), role, ctx, grid=self.grid_for(ctx, query.shape[2]),
            text_len=key.shape[2] if is_cross else 0, attn_mask=attention_mask,
            hidden_states=hidden_states if is_cross else None,
            project_kv=_kv_projector(attn) if is_cross else None,
        )
        out = merge_heads(self.attend(call)).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _kv_projector(attn):
    """Keys and values `[N, H, L, D]` of other encoder states `[N, L, D]` through this module's frozen projections
    (norm_cross, fused or separate to_k/to_v, norm_k), exactly as for the forward's own text."""

    def project(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        if getattr(attn, "fused_projections", False):
            kv = attn.to_kv(states)
            key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        else:
            key, value = attn.to_k(states), attn.to_v(states)
        key, value = split_heads(key, states.shape[0], attn.heads), split_heads(value, states.shape[0], attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return key, value

    return project


def _slots(model) -> list[Slot]:
    blocks = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    slots = []
    for index, (name, block) in enumerate(blocks):
        for attn_name, role in (("attn1", "self"), ("attn2", "cross")):
            module = getattr(block, attn_name, None)
            if module is None or not hasattr(module, "set_processor"):
                continue
            if attn_name == "attn2" and not getattr(module, "is_cross_attention", True):
                role = "self"
            path = f"{name}.{attn_name}"
            slots.append(Slot(path, module, LayerInfo(index, attn_name, path, role, len(blocks))))
    return slots


def _read_inputs(model, args: dict[str, Any]) -> ForwardContext:
    sample = args["sample"]  # [B, C, H, W]
    return forward_context("unet", args, "sample", TokenGrid(1, sample.shape[-2], sample.shape[-1]))


ADAPTER = FamilyAdapter(
    name="unet",
    model_classes=("UNet2DConditionModel",),
    processor_cls=UNetProcessor,
    slots=_slots,
    read_inputs=_read_inputs,
    layer_doc="order of BasicTransformerBlocks in named_modules(): down, up, then mid; attn1 and attn2 share it",
)
