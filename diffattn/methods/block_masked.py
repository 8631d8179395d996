"""Running a block mask over the video/image tokens of one attention call (shared by Radial and later methods).

Video/image queries attend the video keys their block mask selects plus every valid text key (fused into the same
softmax as the kernel's extra keys); text queries attend every valid key densely, exactly as stock. Text padding
(HunyuanVideo) is honoured: padded text keys are left out, per batch element when the prompts' lengths differ.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..kernels import block_sparse_attention

logger = logging.getLogger("diffattn")
_logged: set[str] = set()


def log_once(key: str, message: str, *args) -> None:
    """Log a decision (e.g. running dense for a shape) once per process, not once per layer and step."""
    if key not in _logged:
        _logged.add(key)
        logger.info(message, *args)


def dense_attention(call: AttentionCall) -> torch.Tensor:
    """Exactly what the stock processor computes."""
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask, scale=call.scale)


def _text_key_groups(call: AttentionCall) -> list[tuple[list[int], torch.Tensor | None]]:
    """Batch elements grouped by their valid text keys: `[(batch indices, text token indices or None=all)]`.

    Reads the padding once per model forward (cached in the context), never per attention call.
    """
    batch = call.q.shape[0]
    if call.key_padding is None:
        return [(list(range(batch)), None)]
    ctx = call.context
    cache_key = ("text_key_groups", call.text_slice().start, call.text_slice().stop, call.key_padding.shape)
    if ctx is not None and cache_key in ctx.extras:
        return ctx.extras[cache_key]
    text_pad = call.key_padding[:, call.text_slice()].to("cpu")
    groups: dict[tuple[int, ...], list[int]] = {}
    for b in range(batch):
        valid = tuple(torch.nonzero(text_pad[b]).flatten().tolist())
        groups.setdefault(valid, []).append(b)
    result = []
    for valid, members in groups.items():
        idx = None if len(valid) == text_pad.shape[1] else torch.tensor(valid, dtype=torch.long, device=call.k.device)
        result.append((members, idx))
    if ctx is not None:
        ctx.extras[cache_key] = result
    return result


def block_masked_attention(call: AttentionCall, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention of `call` with `block_mask` (`[nb, nb]` or `[B|1, H|1, nb, nb]` over the visual tokens).

    Roles `self` (all tokens visual) and `joint` (visual + text) use the mask; other roles run dense.
    """
    if call.role not in ("self", "joint"):
        return dense_attention(call)
    if call.attn_mask is not None and call.key_padding is None:
        log_once(
            f"mask:{call.layer.path}",
            "diffattn: layer %s has an attention mask that is not a key padding mask; it runs dense",
            call.layer.path,
        )
        return dense_attention(call)
    mask = block_mask if block_mask.ndim == 4 else block_mask[None, None]
    if mask.device != call.q.device:
        mask = mask.to(call.q.device)
    vis, txt = call.visual_slice(), call.text_slice()
    q_v, k_v, v_v = call.q[:, :, vis], call.k[:, :, vis], call.v[:, :, vis]
    if call.role == "self" or txt.stop == txt.start:
        if call.key_padding is not None:  # no family pads video keys; honour such a mask exactly
            return dense_attention(call)
        return block_sparse_attention(q_v, k_v, v_v, mask, block_size=block_size, scale=call.scale)

    k_t, v_t = call.k[:, :, txt], call.v[:, :, txt]
    groups = _text_key_groups(call)
    if len(groups) == 1 and groups[0][1] is None:
        out_v = block_sparse_attention(
            q_v, k_v, v_v, mask, block_size=block_size, scale=call.scale, extra_k=k_t, extra_v=v_t
        )
    else:
        out_v = torch.empty_like(q_v)
        for members, idx in groups:
            b = torch.tensor(members, device=call.q.device)
            ek, ev = k_t[b], v_t[b]
            if idx is not None:
                ek, ev = ek[:, :, idx], ev[:, :, idx]
            m = mask if mask.shape[0] == 1 else mask[b]
            out_v[b] = block_sparse_attention(
                q_v[b], k_v[b], v_v[b], m, block_size=block_size, scale=call.scale, extra_k=ek, extra_v=ev
            )

    attn_mask = call.attn_mask
    if attn_mask is not None and attn_mask.shape[-2] == call.q.shape[2]:
        attn_mask = attn_mask[..., txt, :]
    out_t = F.scaled_dot_product_attention(call.q[:, :, txt], call.k, call.v, attn_mask=attn_mask, scale=call.scale)
    parts = [out_t, out_v] if call.text_first else [out_v, out_t]
    return torch.cat(parts, dim=2)
