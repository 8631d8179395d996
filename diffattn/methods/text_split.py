"""Splitting one attention call into its video/image queries (handled by a method) and its text queries (dense).

Video/image queries attend what the method selects among the visual keys, plus every valid text key, fused into
the same softmax as the kernels' extra keys. Text queries attend every valid key densely, as stock. Text padding
(HunyuanVideo) is honoured: padded text keys are left out, per batch element when the prompts' lengths differ.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..log import log_once

# visual_fn(batch_index, q_v, k_v, v_v, extra_k, extra_v) -> out_v, all [b, H, S, D]; batch_index is None when
# the call's whole batch is passed, else the LongTensor of the batch elements passed.
VisualFn = Callable[..., torch.Tensor]

__all__ = ["VisualFn", "can_split", "text_key_groups", "visual_with_text"]


def text_key_groups(call: AttentionCall) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Batch elements grouped by their valid text keys: `[(batch index tensor or None = the whole batch, text token
    indices or None = all)]`; index tensors live on the call's device.

    The padding is read to the host once per model forward (cached in the context), never per attention call.
    """
    batch = call.q.shape[0]
    if call.key_padding is None:
        return [(None, None)]
    ctx = call.context
    txt = call.text_slice()
    cache_key = ("text_key_groups", txt.start, txt.stop, tuple(call.key_padding.shape), str(call.k.device))
    if ctx is not None and cache_key in ctx.extras:
        return ctx.extras[cache_key]
    text_pad = call.key_padding[:, txt].to("cpu")
    groups: dict[tuple[int, ...], list[int]] = {}
    for b in range(batch):
        valid = tuple(torch.nonzero(text_pad[b]).flatten().tolist())
        groups.setdefault(valid, []).append(b)
    result = []
    for valid, members in groups.items():
        idx = None if len(valid) == text_pad.shape[1] else torch.tensor(valid, dtype=torch.long, device=call.k.device)
        rows = None if len(groups) == 1 else torch.tensor(members, dtype=torch.long, device=call.q.device)
        result.append((rows, idx))
    if ctx is not None:
        ctx.extras[cache_key] = result
    return result


def visual_with_text(call: AttentionCall, visual_fn: VisualFn) -> torch.Tensor:
    """Run `visual_fn` for the visual queries (valid text keys as extra keys) and dense attention for the text
    queries; return the whole `[B, H, Sq, D]` output in the call's token order."""
    vis, txt = call.visual_slice(), call.text_slice()
    q_v, k_v, v_v = call.q[:, :, vis], call.k[:, :, vis], call.v[:, :, vis]
    if txt.stop == txt.start:
        return visual_fn(None, q_v, k_v, v_v, None, None)

    k_t, v_t = call.k[:, :, txt], call.v[:, :, txt]
    groups = text_key_groups(call)
    if len(groups) == 1:
        rows, idx = groups[0]
        ek, ev = (k_t, v_t) if idx is None else (k_t[:, :, idx], v_t[:, :, idx])
        out_v = visual_fn(None, q_v, k_v, v_v, ek, ev)
    else:
        out_v = torch.empty_like(q_v)
        for b, idx in groups:
            ek, ev = k_t[b], v_t[b]
            if idx is not None:
                ek, ev = ek[:, :, idx], ev[:, :, idx]
            out_v[b] = visual_fn(b, q_v[b], k_v[b], v_v[b], ek, ev)

    attn_mask = call.attn_mask
    if attn_mask is not None and attn_mask.shape[-2] == call.q.shape[2]:
        attn_mask = attn_mask[..., txt, :]
    out_t = F.scaled_dot_product_attention(call.q[:, :, txt], call.k, call.v, attn_mask=attn_mask, scale=call.scale)
    return torch.cat([out_t, out_v] if call.text_first else [out_v, out_t], dim=2)


def can_split(call: AttentionCall) -> bool:
    """Whether the call's mask is only key padding (which `visual_with_text` honours); log once if not."""
    if call.attn_mask is not None and call.key_padding is None:
        log_once(
            f"mask:{call.layer.path}",
            "diffattn: layer %s has an attention mask that is not a key padding mask; it runs dense",
            call.layer.path,
        )
        return False
    if call.role == "self" and call.key_padding is not None:
        return False
    return call.role in ("self", "joint")
