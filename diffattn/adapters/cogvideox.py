"""CogVideoX (`CogVideoXTransformer3DModel`): joint `[text(226); video]` attention, RoPE on the video part (5B).

Layer index = block index in `model.transformer_blocks`.
Mirrors `CogVideoXAttnProcessor2_0` and `FusedCogVideoXAttnProcessor2_0` (diffusers 0.42.1).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..call import AttentionCall
from ..context import ForwardContext, TokenGrid
from .base import DiffattnProcessor, FamilyAdapter, forward_context, block_slots, legacy_qkv, merge_heads, split_heads
from ..token_order import TokenStream


class CogVideoXProcessor(DiffattnProcessor):
    family = "cogvideox"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        ctx = self.context()
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = legacy_qkv(attn, hidden_states)
        query = split_heads(query, batch_size, attn.heads)
        key = split_heads(key, batch_size, attn.heads)
        value = split_heads(value, batch_size, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        call = AttentionCall(
            query, key, value, self.layer_info("joint"), "joint", ctx,
            grid=self.grid_for(ctx, sequence_length - text_len), text_len=text_len, text_first=True,
            attn_mask=attention_mask,
        )
        out = merge_heads(self.attend(call))
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_hidden_states, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_hidden_states


def _read_inputs(model, args: dict[str, Any]) -> ForwardContext:
    hidden = args["hidden_states"]  # [B, F, C, H, W]
    p, p_t = model.config.patch_size, model.config.patch_size_t
    _, f, _, h, w = hidden.shape
    frames = f if p_t is None else f // p_t
    return forward_context("cogvideox", args, "hidden_states", TokenGrid(frames, h // p, w // p),
                           patch_size=(p_t or 1, p, p))


ADAPTER = FamilyAdapter(
    name="cogvideox",
    model_classes=("CogVideoXTransformer3DModel",),
    processor_cls=CogVideoXProcessor,
    slots=lambda model: block_slots(model, ["transformer_blocks"], {"attn1": "joint"}),
    read_inputs=_read_inputs,
    layer_doc="block index in model.transformer_blocks",
    # the video tokens leave through norm_final (per token), then norm_out; the rotary table is a forward argument
    token_stream=TokenStream(blocks="transformer_blocks", exit="norm_final", rope_argument="image_rotary_emb",
                             rope_axis=0),
)
