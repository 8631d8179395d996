"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): `attn1` video self-attention with RoPE, `attn2` text cross-attention
(plus the 257 CLIP image tokens of I2V through `add_k_proj`, summed as a second attention).

Layer index = block index in `model.blocks` (0..num_layers-1); `attn1` and `attn2` of a block share it.
Mirrors `diffusers.models.transformers.transformer_wan.WanAttnProcessor` (0.42.1); unlike it, the I2V image-token
count comes from the forward's inputs instead of assuming 512 text tokens (the stock rule is the fallback).
"""

from __future__ import annotations

from typing import Any

import torch

from ..call import AttentionCall
from ..context import ForwardContext, TokenGrid
from .base import DiffattnProcessor, FamilyAdapter, forward_context, block_slots, to_heads_first
from .prologue import can_fuse, fused_norm_rope
from ..token_order import TokenStream

STOCK_TEXT_LEN = 512  # the stock processor's hard-coded umT5 length, used only without a context


def _qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if attn.fused_projections:
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(context).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _added_kv(attn, encoder_hidden_states_img: torch.Tensor):
    if attn.fused_projections:
        return attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
    return attn.add_k_proj(encoder_hidden_states_img), attn.add_v_proj(encoder_hidden_states_img)


def apply_wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on `[B, S, H, D]`, computed as the stock processor does (same op order)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanProcessor(DiffattnProcessor):
    family = "wan"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        ctx = self.context()
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_len = ctx.image_len if ctx is not None and ctx.image_len else encoder_hidden_states.shape[1] - STOCK_TEXT_LEN
            encoder_hidden_states_img = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]

        query, key, value = _qkv(attn, hidden_states, encoder_hidden_states)
        # the fused prologue (one Triton pass: norm across heads + RoPE + [B, H, S, D]) on CUDA half precision;
        # the stock op sequence elsewhere (CPU, float32, autograd), so those stay bit-identical to stock
        cos, sin = rotary_emb if rotary_emb is not None else (None, None)
        value = value.unflatten(2, (attn.heads, -1))
        if can_fuse(attn.norm_q, query, attn.heads, "across", cos, sin) and can_fuse(attn.norm_k, key, attn.heads, "across"):
            q = fused_norm_rope(attn.norm_q, query, attn.heads, "across", cos, sin)
            k = fused_norm_rope(attn.norm_k, key, attn.heads, "across", cos, sin)
        else:
            query = attn.norm_q(query)
            key = attn.norm_k(key)
            query = query.unflatten(2, (attn.heads, -1))
            key = key.unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                query = apply_wan_rope(query, *rotary_emb)
                key = apply_wan_rope(key, *rotary_emb)
            q, k = to_heads_first(query), to_heads_first(key)
        out_dtype = q.dtype

        role = "self" if encoder_hidden_states is None else "cross"
        grid = self.grid_for(ctx, q.shape[2])

        image_out = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _added_kv(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            call = AttentionCall(
                q, to_heads_first(key_img), to_heads_first(value_img), self.layer_info("cross_image"),
                "cross_image", ctx, grid=grid,
            )
            image_out = self.attend(call).transpose(1, 2).flatten(2, 3).to(out_dtype)

        call = AttentionCall(
            q, k, to_heads_first(value), self.layer_info(role), role, ctx, grid=grid,
            text_len=k.shape[2] if role == "cross" else 0, attn_mask=attention_mask,
        )
        out = self.attend(call).transpose(1, 2).flatten(2, 3).to(out_dtype)
        if image_out is not None:
            out = out + image_out
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


def _read_inputs(model, args: dict[str, Any]) -> ForwardContext:
    hidden = args["hidden_states"]
    p_t, p_h, p_w = model.config.patch_size
    _, _, f, h, w = hidden.shape
    image = args.get("encoder_hidden_states_image")
    return forward_context(
        "wan", args, "hidden_states", TokenGrid(f // p_t, h // p_h, w // p_w),
        image_len=0 if image is None else image.shape[1], patch_size=(p_t, p_h, p_w),
    )


def _keeps_order(model, args: dict[str, Any], ctx: ForwardContext) -> str | None:
    """Wan 2.2 TI2V's per-token timesteps modulate each block in the model's token order."""
    timestep = args.get("timestep")
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:
        return "per-token timesteps (Wan 2.2 TI2V) modulate every block in the model's order"
    return None


ADAPTER = FamilyAdapter(
    name="wan",
    model_classes=("WanTransformer3DModel",),
    processor_cls=WanProcessor,
    slots=lambda model: block_slots(model, ["blocks"], {"attn1": "self", "attn2": "cross"}),
    read_inputs=_read_inputs,
    layer_doc="block index in model.blocks; attn1 (self) and attn2 (cross) of a block share it",
    token_stream=TokenStream(blocks="blocks", exit="norm_out", rope_module="rope", rope_axis=1, refuse=_keeps_order),
)
