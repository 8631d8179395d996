"""Running a block mask over the video/image tokens of one attention call (Radial, and later block-masked
methods), with text handled by `text_split.visual_with_text`."""

from __future__ import annotations

import torch

from ..call import AttentionCall
from ..kernels import block_sparse_attention
from .base import dense_attention
from .text_split import can_split, visual_with_text


def block_masked_attention(call: AttentionCall, block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention of `call` with `block_mask` (`[nb, nb]` or `[B|1, H|1, nb, nb]` over the visual tokens).

    Roles `self` and `joint` use the mask; other roles, and masks other than key padding, run dense.
    """
    if not can_split(call):
        return dense_attention(call)
    mask = block_mask if block_mask.ndim == 4 else block_mask[None, None]
    if mask.device != call.q.device:
        mask = mask.to(call.q.device)

    def visual(batch_index, q, k, v, extra_k, extra_v):
        m = mask if batch_index is None or mask.shape[0] == 1 else mask[batch_index]
        return block_sparse_attention(
            q, k, v, m, block_size=block_size, scale=call.scale, extra_k=extra_k, extra_v=extra_v
        )

    return visual_with_text(call, visual)
