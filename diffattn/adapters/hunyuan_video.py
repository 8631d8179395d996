"""HunyuanVideo (`HunyuanVideoTransformer3DModel`): joint `[video; text]` attention, RoPE on the video part only,
text padded to a fixed length with a boolean key mask `[B, 1, 1, N]`.

Layer index: dual-stream blocks first (`transformer_blocks`), then single-stream blocks. The token refiner's
text-only attention keeps its stock processor.
Mirrors `diffusers.models.transformers.transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0` (0.42.1).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..call import AttentionCall
from ..context import ForwardContext, TokenGrid
from .base import DiffattnProcessor, FamilyAdapter, forward_context, block_slots, to_heads_first
from .prologue import can_fuse, fused_norm_rope, may_fuse
from ..token_order import TokenStream


def _fused_joint(attn, hidden_states, encoder_hidden_states, image_rotary_emb, single_stream: bool):
    """q, k `[B, H, S, D]` through the fused prologue (per-head norm, RoPE on the video tokens, the text tokens'
    own projections written after them), v as the stock path builds it; None when the kernel cannot reproduce the
    stock path for every projection of this call."""
    if not may_fuse(hidden_states):
        return None
    dual = attn.add_q_proj is not None and encoder_hidden_states is not None
    if attn.norm_q is None or attn.norm_k is None or (dual and (attn.norm_added_q is None or attn.norm_added_k is None)):
        return None
    cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
    query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
    if not (can_fuse(attn.norm_q, query, attn.heads, "head", cos, sin) and can_fuse(attn.norm_k, key, attn.heads, "head")):
        return None
    if cos is not None and cos.shape[0] != hidden_states.shape[1] - (encoder_hidden_states.shape[1] if single_stream else 0):
        return None
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    if not dual:
        q = fused_norm_rope(attn.norm_q, query, attn.heads, "head", cos, sin)
        k = fused_norm_rope(attn.norm_k, key, attn.heads, "head", cos, sin)
        return q, k, to_heads_first(value)
    e_query, e_key = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
    if not (can_fuse(attn.norm_added_q, e_query, attn.heads, "head") and can_fuse(attn.norm_added_k, e_key, attn.heads, "head")):
        return None
    b, s, t = query.shape[0], query.shape[1], e_query.shape[1]
    d = query.shape[-1] // attn.heads
    q = query.new_empty(b, attn.heads, s + t, d)
    k = key.new_empty(b, attn.heads, s + t, d)
    fused_norm_rope(attn.norm_q, query, attn.heads, "head", cos, sin, out=q)
    fused_norm_rope(attn.norm_k, key, attn.heads, "head", cos, sin, out=k)
    fused_norm_rope(attn.norm_added_q, e_query, attn.heads, "head", out=q, out_offset=s)
    fused_norm_rope(attn.norm_added_k, e_key, attn.heads, "head", out=k, out_offset=s)
    e_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    return q, k, to_heads_first(torch.cat([value, e_value], dim=1))


class HunyuanVideoProcessor(DiffattnProcessor):
    family = "hunyuan_video"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        ctx = self.context()
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        fused = _fused_joint(attn, hidden_states, encoder_hidden_states, image_rotary_emb, single_stream)
        if fused is not None:
            return self._finish(attn, ctx, *fused, encoder_hidden_states, attention_mask, text_len)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single_stream:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1), query[:, -text_len:]],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1), key[:, -text_len:]], dim=1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            e_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            e_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            e_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                e_query = attn.norm_added_q(e_query)
            if attn.norm_added_k is not None:
                e_key = attn.norm_added_k(e_key)
            query = torch.cat([query, e_query], dim=1)
            key = torch.cat([key, e_key], dim=1)
            value = torch.cat([value, e_value], dim=1)
        return self._finish(
            attn, ctx, to_heads_first(query), to_heads_first(key), to_heads_first(value), encoder_hidden_states,
            attention_mask, text_len,
        )

    def _finish(self, attn, ctx, q, k, v, encoder_hidden_states, attention_mask, text_len):
        """Attend (q, k, v `[B, H, S, D]`) and project out, as the stock processor ends."""
        key_padding = None
        if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.ndim == 4:
            key_padding = attention_mask[:, 0, 0, :]
        call = AttentionCall(
            q, k, v, self.layer_info("joint"), "joint", ctx,
            grid=self.grid_for(ctx, q.shape[2] - text_len), text_len=text_len, text_first=False,
            attn_mask=attention_mask, key_padding=key_padding,
        )
        out = self.attend(call).transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            out, enc_out = out[:, :-text_len], out[:, -text_len:]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[0](out)
                out = attn.to_out[1](out)
            if getattr(attn, "to_add_out", None) is not None:
                enc_out = attn.to_add_out(enc_out)
            return out, enc_out
        return out, encoder_hidden_states


def _read_inputs(model, args: dict[str, Any]) -> ForwardContext:
    hidden = args["hidden_states"]
    p, p_t = model.config.patch_size, model.config.patch_size_t
    _, _, f, h, w = hidden.shape
    mask = args.get("encoder_attention_mask")
    return forward_context(
        "hunyuan_video", args, "hidden_states", TokenGrid(f // p_t, h // p, w // p),
        text_mask=None if mask is None else mask.bool(), patch_size=(p_t, p, p),
    )


def _keeps_order(model, args: dict[str, Any], ctx: ForwardContext) -> str | None:
    """HunyuanVideo I2V's token-replace blocks modulate the first `H * W` tokens (frame 0) apart from the rest."""
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        return "token-replace I2V modulates the frame-0 tokens by their position in the model's order"
    return None


ADAPTER = FamilyAdapter(
    name="hunyuan_video",
    model_classes=("HunyuanVideoTransformer3DModel",),
    processor_cls=HunyuanVideoProcessor,
    slots=lambda model: block_slots(model, ["transformer_blocks", "single_transformer_blocks"], {"attn": "joint"}),
    read_inputs=_read_inputs,
    layer_doc="dual-stream blocks first (transformer_blocks), then single-stream blocks; token refiner untouched",
    token_stream=TokenStream(blocks="transformer_blocks", exit="norm_out", rope_module="rope", rope_axis=0,
                             refuse=_keeps_order),
)
