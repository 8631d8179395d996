"""FLUX (`FluxTransformer2DModel`): joint `[text; image]` attention with RoPE over the whole joint sequence, in
19 double-stream blocks (text passed separately) and 38 single-stream blocks (sequence already concatenated).

Layer index: double-stream blocks first (0..N-1), then single-stream blocks (N..N+M-1).
Mirrors `diffusers.models.transformers.transformer_flux.FluxAttnProcessor` (0.42.1). IP-Adapter processors are
not reproduced: applying a method replaces them (remove() restores them).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..call import AttentionCall
from ..context import ForwardContext, TokenGrid
from .base import DiffattnProcessor, FamilyAdapter, forward_context, block_slots, to_heads_first
from ..token_order import TokenStream


def _projections(attn, hidden_states, encoder_hidden_states):
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        enc = (None, None, None)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            enc = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return (query, key, value, *enc)
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    enc = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        enc = (
            attn.add_q_proj(encoder_hidden_states),
            attn.add_k_proj(encoder_hidden_states),
            attn.add_v_proj(encoder_hidden_states),
        )
    return (query, key, value, *enc)


class FluxProcessor(DiffattnProcessor):
    family = "flux"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        ctx = self.context()
        query, key, value, e_query, e_key, e_value = _projections(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            e_value = e_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
        else:  # single-stream block: the text length comes from the forward's inputs
            text_len = ctx.text_len if ctx is not None else 0
        grid = self.grid_for(ctx, query.shape[1] - text_len)
        call = AttentionCall(
            to_heads_first(query), to_heads_first(key), to_heads_first(value), self.layer_info("joint"), "joint", ctx,
            grid=grid, text_len=text_len, text_first=True, attn_mask=attention_mask,
        )
        out = self.attend(call).transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            enc_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
            out = attn.to_out[0](out.contiguous())
            out = attn.to_out[1](out)
            enc_out = attn.to_add_out(enc_out.contiguous())
            return out, enc_out
        return out


def _read_inputs(model, args: dict[str, Any]) -> ForwardContext:
    hidden = args["hidden_states"]
    img_ids = args.get("img_ids")
    grid = None
    if img_ids is not None:
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        # Standard FLUX ids are (0, row, col); other token sets (Kontext references) leave the grid unknown.
        rows = int(ids[:, 1].max()) + 1
        cols = int(ids[:, 2].max()) + 1
        if rows * cols == hidden.shape[1]:
            grid = TokenGrid(1, rows, cols)
    return forward_context("flux", args, "hidden_states", grid)


def _keeps_order(model, args: dict[str, Any], ctx: ForwardContext) -> str | None:
    """ControlNet residuals are added to the image tokens after blocks, in the model's order."""
    if args.get("controlnet_block_samples") is not None or args.get("controlnet_single_block_samples") is not None:
        return "ControlNet residuals are added to the image tokens in the model's order"
    return None


ADAPTER = FamilyAdapter(
    name="flux",
    model_classes=("FluxTransformer2DModel",),
    processor_cls=FluxProcessor,
    slots=lambda model: block_slots(model, ["transformer_blocks", "single_transformer_blocks"], {"attn": "joint"}),
    read_inputs=_read_inputs,
    layer_doc="double-stream blocks first (transformer_blocks), then single-stream blocks",
    token_stream=TokenStream(blocks="transformer_blocks", exit="norm_out", rope_module="pos_embed", rope_axis=0,
                             rope_text_first=True, refuse=_keeps_order),
)
