"""SD3 / SD3.5 (`SD3Transformer2DModel`): joint `[image; text]` attention (`attn`), and in SD3.5's dual-attention
layers an image-only self-attention (`attn2`). No RoPE (positions are in the patch embedding).

Layer index = block index in `model.transformer_blocks`; `attn` and `attn2` of a block share it.
Mirrors `JointAttnProcessor2_0` and `FusedJointAttnProcessor2_0` (diffusers 0.42.1).
"""

from __future__ import annotations

from typing import Any

import torch

from ..call import AttentionCall
from ..context import ForwardContext, TokenGrid
from .base import DiffattnProcessor, FamilyAdapter, forward_context, block_slots, legacy_qkv, merge_heads, split_heads


def _added_qkv(attn, encoder_hidden_states: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        qkv = attn.to_added_qkv(encoder_hidden_states)
        return torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
    return (
        attn.add_q_proj(encoder_hidden_states),
        attn.add_k_proj(encoder_hidden_states),
        attn.add_v_proj(encoder_hidden_states),
    )


class SD3Processor(DiffattnProcessor):
    family = "sd3"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        ctx = self.context()
        batch_size, num_image = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = legacy_qkv(attn, hidden_states)
        query = split_heads(query, batch_size, attn.heads)
        key = split_heads(key, batch_size, attn.heads)
        value = split_heads(value, batch_size, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_len = 0
        if encoder_hidden_states is not None:
            e_query, e_key, e_value = (split_heads(t, batch_size, attn.heads) for t in _added_qkv(attn, encoder_hidden_states))
            if attn.norm_added_q is not None:
                e_query = attn.norm_added_q(e_query)
            if attn.norm_added_k is not None:
                e_key = attn.norm_added_k(e_key)
            query = torch.cat([query, e_query], dim=2)
            key = torch.cat([key, e_key], dim=2)
            value = torch.cat([value, e_value], dim=2)
            text_len = encoder_hidden_states.shape[1]

        role = "joint" if text_len else "self"
        call = AttentionCall(
            query, key, value, self.layer_info(role), role, ctx,
            grid=self.grid_for(ctx, num_image), text_len=text_len, text_first=False,
        )
        out = merge_heads(self.attend(call)).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :num_image], out[:, num_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if encoder_hidden_states is not None:
            return out, encoder_hidden_states
        return out


def _read_inputs(model, args: dict[str, Any]) -> ForwardContext:
    hidden = args["hidden_states"]  # [B, C, H, W]
    p = model.config.patch_size
    return forward_context("sd3", args, "hidden_states", TokenGrid(1, hidden.shape[-2] // p, hidden.shape[-1] // p),
                           patch_size=(1, p, p))


ADAPTER = FamilyAdapter(
    name="sd3",
    model_classes=("SD3Transformer2DModel",),
    processor_cls=SD3Processor,
    slots=lambda model: block_slots(model, ["transformer_blocks"], {"attn": "joint", "attn2": "self"}),
    read_inputs=_read_inputs,
    layer_doc="block index in model.transformer_blocks; attn (joint) and attn2 (SD3.5 dual attention) share it",
)
